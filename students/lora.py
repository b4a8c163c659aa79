"""LoRA students (PEFT): adapters trained on a frozen base, merged into its weights before saving.

Merging makes the saved student an ordinary ``save_pretrained`` folder, so export and evaluation
see no difference between a LoRA and a fully fine-tuned student.
"""

from __future__ import annotations


def add_lora(model, settings, seed: int = 0):
    """``model`` wrapped with LoRA adapters per ``settings`` (a ``LoraSettings``); only they train."""
    import torch

    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        from distill.core.errors import DistillError

        raise DistillError("student.lora needs peft", "pip install 'distill[trl]' (peft 0.21)") from None

    torch.manual_seed(seed)  # adapter A matrices are random: same seed, same start
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def merge_lora(model):
    """The plain transformers model with every adapter folded into its base weights."""
    return model.merge_and_unload()


def trainable_parameters(model) -> int:
    """Number of parameters that receive gradients."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
