"""Student architectures: a smaller copy of a model keeping some of its layers, or a model built
from a config.

``keep_layers`` is DistilBERT's initialisation (Sanh et al. 2019): the student is the teacher with
every other layer (or any chosen subset) removed, so it starts from trained weights.
"""

from __future__ import annotations

import json
from pathlib import Path

from distill.core.errors import DistillError


def keep_layers(model, layers: list[int]):
    """``model`` (modified in place) with only the decoder ``layers`` kept, in order; returns it.

    The config says the new depth, so ``save_pretrained`` writes a model that loads on its own.
    """
    import torch

    decoder = model.get_decoder()
    old = decoder.layers
    bad = [i for i in layers if i >= len(old)]
    if bad:
        raise DistillError(
            f"student.layers {bad} out of range: the model has {len(old)} layers",
            f"pick indices in 0..{len(old) - 1}",
        )
    decoder.layers = torch.nn.ModuleList([old[i] for i in layers])
    for new_index, layer in enumerate(decoder.layers):
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = new_index  # the KV cache is indexed by position in the stack
    config = model.config
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in layers]
    config.num_hidden_layers = len(layers)
    return model


def read_config_spec(spec: str) -> tuple[dict, Path | None]:
    """(config dict, folder it came from) for ``config:<config.json | folder | inline JSON>``."""
    spec = spec.removeprefix("config:").strip()
    if spec.startswith("{"):
        try:
            return json.loads(spec), None
        except json.JSONDecodeError as e:
            raise DistillError(f"student config JSON is invalid ({e})", "write config:{...} as valid JSON") from None
    path = Path(spec)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise DistillError(f"student config {file} does not exist", "point config: at a config.json or its folder")
    return json.loads(file.read_text()), file.parent


def model_from_config(spec: str, vocab_size: int, seed: int = 0):
    """A randomly initialised causal LM from ``config:<...>`` (deterministic for ``seed``)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    data, _ = read_config_spec(spec)
    if "model_type" not in data:
        raise DistillError("student config has no model_type", 'add e.g. "model_type": "llama" to the config')
    data = dict(data)
    config = AutoConfig.for_model(data.pop("model_type"), **data)
    if config.vocab_size < vocab_size:
        raise DistillError(
            f"student config vocab_size {config.vocab_size} is smaller than the tokenizer ({vocab_size} tokens)",
            f"set vocab_size to at least {vocab_size}",
        )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)
