"""Student models: loaded from a model source, built from a config or copied smaller from the teacher,
cut to a layer subset, LoRA-wrapped."""

from __future__ import annotations

from distill.core.errors import DistillError
from distill.core.sources import resolve_model


def load_student(source: str, tokenizer_source: str | None = None, seed: int = 0):
    """(model, tokenizer) for a student source, fp32, one CPU thread.

    ``config:<...>`` sources build a randomly initialised model (seeded) with ``tokenizer_source``'s
    tokenizer, or the tokenizer saved beside the config.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    if source.startswith("config:"):
        from distill.students.architecture import model_from_config, read_config_spec

        _, folder = read_config_spec(source)
        if tokenizer_source is None and folder is None:
            raise DistillError("a config: student needs a tokenizer", "set student.tokenizer to a model source")
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(tokenizer_source) if tokenizer_source else folder)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = model_from_config(source, len(tokenizer), seed)
        return (model.cuda() if torch.cuda.is_available() else model), tokenizer
    path = resolve_model(source)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(tokenizer_source) if tokenizer_source else path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:  # safetensors only: a pickle checkpoint can run code on load
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True)
    except OSError as e:
        raise DistillError(
            f"{path} has no loadable safetensors weights ({str(e).splitlines()[0][:120]})",
            "save the model with save_pretrained(..., safe_serialization=True); pickle checkpoints are not loaded",
        ) from None
    if torch.cuda.is_available():
        model = model.cuda()
    return model, tokenizer


def teacher_copy(teacher_source: str | None, shape, seed: int = 0):
    """(model, tokenizer): a smaller copy of the teacher ``teacher_source`` with its tokenizer, cut to
    ``shape.layers`` and pruned to ``shape.num_heads`` / ``shape.intermediate_size`` (None: keep all)."""
    if not teacher_source or teacher_source.startswith(("replay:", "openai:")):
        raise DistillError(
            f"student.from_teacher copies the teacher's weights, and teacher {teacher_source or '(none)'} has none",
            "use a local model teacher (hf:/gguf:/embedded:) or set student.from_teacher=null",
        )
    from distill.students.shrink import shrink

    model, tokenizer = load_student(teacher_source, None, seed)
    return shrink(model, shape.layers, shape.num_heads, shape.intermediate_size), tokenizer


def build_student(cfg, teacher_source: str | None = None):
    """(model, tokenizer) ready to train for a ``StudentConfig``: loaded or built from a config (or,
    with ``cfg.from_teacher``, a smaller copy of ``teacher_source``), cut to ``cfg.layers``, wrapped
    with LoRA adapters when ``cfg.lora`` is set."""
    shape = getattr(cfg, "from_teacher", None)
    if shape is not None:
        model, tokenizer = teacher_copy(teacher_source, shape, cfg.seed)
    else:
        model, tokenizer = load_student(cfg.model, cfg.tokenizer, cfg.seed)
    if cfg.layers is not None:
        from distill.students.architecture import keep_layers

        keep_layers(model, cfg.layers)
    if cfg.lora is not None:
        from distill.students.lora import add_lora

        model = add_lora(model, cfg.lora, cfg.seed)
    return model, tokenizer
