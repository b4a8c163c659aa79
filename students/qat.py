"""Quantization-aware fine-tuning: train the student through the arithmetic of its int4 export.

``fake_quantized(model, layout)`` makes every projection and the tied embedding / LM head compute
with its weights rounded exactly as the export's weight-only preset rounds them (blockwise along
the input dimension, symmetric, one scale per block; the tied embedding shared as int8) and, as
``MatMulNBits`` at accuracy level 4 does at run time, each activation row quantized to int8 per
block. Gradients pass the rounding unchanged (straight-through estimator), so the optimizer keeps
moving the full-precision weights while the loss is that of the quantized model. Exported after
such a phase, the int4 file holds the weights the loss was computed with.

The grids mirror the export's: ``MatMulNBits`` weights take ``scale = m / -8`` (4 bits; ``m / -128``
at 8) where ``m`` is the block's value of largest magnitude, sign kept, codes ``round(w / scale)`` in
``[-8, 7]``; the shared embedding (``export.quantize.share_quantized_embedding``) takes
``scale = max|w| / 127``, codes in ``[-127, 127]``. ``tests/unit/test_qat.py`` checks them against
the dequantized weights of real exported files.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

_PROJECTION = re.compile(r"(?:^|\.)layers\.\d+\.\w+\.(q|k|v|o|gate|up|down)_proj$")


@dataclass(frozen=True)
class QuantLayout:
    """The block layout of a weight-only export preset, as the trainer simulates it."""

    bits: int = 4
    block_size: int = 32
    group_block_sizes: tuple[tuple[str, int], ...] = ()  # (projection group, block) overriding block_size
    embed_bits: int = 8  # the tied embedding / LM head, shared as one blockwise int8 tensor
    embed_block_size: int | None = 64  # None: the embedding / LM head stay full precision
    activation_bits: int | None = 8  # accuracy level 4: each activation row int8 per block; None: fp32

    def block_of(self, group: str) -> int:
        return dict(self.group_block_sizes).get(group, self.block_size)


class _RoundSTE(torch.autograd.Function):
    """``round`` forward, identity backward."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def fake_quantize_blocks(x: torch.Tensor, bits: int, block: int, extreme_to_min: bool = True) -> torch.Tensor:
    """``x`` [..., K] rounded to a symmetric ``bits`` grid per block of ``block`` along its last
    dimension, returned dequantized (same shape and dtype). A K that does not divide into blocks is
    padded with zeros to the next block, as ``MatMulNBitsQuantizer`` pads the weight it quantizes.

    ``extreme_to_min`` (onnxruntime's ``MatMulNBits`` weights, 4 and 8 bits): the block's value of
    largest magnitude, sign kept, maps to the most negative code, ``scale = m / -2**(bits-1)``, codes
    ``[-2**(bits-1), 2**(bits-1) - 1]``. Otherwise (the shared int8 embedding, run-time activations):
    ``scale = max|x| / (2**(bits-1) - 1)``, codes ``±(2**(bits-1) - 1)``.

    The gradient passes straight through (identity inside the grid, zero where a value is clamped);
    the scales, set by each block's extreme, are constants of the step."""
    shape = x.shape
    pad = -shape[-1] % block
    padded = F.pad(x, (0, pad)) if pad else x
    blocks = padded.reshape(*shape[:-1], padded.shape[-1] // block, block).float()
    half = 2 ** (bits - 1)
    if extreme_to_min:
        m = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))
        scale, lo, hi = m / -half, -half, half - 1
    else:
        scale, lo, hi = blocks.abs().amax(-1, keepdim=True) / (half - 1), 1 - half, half - 1
    scale = torch.where(scale == 0, torch.ones_like(scale), scale).detach()
    q = torch.clamp(_RoundSTE.apply(blocks / scale), lo, hi)
    return (q * scale).reshape(padded.shape)[..., : shape[-1]].to(x.dtype)


def _embedding_block(block: int, k: int) -> int:
    """The block ``export.quantize.share_quantized_embedding`` uses on a hidden size of ``k``: halved
    until it divides ``k`` (the projections' blocks are padded instead, see ``fake_quantize_blocks``)."""
    while block > 16 and k % block:
        block //= 2
    return block


def _weight(module, bits: int, block: int, extreme_to_min: bool) -> torch.Tensor:
    """The module's weight on its grid; without autograd (evaluation, generation) computed once per
    version of the weight, not at every decoding step."""
    if torch.is_grad_enabled():
        return fake_quantize_blocks(module.weight, bits, block, extreme_to_min)
    key = (module.weight._version, module.weight.data_ptr())
    cached = module.__dict__.get("_qat_cache")
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, fake_quantize_blocks(module.weight, bits, block, extreme_to_min))
        module.__dict__["_qat_cache"] = cached
    return cached[1]


def _linear_forward(module, bits: int, block: int, act_bits: int | None, shared: bool):
    def forward(x):
        w = _weight(module, bits, block, extreme_to_min=not shared)
        if act_bits is not None:
            x = fake_quantize_blocks(x, act_bits, block, extreme_to_min=False)
        return F.linear(x, w, module.bias)

    return forward


def _embedding_forward(module, bits: int, block: int):
    def forward(ids):
        w = _weight(module, bits, block, extreme_to_min=False)
        return F.embedding(ids, w, module.padding_idx)

    return forward


