"""Logit distillation from the teacher's stored top-k log-probabilities (shared tokenizer only)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distill.students.losses import completion_positions, topk_forward_kl, topk_generalized_jsd


def tokenizer_mismatch(teacher_source: str, student_tokenizer) -> str | None:
    """Why the teacher's token ids cannot be read as the student's (None when both tokenizers agree)."""
    from transformers import AutoTokenizer

    from distill.core.sources import resolve_model

    teacher = AutoTokenizer.from_pretrained(resolve_model(teacher_source))
    if teacher.get_vocab() != student_tokenizer.get_vocab():
        return f"teacher and student tokenizers differ ({len(teacher)} vs {len(student_tokenizer)} tokens)"
    return None


def selected_kd_loss(
    hidden: torch.Tensor,
    lm_head,
    labels: torch.Tensor,
    kd_ids: torch.Tensor,
    kd_logprobs: torch.Tensor,
    kd_mask: torch.Tensor,
    loss: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    weight: float = 0.5,
):
    """``(1 - weight) * CE + weight * KD`` at target positions only; returns (loss, n target tokens).

    ``kd_ids``/``kd_logprobs`` [B, T, K] hold the teacher's top-k for the token at each position
    where ``kd_mask`` [B, T] is set; position t's logits predict token t + 1, as for the labels.
    """
    b, t, y = completion_positions(labels)
    logits = lm_head(hidden[b, t]).float()
    n = y.numel()
    ce = F.cross_entropy(logits, y, reduction="sum") / max(n, 1)
    m = kd_mask[:, 1:][b, t]
    if not bool(m.any()) or weight == 0:
        return ce, torch.tensor(n)
    ids, lps = kd_ids[:, 1:][b, t][m], kd_logprobs[:, 1:][b, t][m]
    if loss == "forward_kl":
        kd = topk_forward_kl(logits[m], ids, lps, temperature)
    else:
        kd = topk_generalized_jsd(logits[m], ids, lps, beta=beta, temperature=temperature)
    return (1.0 - weight) * ce + weight * kd, torch.tensor(n)
