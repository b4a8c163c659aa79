"""Fused export for Llama-shaped decoders: each layer's attention (with its rotary embedding) becomes
one ``com.microsoft.GroupQueryAttention`` node and each RMSNorm one ``SimplifiedLayerNormalization``
node — the layout onnxruntime-genai's model builder emits.

The generic dynamo export spells these out as ~60 small ONNX ops per layer (rotary slices and
concats, KV-cache concat and transposes, mask arithmetic, softmax, the norm's pow/mean/sqrt); at
batch 1 on one CPU thread their dispatch and copies cost a large share of a decoding step next to the
int8 weight MatMuls. SmolLM2-135M: 2245 nodes generic, 473 fused.

The model keeps the generic export's inputs and outputs (``input_ids``, ``attention_mask``,
``position_ids``, ``past_key_values.*`` → ``logits``, ``present.*``), but ``attention_mask`` only
gives each row's length (``seqlens_k = sum(mask) - 1``, ``total_sequence_length = mask.shape[1]``) and
positions follow from it (``position_ids`` is accepted and unused): **a batch of prompts must be
right-padded**, and a row's new tokens go right after its own last valid cache position. Bundles
say so with ``"padding_side": "right"``; ``export.runtime`` pads accordingly.

Supported: ``llama``, ``qwen2``, ``qwen3`` and ``mistral`` without sliding windows (SmolLM2, Qwen2.5,
TinyLlama, ...); anything else takes the generic export.
"""

from __future__ import annotations

import torch

SUPPORTED = ("llama", "qwen2", "qwen3", "mistral")


def unsupported_reason(model) -> str | None:
    """Why ``model`` cannot take the fused-attention export, or None when it can."""
    cfg = model.config.get_text_config(decoder=True)
    if cfg.model_type not in SUPPORTED:
        return f"model type {cfg.model_type!r} (fused attention covers {', '.join(SUPPORTED)})"
    if getattr(cfg, "use_sliding_window", False) or (
        cfg.model_type == "mistral" and getattr(cfg, "sliding_window", None)
    ):
        return "sliding-window attention"
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if layers is None or not hasattr(model, "lm_head") or not hasattr(base, "rotary_emb"):
        return "the model does not have the model.layers / rotary_emb / lm_head layout"
    attn = layers[0].self_attn
    if not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling")):
        return "attention without q/k/v/o projections"
    if getattr(attn, "sliding_window", None):
        return "sliding-window attention"
    return None


