"""SmoothQuant-style scale folding: move activation outliers into weights before int8 quantization.

Dynamic int8 quantizes each activation tensor with one scale, so a few outlier channels (common in
the MLP down-projection input of small LMs) crush the resolution of all others. For a linear layer
fed by ``x``, scaling channel ``j`` of ``x`` by ``1/s_j`` and row ``j`` of the weight by ``s_j`` changes
nothing in exact arithmetic; the divide is folded into the op that produces ``x`` (an RMSNorm weight,
or the up-projection), so the exported graph gains no node. ``s_j = max|x_j|^α / max|W_j|^(1-α)``
(Xiao et al. 2023), with ``max|x_j|`` calibrated on real prompts.
"""

from __future__ import annotations

# Norms computing ``weight * normalized(x)`` (not ``(1 + weight) * ...`` as Gemma's do).
_PLAIN_RMSNORMS = {"LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm", "Olmo2RMSNorm"}


def _layers(model):
    decoder = model.get_decoder()
    return getattr(decoder, "layers", [])


def smoothable(model) -> bool:
    """True for Llama-style blocks (RMSNorm → q/k/v, RMSNorm → gate/up, act(gate)·up → down)."""
    layers = _layers(model)
    if not len(layers):
        return False
    layer = layers[0]
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    return (
        all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj"))
        and all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj"))
        and type(layer.input_layernorm).__name__ in _PLAIN_RMSNORMS
        and type(layer.post_attention_layernorm).__name__ in _PLAIN_RMSNORMS
    )


def calibrate(model, batches) -> dict[str, torch.Tensor]:  # noqa: F821
    """Per-input-channel max |activation| entering every q/gate/down projection, over ``batches``
    (dicts with ``input_ids`` and ``attention_mask``)."""
    import torch

    stats: dict[str, torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(_layers(model)):
        for name, mod in (
            ("qkv", layer.self_attn.q_proj),
            ("gate_up", layer.mlp.gate_proj),
            ("down", layer.mlp.down_proj),
        ):
            key = f"{i}.{name}"

            def hook(_m, args, key=key):
                x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float()
                stats[key] = torch.maximum(stats[key], x) if key in stats else x

            hooks.append(mod.register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            for b in batches:
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    finally:
        for h in hooks:
            h.remove()
    return stats


def _scales(act_max, weights, alpha: float):
    import torch

    w_max = torch.cat([w.abs() for w in weights], dim=0).amax(0).float().clamp(min=1e-5)
    s = act_max.clamp(min=1e-5).pow(alpha) / w_max.pow(1 - alpha)
    return s.clamp(min=1e-5)


def smooth(model, stats: dict, alpha: float = 0.5, parts: tuple[str, ...] = ("qkv", "gate_up", "down")) -> int:
    """Fold smoothing scales into ``model`` in place; returns how many linear groups were smoothed."""
    import torch

    done = 0
    with torch.no_grad():
        for i, layer in enumerate(_layers(model)):
            attn, mlp = layer.self_attn, layer.mlp
            groups = {
                "qkv": (layer.input_layernorm.weight, None, [attn.q_proj, attn.k_proj, attn.v_proj]),
                "gate_up": (layer.post_attention_layernorm.weight, None, [mlp.gate_proj, mlp.up_proj]),
                "down": (None, mlp.up_proj, [mlp.down_proj]),
            }
            for part in parts:
                key = f"{i}.{part}"
                if key not in stats:
                    continue
                norm_w, producer, consumers = groups[part]
                s = _scales(stats[key], [c.weight for c in consumers], alpha)
                if norm_w is not None:
                    norm_w.div_(s.to(norm_w.dtype))
                else:  # act(gate) * up: dividing up's output rows divides the product
                    producer.weight.div_(s.to(producer.weight.dtype)[:, None])
                    if producer.bias is not None:
                        producer.bias.div_(s.to(producer.bias.dtype))
                for c in consumers:
                    c.weight.mul_(s.to(c.weight.dtype)[None, :])
                done += 1
    return done


def calibration_texts(tokenizer, rows: list[dict]) -> list[str]:
    """Each row's prompt (through the student's chat template) followed by its target rationale: the
    text SmoothQuant calibrates on (rows of the distilled training set: ``question``, ``rationale``)."""
    from distill.students.data import prompt_template, render_prompt

    template = prompt_template(tokenizer)
    return [render_prompt(template, r["question"]) + r["rationale"] for r in rows]


def smooth_on_texts(model, tokenizer, texts: list[str], alpha: float) -> int:
    """Calibrate on ``texts`` (one batch each) and fold the scales into ``model`` in place; returns how
    many linear groups were smoothed."""
    batches = [dict(tokenizer(t, return_tensors="pt", add_special_tokens=False)) for t in texts]
    return smooth(model, calibrate(model, batches), alpha)
