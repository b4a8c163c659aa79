"""Export a decoder-only causal LM to ONNX with past key/values in and present key/values out.

Inputs: ``input_ids``, ``attention_mask`` (over past + new tokens), ``position_ids`` and
``past_key_values.{i}.key|value`` ``[batch, kv_heads, past_len, head_dim]``; outputs ``logits`` and
``present.{i}.key|value``. Batch, sequence and past lengths are dynamic. Uses the dynamo exporter.
Each constant-weight MatMul is named after its torch module (``model.layers.0.mlp.down_proj/MatMul``
reading ``model.layers.0.mlp.down_proj.weight``), so quantization finds projection groups by name.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path


def kv_shape(config) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) of a decoder config."""
    cfg = config.get_text_config(decoder=True)
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, kv_heads, head_dim


def _wrapper(model):
    import torch
    from transformers import DynamicCache

    n_layers = kv_shape(model.config)[0]

    class DecoderWithPast(torch.nn.Module):
        """Flat-tensor signature around an HF causal LM so the exporter sees plain inputs/outputs."""

        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(n_layers)])
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            )
            presents = []
            for layer in out.past_key_values.layers:
                presents += [layer.keys, layer.values]
            return (out.logits, *presents)

    return DecoderWithPast()


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    """ONNX input and output names for a model with ``n_layers`` layers."""
    past = [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


# How a batch of prompts is padded for each attention layout (recorded in the bundle).
PADDING_SIDE = {"fused": "right", "generic": "left"}


def export_decoder(model, out_path: Path, opset: int = 18, attention: str = "auto") -> str:
    """Export ``model`` (fp32, eval) to ``out_path``; weights go to external data when the model
    exceeds protobuf's 2 GB limit. ``attention``: ``fused`` (one GroupQueryAttention node per layer,
    see ``export.gqa``; prompts in a batch must then be right-padded), ``generic`` (attention as the
    exporter spells it out; any padding) or ``auto`` (fused where the architecture allows).
    Returns the attention layout used, ``fused`` or ``generic``."""
    import torch

    from distill.export import gqa

    model = model.eval().float()
    reason = gqa.unsupported_reason(model)
    if attention == "fused" and reason:
        raise ValueError(f"fused attention export does not support {reason}")
    layout = "fused" if attention in ("fused", "auto") and not reason else "generic"
    n_layers, kv_heads, head_dim = kv_shape(model.config)
    batch, seq, past_len = 2, 3, 4
    input_ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    attention_mask = torch.ones(batch, past_len + seq, dtype=torch.int64)
    position_ids = torch.arange(past_len, past_len + seq).unsqueeze(0).expand(batch, -1).contiguous()
    past = [torch.randn(batch, kv_heads, past_len, head_dim) for _ in range(2 * n_layers)]
    in_names, out_names = io_names(n_layers)

    b, s, p, t = (torch.export.Dim(n) for n in ("batch", "seq", "past", "total"))
    dims = {"input_ids": {0: b, 1: s}, "attention_mask": {0: b, 1: t}, "position_ids": {0: b, 1: s}}
    dynamic_shapes = (
        dims["input_ids"],
        dims["attention_mask"],
        dims["position_ids"],
        tuple([{0: b, 2: p}] * len(past)),
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    if layout == "fused":
        wrapper, translation = gqa.FusedDecoder(model).eval(), gqa.onnx_translation()
    else:
        wrapper, translation = _wrapper(model).eval(), None
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter chatter (axis renames, deprecations) is not for users
        program = torch.onnx.export(
            wrapper,
            (input_ids, attention_mask, position_ids, *past),
            input_names=in_names,
            output_names=out_names,
            dynamic_shapes=dynamic_shapes,
            opset_version=opset,
            dynamo=True,
            optimize=True,
            verbose=False,
            custom_translation_table=translation,
        )
    program.save(str(out_path), external_data=model.num_parameters() * 4 > 1.8e9)
    _finish_saved(out_path)
    return layout


# The export wrappers (``DecoderWithPast``, ``gqa.FusedDecoder``) hold the HF model as ``.model``.
_WRAPPER_PREFIX = "model."


def _module_path(node) -> str | None:
    """The torch module a node was traced in (HF ``state_dict`` spelling), from the exporter's metadata."""
    import ast

    meta = {p.key: p.value for p in node.metadata_props}
    try:  # e.g. ['', 'model.model.layers.0.self_attn.q_proj', 'linear']: scopes, innermost module, then the op
        scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
    except (ValueError, SyntaxError):
        return None
    if not isinstance(scopes, list) or len(scopes) < 2 or not scopes[-2]:
        return None
    return str(scopes[-2]).removeprefix(_WRAPPER_PREFIX)


def name_linear_weights(model) -> int:
    """Name every constant-weight MatMul after the torch module it computes: node
    ``model.layers.0.self_attn.q_proj/MatMul`` reading initializer ``model.layers.0.self_attn.q_proj.weight``
    (stored ``[in, out]``, as MatMul reads it). The dynamo exporter calls them ``node_linear_3`` and
    ``val_63``; quantization presets find projection groups by these names (``quantize.linear_groups``).
    Reads the per-node metadata, so it runs before ``strip_node_metadata``. Edits in place; returns how
    many MatMuls were named."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    uses: dict[str, int] = {}
    for n in g.node:
        for x in n.input:
            uses[x] = uses.get(x, 0) + 1
    taken = set(inits) | {n.name for n in g.node} | {x for n in g.node for x in n.output} | {i.name for i in g.input}
    named = 0
    for node in g.node:
        if node.op_type != "MatMul" or len(node.input) != 2 or node.input[1] not in inits or uses[node.input[1]] != 1:
            continue
        module = _module_path(node)
        weight, name = f"{module}.weight", f"{module}/MatMul"
        if not module or weight in taken or name in taken:
            continue
        inits[node.input[1]].name = weight
        node.input[1] = weight
        node.name = name
        taken |= {weight, name}
        named += 1
    return named


def strip_node_metadata(model) -> int:
    """Drop the exporter's per-node metadata (source stack traces, namespaces: ~2 KB per node, 4 MB
    on SmolLM2-135M) and doc strings; they never affect execution. Edits in place; returns bytes saved."""
    before = sum(n.ByteSize() for n in model.graph.node)
    for n in model.graph.node:
        del n.metadata_props[:]
        n.doc_string = ""
    return before - sum(n.ByteSize() for n in model.graph.node)


def _finish_saved(path: Path) -> None:
    """Name the linear weights after their modules, then drop the exporter's metadata, in the saved file."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    named = name_linear_weights(m)
    if strip_node_metadata(m) or named:
        onnx.save(m, str(path))  # external data (if any) is referenced by location and left as is


def save_ort_format(src: Path, dst: Path) -> Path:
    """Write ``src`` in ORT format (``.ort``, flatbuffers) for mobile/minimal onnxruntime builds;
    returns ``dst``. Optimized at the extended level, which stays portable across CPUs (the
    ``all`` level adds layout changes specific to the exporting machine)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(dst)
    opts.add_session_config_entry("session.save_model_format", "ORT")
    ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
    return dst
