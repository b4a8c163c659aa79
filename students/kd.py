"""Logit distillation from the teacher's stored top-k log-probabilities.

``forward_kl`` and ``jsd`` read the teacher's token ids as the student's (shared tokenizer only);
``uld`` compares sorted probabilities only, so teacher and student may tokenize differently.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distill.students.losses import completion_positions, topk_forward_kl, topk_generalized_jsd, uld_loss


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
    kd_ids: torch.Tensor | None,
    kd_logprobs: torch.Tensor,
    kd_mask: torch.Tensor,
    loss: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    weight: float = 0.5,
    parts: dict | None = None,
):
    """``(1 - weight) * CE + weight * KD`` at target positions only; returns (loss, n target tokens).

    ``kd_ids``/``kd_logprobs`` [B, T, K] hold the teacher's top-k for the token at each position
    where ``kd_mask`` [B, T] is set; position t's logits predict token t + 1, as for the labels.
    ``loss="uld"`` reads only the log-probabilities (``kd_ids`` may be None): the teacher's
    distribution for the student's token at a position, aligned by index (``data.uld_example``).
    With ``parts`` (a dict), the KD term alone is stored there under ``"kd"`` (detached, for logging).
    """
    b, t, y = completion_positions(labels)
    logits = lm_head(hidden[b, t]).float()
    n = y.numel()
    ce = F.cross_entropy(logits, y, reduction="sum") / max(n, 1)
    m = kd_mask[:, 1:][b, t]
    if not bool(m.any()) or weight == 0:
        return ce, torch.tensor(n)
    lps = kd_logprobs[:, 1:][b, t][m]
    if loss == "uld":
        kd = uld_loss(logits[m], lps, temperature)
    elif loss == "forward_kl":
        kd = topk_forward_kl(logits[m], kd_ids[:, 1:][b, t][m], lps, temperature)
    else:
        kd = topk_generalized_jsd(logits[m], kd_ids[:, 1:][b, t][m], lps, beta=beta, temperature=temperature)
    if parts is not None:
        parts["kd"] = kd.detach()
    return (1.0 - weight) * ce + weight * kd, torch.tensor(n)
