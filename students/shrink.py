"""A smaller copy of a causal LM that keeps its tokenizer: fewer decoder layers, attention heads and
MLP neurons, taken from the trained weights (so logit KD from the original model applies directly).

- Layers: DistilBERT's layer dropping (Sanh et al. 2019), ``architecture.keep_layers``.
- Attention heads, per layer (structured pruning): each head's score is the L2 norm of the weights
  that belong to it alone: its ``q_proj`` rows and ``o_proj`` columns, plus, since a GQA key/value
  head is shared by a group of query heads, the group's ``k_proj``/``v_proj`` rows. Heads go in whole
  KV groups (the group's query heads, its key and value head), so the query heads per KV head stay
  the same; without GQA a group is one head. The groups with the largest norms are kept, in order.
- MLP neurons, per layer: neuron i's score is the L2 norm of ``gate_proj`` row i, ``up_proj`` row i
  and ``down_proj`` column i together; the ``intermediate_size`` largest are kept, in order.

Biases (qwen2's q/k/v) follow their rows but do not count in the scores. ``model.config`` is
updated (``head_dim`` written out, since ``hidden_size // num_attention_heads`` no longer gives it),
so ``save_pretrained`` → ``from_pretrained`` round-trips and the ONNX export reads the new shapes.
"""

from __future__ import annotations

import time

from distill.core.errors import DistillError

# Llama-layout decoders: self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj in every layer.
PRUNABLE = ("llama", "qwen2", "qwen3", "mistral")
FIX = "prune llama/qwen2/qwen3/mistral-shaped teachers only, or set num_heads and intermediate_size to null"