def quantized_modules(model, layout: QuantLayout) -> dict[str, tuple[int, int]]:
    """``{module name: (bits, block)}`` of every module ``fake_quantized`` simulates: the seven
    projections of each layer and, when ``layout.embed_block_size`` is set and the LM head is tied to
    the embedding, both of them (one shared int8 tensor in the export). An untied LM head is a plain
    projection (``layout.bits``, ``layout.block_size``)."""
    out: dict[str, tuple[int, int]] = {}
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and emb is not None and head.weight is emb.weight
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            if m := _PROJECTION.search(name):
                out[name] = (layout.bits, layout.block_of(m.group(1)))
            elif module is head and not tied:
                out[name] = (layout.bits, layout.block_size)
            elif module is head and layout.embed_block_size:
                out[name] = (layout.embed_bits, _embedding_block(layout.embed_block_size, module.in_features))
        elif module is emb and tied and layout.embed_block_size:
            out[name] = (layout.embed_bits, _embedding_block(layout.embed_block_size, module.embedding_dim))
    return out


@contextlib.contextmanager
def fake_quantized(model, layout: QuantLayout):
    """Within the block, ``model`` computes as its ``layout`` export would (see the module docstring);
    its parameters and state dict are untouched, and leaving the block restores the plain forward."""
    modules = dict(model.named_modules())
    plan = quantized_modules(model, layout)
    if not any(_PROJECTION.search(name) for name in plan):
        raise ValueError(
            "quantization-aware training found no q/k/v/o/gate/up/down projections in this student "
            "(a layout the int4 export does not know)"
        )
    emb = model.get_input_embeddings()
    emb_weight = emb.weight if emb is not None else None
    patched = []
    try:
        for name, (bits, block) in plan.items():
            module = modules[name]
            if isinstance(module, torch.nn.Embedding):
                module.forward = _embedding_forward(module, bits, block)
            else:
                shared = module is model.get_output_embeddings() and module.weight is emb_weight
                module.forward = _linear_forward(module, bits, block, layout.activation_bits, shared)
            patched.append(module)
        yield plan
    finally:
        for module in patched:
            del module.forward  # the instance attribute: the class's forward again
            module.__dict__.pop("_qat_cache", None)


def self_distillation_targets(
    model, examples: list[dict], pad_id: int, topk: int = 20, batch_size: int = 8
) -> list[dict]:
    """``examples`` with the full-precision ``model``'s top-k log-probabilities at every target
    token (``kd_pos``/``kd_ids``/``kd_logprobs``, the layout of ``data.kd_example``): the targets of
    distilling the fp32 student into its own quantized self. Packed or multitask fields are kept."""
    from distill.students.data import collate

    out = []
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with torch.inference_mode():
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            plain = [{k: v for k, v in e.items() if not k.startswith("kd_")} for e in chunk]
            batch = collate(plain, pad_id)
            logits = model(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
            ).logits.float()
            for row, e in enumerate(plain):
                pos = [p for p in range(1, len(e["labels"])) if e["labels"][p] != -100]
                if not pos:
                    out.append(e)
                    continue
                lp = torch.log_softmax(logits[row, [p - 1 for p in pos]], -1).topk(topk, -1)
                out.append({**e, "kd_pos": pos, "kd_ids": lp.indices.tolist(), "kd_logprobs": lp.values.tolist()})
    model.train(was_training)
    return out


def quantization_aware_finetune(model, examples: list[dict], cfg, pad_id: int, layout: QuantLayout, dev=None) -> dict:
    """The last phase of training (``cfg.qat``, a ``QATSettings``): ``cfg.qat.steps`` optimizer steps of
    the student inside ``fake_quantized(model, layout)``, on the same examples, at ``cfg.qat.lr``
    (default a quarter of the training rate), cosine to zero with no warm-up; with ``cfg.qat.distill``
    > 0 the loss mixes in the forward KL to the full-precision student's own top-k (computed once,
    before the phase). ``model`` keeps its full-precision (latent) weights, which the export's int4
    preset rounds to the grid the phase trained. With ``dev`` the dev split is scored under the
    simulated quantization before and after. Returns the phase's record for the train metrics."""
    import time

    from distill.students.trainer import planned_steps, train

    q = cfg.qat
    t0 = time.time()
    lr = q.lr if q.lr is not None else cfg.lr / 4
    _, steps_per_epoch = planned_steps(len(examples), cfg)
    phase = cfg.model_copy(
        update={
            "lr": lr,
            "epochs": q.steps / steps_per_epoch,
            "warmup_ratio": 0.0,
            "schedule": "cosine",
            "validation": None,
            "save_every": 0,
            "seed": cfg.seed + 1,  # another order of the examples than the last epoch's
        }
    )
    kd = None
    if q.distill > 0:
        examples = self_distillation_targets(model, examples, pad_id)
        kd = SelfDistillation(weight=q.distill)
    record: dict = {"steps": q.steps, "lr": lr, "distill": q.distill, "layout": _layout_dict(layout)}
    with fake_quantized(model, layout) as plan:
        record["modules"] = len(plan)
        if dev is not None:
            record["dev_before"] = dev(model)
        result = train(model, examples, phase, pad_id, kd=kd)
        if dev is not None:
            record["dev_after"] = dev(model)
    # one batch's loss swings with its examples: the means of the phase's first and last quarter of steps
    losses = [e["loss"] for e in result.losses]
    k = max(1, len(losses) // 4)
    record.update(
        first_loss=sum(losses[:k]) / k,
        final_loss=sum(losses[-k:]) / k,
        tokens=result.tokens,
        seconds=time.time() - t0,
    )
    return record


@dataclass(frozen=True)
class SelfDistillation:
    """The KD settings (``trainer.forward_loss``) of the phase: forward KL to the fp32 student's top-k."""

    weight: float
    loss: str = "forward_kl"
    temperature: float = 1.0
    beta: float = 0.5


def _layout_dict(layout: QuantLayout) -> dict:
    return {**asdict(layout), "group_block_sizes": dict(layout.group_block_sizes)}