@torch.library.custom_op("distill::group_query_attention", mutates_args=())
def group_query_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    past_key: torch.Tensor,
    past_value: torch.Tensor,
    attention_mask: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    num_heads: int,
    kv_heads: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference semantics of ``com.microsoft.GroupQueryAttention`` (what the ONNX node computes).

    ``query`` [B, S, H·D], ``key``/``value`` [B, S, KV·D], ``past_*`` [B, KV, P, D] (P = 0 on the
    first call), ``attention_mask`` [B, P + S]. Row b holds ``L = sum(mask[b])`` valid positions after
    this call: its past is ``past[b, :, :L - S]`` (P = 0: none), its new tokens go right after, and
    query i attends causally to positions ``0 .. L - S + i``. Queries and new keys are rotated at
    their positions with ``cos_cache``/``sin_cache`` [≥ L, D/2] (rotate-half layout). Returns (output [B, S, H·D],
    present_key, present_value [B, KV, P + S, D]); present positions past a row's length are zero.
    """
    b, s, _ = query.shape
    d = query.shape[-1] // num_heads
    p = past_key.shape[2]
    lengths = attention_mask.sum(-1).tolist()
    # rotary at each row's own positions (past + i)
    first = torch.tensor([int(n) - s if p > 0 else 0 for n in lengths])
    positions = first[:, None] + torch.arange(s)
    cos = torch.cat([cos_cache[positions]] * 2, -1)[:, :, None]
    sin = torch.cat([sin_cache[positions]] * 2, -1)[:, :, None]
    q = query.view(b, s, num_heads, d)
    k = key.view(b, s, kv_heads, d)
    q = (q * cos + _rotate_half(q) * sin).transpose(1, 2)
    k = (k * cos + _rotate_half(k) * sin).transpose(1, 2)
    v = value.view(b, s, kv_heads, d).transpose(1, 2)
    present_k = past_key.new_zeros(b, kv_heads, p + s, d)
    present_v = past_value.new_zeros(b, kv_heads, p + s, d)
    out = query.new_zeros(b, num_heads, s, d)
    for r in range(b):
        past = int(lengths[r]) - s if p > 0 else 0
        present_k[r, :, :past], present_v[r, :, :past] = past_key[r, :, :past], past_value[r, :, :past]
        present_k[r, :, past : past + s], present_v[r, :, past : past + s] = k[r], v[r]
        keys = present_k[r, :, : past + s].repeat_interleave(num_heads // kv_heads, 0)
        values = present_v[r, :, : past + s].repeat_interleave(num_heads // kv_heads, 0)
        scores = (q[r] @ keys.transpose(-1, -2)) * scale
        causal = torch.arange(past + s) > (past + torch.arange(s))[:, None]
        out[r] = scores.masked_fill(causal, float("-inf")).softmax(-1) @ values
    return out.transpose(1, 2).reshape(b, s, num_heads * d), present_k, present_v


@group_query_attention.register_fake
def _(query, key, value, past_key, past_value, attention_mask, cos_cache, sin_cache, num_heads, kv_heads, scale):
    b, s, _ = query.shape
    shape = (b, kv_heads, past_key.shape[2] + s, past_key.shape[3])
    return query.new_empty(query.shape), past_key.new_empty(shape), past_value.new_empty(shape)


@torch.library.custom_op("distill::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Reference semantics of ``SimplifiedLayerNormalization`` over the last axis (Llama's RMSNorm,
    computed in fp32)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


@rms_norm.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape)


INT32_INPUTS = ("seqlens_k", "total_sequence_length")


def _contrib_op(name: str, inputs: list[str], outputs: list[str], attributes: dict[str, str], domain: str):
    """An onnxscript op for onnxruntime's ``domain::name``. onnx does not register the schemas of
    onnxruntime's own ops, so the part of the schema used here is given: inputs typed T (float or
    float16) except the int32 ones in ``INT32_INPUTS``, optional attributes of the given kinds."""
    import onnx
    import onnxscript

    P, A = onnx.defs.OpSchema.FormalParameter, onnx.defs.OpSchema.Attribute
    kinds = {"int": onnx.defs.OpSchema.AttrType.INT, "float": onnx.defs.OpSchema.AttrType.FLOAT}
    schema = onnx.defs.OpSchema(
        name,
        domain,
        1,
        inputs=[P(i, "M" if i in INT32_INPUTS else "T") for i in inputs],
        outputs=[P(o, "T") for o in outputs],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("M", ["tensor(int32)"], "")],
        attributes=[A(a, kinds[k], "", required=False) for a, k in attributes.items()],
    )
    # SimplifiedLayerNormalization lives in onnxruntime's registration of the default domain.
    return onnxscript.values.Op(onnxscript.values.Opset(domain, 1 if domain else 18), name, schema)


def onnx_translation() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export``: each custom op → one onnxruntime node."""
    import onnxscript
    from onnxscript import opset18 as op

    gqa = _contrib_op(
        "GroupQueryAttention",
        ["query", "key", "value", "past_key", "past_value", *INT32_INPUTS, "cos_cache", "sin_cache"],
        ["output", "present_key", "present_value"],
        {"num_heads": "int", "kv_num_heads": "int", "scale": "float", "do_rotary": "int"},
        "com.microsoft",
    )
    norm = _contrib_op("SimplifiedLayerNormalization", ["X", "scale"], ["Y"], {"axis": "int", "epsilon": "float"}, "")
    int32 = onnxscript.INT32.dtype

    def attention(query, key, value, past_key, past_value, mask, cos_cache, sin_cache, num_heads, kv_heads, scale):
        lengths = op.ReduceSum(mask, op.Constant(value_ints=[1]), keepdims=0)
        seqlens_k = op.Cast(op.Sub(lengths, op.Constant(value_int=1)), to=int32)
        total = op.Cast(op.Gather(op.Shape(mask), op.Constant(value_int=1)), to=int32)
        return gqa(
            query,
            key,
            value,
            past_key,
            past_value,
            seqlens_k,
            total,
            cos_cache,
            sin_cache,
            do_rotary=1,
            num_heads=num_heads,
            kv_num_heads=kv_heads,
            scale=scale,
        )

    def rms(x, weight, eps):
        return norm(x, weight, axis=-1, epsilon=eps)

    return {
        torch.ops.distill.group_query_attention.default: attention,
        torch.ops.distill.rms_norm.default: rms,
    }


def _norm(module, x):
    """``module`` (an RMSNorm) as one fused node."""
    return torch.ops.distill.rms_norm(x, module.weight, float(module.variance_epsilon))


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class FusedDecoder(torch.nn.Module):
    """The HF model's own modules (embedding, norms, projections, MLPs, rotary tables, LM head) run
    layer by layer around one fused attention call each; same flat signature as the generic export."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        cfg = model.config.get_text_config(decoder=True)
        self.num_heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads

    def forward(self, input_ids, attention_mask, position_ids, *past):
        base = self.model.model
        hidden = base.embed_tokens(input_ids)
        # The model's own rotary tables (rope scaling included) for positions 0 .. total - 1, [total, D/2];
        # the attention node rotates each row at its own positions.
        positions = torch.arange(attention_mask.shape[1], device=input_ids.device)[None]
        cos, sin = base.rotary_emb(hidden, positions)
        cos_cache, sin_cache = cos[0, :, : self.head_dim // 2], sin[0, :, : self.head_dim // 2]
        b, s = input_ids.shape
        presents = []
        for i, layer in enumerate(base.layers):
            attn = layer.self_attn
            x = _norm(layer.input_layernorm, hidden)
            q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
            if hasattr(attn, "q_norm"):  # qwen3: per-head RMSNorm before the rotation
                q = _norm(attn.q_norm, q.view(b, s, self.num_heads, self.head_dim)).reshape(b, s, -1)
                k = _norm(attn.k_norm, k.view(b, s, self.kv_heads, self.head_dim)).reshape(b, s, -1)
            out, present_k, present_v = torch.ops.distill.group_query_attention(
                q,
                k,
                v,
                past[2 * i],
                past[2 * i + 1],
                attention_mask,
                cos_cache,
                sin_cache,
                self.num_heads,
                self.kv_heads,
                float(attn.scaling),
            )
            hidden = hidden + attn.o_proj(out)
            hidden = hidden + layer.mlp(_norm(layer.post_attention_layernorm, hidden))
            presents += [present_k, present_v]
        logits = self.model.lm_head(_norm(base.norm, hidden))
        return (logits, *presents)