def unsupported_reason(model) -> str | None:
    """Why heads or MLP neurons of ``model`` cannot be pruned here, or None when they can."""
    cfg = model.config
    if cfg.model_type not in PRUNABLE:
        return f"model type {cfg.model_type!r}"
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not layers:
        return "no model.layers decoder stack"
    layer = layers[0]
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attn is None or not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
        return "attention without q/k/v/o projections"
    if mlp is None or not all(hasattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj")):
        return "an MLP without gate/up/down projections"
    return None


def _check(model, what: str) -> None:
    reason = unsupported_reason(model)
    if reason:
        raise DistillError(f"cannot prune the {what} of this model: {reason}", FIX)


def _head_layout(config) -> tuple[int, int, int]:
    """(query heads, KV heads, head dim) of a decoder config."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv, head_dim


def _top(scores, k: int) -> list[int]:
    """Indices of the ``k`` largest ``scores``, in increasing index order (ties: the lower index)."""
    import torch

    order = torch.sort(-scores.double(), stable=True).indices[:k]
    return sorted(order.tolist())


def _take(linear, index, dim: int) -> None:
    """``linear`` (in place) with only rows (``dim`` 0, outputs; bias too) or columns (``dim`` 1, inputs) ``index``."""
    import torch

    idx = torch.as_tensor(index, device=linear.weight.device)
    with torch.no_grad():
        linear.weight = torch.nn.Parameter(linear.weight.index_select(dim, idx).clone())
        if dim == 0 and linear.bias is not None:
            linear.bias = torch.nn.Parameter(linear.bias.index_select(0, idx).clone())
    if dim == 0:
        linear.out_features = len(idx)
    else:
        linear.in_features = len(idx)


def kv_group_scores(attn, heads: int, kv_heads: int, head_dim: int):
    """[kv_heads] L2 norm of each KV group's own weights: its query heads' q_proj rows and o_proj
    columns, its k_proj and v_proj rows."""
    group = heads // kv_heads
    q = attn.q_proj.weight.detach().float().view(kv_heads, group * head_dim, -1).pow(2).sum((1, 2))
    o = attn.o_proj.weight.detach().float().view(-1, kv_heads, group * head_dim).pow(2).sum((0, 2))
    k = attn.k_proj.weight.detach().float().view(kv_heads, head_dim, -1).pow(2).sum((1, 2))
    v = attn.v_proj.weight.detach().float().view(kv_heads, head_dim, -1).pow(2).sum((1, 2))
    return (q + o + k + v).sqrt()


def neuron_scores(mlp):
    """[intermediate_size] L2 norm of each MLP neuron's weights: gate_proj and up_proj rows, down_proj column."""
    gate = mlp.gate_proj.weight.detach().float().pow(2).sum(1)
    up = mlp.up_proj.weight.detach().float().pow(2).sum(1)
    down = mlp.down_proj.weight.detach().float().pow(2).sum(0)
    return (gate + up + down).sqrt()


def prune_heads(model, num_heads: int) -> list[list[int]]:
    """Keep ``num_heads`` query heads per layer (whole KV groups, the largest by ``kv_group_scores``);
    ``model`` and its config change in place. Returns the kept KV group indices of each layer."""
    _check(model, "attention heads")
    config = model.config
    heads, kv, head_dim = _head_layout(config)
    group = heads // kv
    if not 1 <= num_heads <= heads or num_heads % group:
        allowed = ", ".join(str(group * g) for g in range(1, kv + 1))
        raise DistillError(
            f"student.from_teacher.num_heads={num_heads} does not fit the teacher's {heads} query heads in {kv} "
            f"KV groups of {group} (whole groups are kept)",
            f"pick one of {allowed}",
        )
    keep_groups = num_heads // group
    kept = []
    for layer in model.model.layers:
        attn = layer.self_attn
        groups = _top(kv_group_scores(attn, heads, kv, head_dim), keep_groups)
        q_index = [g * group * head_dim + i for g in groups for i in range(group * head_dim)]
        kv_index = [g * head_dim + i for g in groups for i in range(head_dim)]
        _take(attn.q_proj, q_index, 0)
        _take(attn.k_proj, kv_index, 0)
        _take(attn.v_proj, kv_index, 0)
        _take(attn.o_proj, q_index, 1)
        for name, value in (("num_heads", num_heads), ("num_key_value_heads", keep_groups)):
            if hasattr(attn, name):  # older transformers keep the counts on the module
                setattr(attn, name, value)
        kept.append(groups)
    config.head_dim = head_dim  # no longer hidden_size // num_attention_heads
    config.num_attention_heads = num_heads
    config.num_key_value_heads = keep_groups
    return kept


def prune_mlp(model, intermediate_size: int) -> list[list[int]]:
    """Keep the ``intermediate_size`` MLP neurons of each layer with the largest ``neuron_scores``;
    ``model`` and its config change in place. Returns the kept neuron indices of each layer."""
    _check(model, "MLP neurons")
    config = model.config
    if not 1 <= intermediate_size <= config.intermediate_size:
        raise DistillError(
            f"student.from_teacher.intermediate_size={intermediate_size} is not between 1 and the teacher's "
            f"{config.intermediate_size}",
            f"pick a size in 1..{config.intermediate_size}",
        )
    kept = []
    for layer in model.model.layers:
        mlp = layer.mlp
        index = _top(neuron_scores(mlp), intermediate_size)
        _take(mlp.gate_proj, index, 0)
        _take(mlp.up_proj, index, 0)
        _take(mlp.down_proj, index, 1)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = intermediate_size
        kept.append(index)
    config.intermediate_size = intermediate_size
    return kept


def shrink(model, layers: list[int] | None = None, num_heads: int | None = None, intermediate_size: int | None = None):
    """``model`` (changed in place) with only ``layers`` kept, then ``num_heads`` query heads and
    ``intermediate_size`` MLP neurons per layer (None: keep all); returns it."""
    if layers is not None:
        from distill.students.architecture import keep_layers

        if not hasattr(model.get_decoder(), "layers"):
            raise DistillError(
                f"cannot keep a layer subset of this {model.config.model_type!r} model: no decoder layers stack",
                "use a llama/qwen2/qwen3/mistral-shaped teacher, or set student.from_teacher.layers to null",
            )
        depth = len(model.get_decoder().layers)
        bad = [i for i in layers if not 0 <= i < depth]
        if bad:
            raise DistillError(
                f"student.from_teacher.layers {bad} out of range: the teacher has {depth} layers",
                f"pick indices in 0..{depth - 1}",
            )
        keep_layers(model, layers)
    if num_heads is not None:
        prune_heads(model, num_heads)
    if intermediate_size is not None:
        prune_mlp(model, intermediate_size)
    return model


def decode_speed(model, prompt_ids: list[int], new_tokens: int = 16, threads: int = 1) -> float:
    """Greedy decoding speed of ``model`` in tokens/s on ``threads`` CPU threads: ``new_tokens``
    KV-cached steps after ``prompt_ids`` (the prefill's time is measured apart and left out)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)
    kw = dict(do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0)
    was_training = model.training
    model.eval()

    def timed(n: int) -> float:
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        out.tolist()  # waits for the device
        return time.perf_counter() - t0

    try:
        with torch.inference_mode():
            timed(1)  # warm-up
            prefill = min(timed(1), timed(1))
            total = timed(new_tokens + 1)
    finally:
        torch.set_num_threads(before)
        model.train(was_training)
    return new_tokens / max(total - prefill, 1e-9)


def size_and_speed(student, teacher, prompt_ids: list[int], new_tokens: int = 16) -> dict:
    """Parameters and one-thread greedy decoding speed (``decode_speed``) of ``student`` next to
    ``teacher`` on the same prompt; returns the figures and their ratios."""
    s_params = sum(p.numel() for p in student.parameters())
    t_params = sum(p.numel() for p in teacher.parameters())
    s_speed = decode_speed(student, prompt_ids, new_tokens)
    t_speed = decode_speed(teacher, prompt_ids, new_tokens)
    return {
        "student_parameters": s_params,
        "teacher_parameters": t_params,
        "parameter_ratio": s_params / t_params,
        "student_tokens_per_second": s_speed,
        "teacher_tokens_per_second": t_speed,
        "speedup": s_speed / t_speed,
        "prompt_tokens": len(prompt_ids),
        "decode_tokens": new_tokens,
        "threads": 1,
    }
