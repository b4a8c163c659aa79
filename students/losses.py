"""Training losses as pure functions on tensors."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def completion_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100):
    """Mean next-token cross-entropy over positions whose label is not ``ignore_index``.

    ``logits`` [B, T, V] predict token t+1 from position t; ``labels`` [B, T] are the input ids with
    prompt and padding set to ``ignore_index``. Returns (loss, number of target tokens).
    """
    shift_logits = logits[:, :-1, :].reshape(-1, logits.size(-1)).float()
    shift_labels = labels[:, 1:].reshape(-1)
    n = (shift_labels != ignore_index).sum()
    loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=ignore_index, reduction="sum")
    return loss / n.clamp(min=1), n


def completion_positions(labels: torch.Tensor, ignore_index: int = -100):
    """(batch index, position, next-token target) of every position that predicts a target token.

    Position t predicts label t+1; only those are worth projecting through the (large) LM head.
    """
    targets = labels[:, 1:]
    b, t = (targets != ignore_index).nonzero(as_tuple=True)
    return b, t, targets[b, t]


def selected_cross_entropy(hidden: torch.Tensor, lm_head, labels: torch.Tensor, ignore_index: int = -100):
    """Completion-only cross-entropy computing logits only at target positions.

    Equal to ``completion_cross_entropy(lm_head(hidden), labels)`` without materialising prompt
    logits (the LM head is a large share of a small model's compute). Returns (loss, n targets).
    """
    b, t, y = completion_positions(labels, ignore_index)
    logits = lm_head(hidden[b, t]).float()
    n = y.numel()
    return F.cross_entropy(logits, y, reduction="sum") / max(n, 1), torch.tensor(n)


def multitask_loss(label_loss: torch.Tensor, rationale_loss: torch.Tensor, alpha: float) -> torch.Tensor:
    """Distilling step-by-step: ``alpha * label + (1 - alpha) * rationale`` (Hsieh et al. 2023)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return alpha * label_loss + (1.0 - alpha) * rationale_loss


def _topk_log_probs(student_logits, teacher_ids, teacher_logprobs, temperature: float):
    """Student and teacher log-probabilities on the teacher's top-k support, both renormalised there.

    The teacher stored only its top-k tokens, so both distributions are compared on that support.
    """
    s = F.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, teacher_ids)
    t = teacher_logprobs.float() / temperature
    return s - torch.logsumexp(s, -1, keepdim=True), t - torch.logsumexp(t, -1, keepdim=True)


def topk_forward_kl(student_logits, teacher_ids, teacher_logprobs, temperature: float = 1.0) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) on the teacher's top-k, times T² (Hinton et al.).

    ``student_logits`` [N, V]; ``teacher_ids`` [N, K] token ids; ``teacher_logprobs`` [N, K].
    """
    s, t = _topk_log_probs(student_logits, teacher_ids, teacher_logprobs, temperature)
    kl = (t.exp() * (t - s)).sum(-1)
    return kl.mean() * temperature**2


def topk_generalized_jsd(
    student_logits, teacher_ids, teacher_logprobs, beta: float = 0.5, temperature: float = 1.0
) -> torch.Tensor:
    """Generalized JSD (Agarwal et al. 2024, TRL's GKD) on the teacher's top-k support.

    ``beta * KL(teacher || m) + (1 - beta) * KL(student || m)`` with ``m = beta * teacher +
    (1 - beta) * student``; beta 0 is forward KL(teacher || student), beta 1 reverse KL.
    """
    s, t = _topk_log_probs(student_logits, teacher_ids, teacher_logprobs, temperature)
    if beta == 0:
        return (t.exp() * (t - s)).sum(-1).mean()
    if beta == 1:
        return (s.exp() * (s - t)).sum(-1).mean()
    m = torch.logsumexp(torch.stack([s + math.log(1 - beta), t + math.log(beta)]), dim=0)
    kl_t = (t.exp() * (t - m)).sum(-1)
    kl_s = (s.exp() * (s - m)).sum(-1)
    return (beta * kl_t + (1 - beta) * kl_s).mean()


def uld_loss(student_logits, teacher_logprobs, temperature: float = 1.0) -> torch.Tensor:
    """Universal Logit Distillation (Boizard et al. 2024) on the teacher's top-k: the mean over positions
    of the L1 distance between the student's and the teacher's probabilities, each sorted descending.

    ``student_logits`` [N, V] over the student's vocabulary; ``teacher_logprobs`` [N, K] the teacher's
    stored top-k over its own. Sorting forgets which token holds which probability: the loss compares
    only the multisets of probability values (the sorted L1 is ``K`` times the 1-D Wasserstein-1 between
    them, ULD's closed form), so it is unchanged by any permutation of either vocabulary and needs no
    token correspondence at all. Both sides are their top-k renormalised at ``temperature`` (the
    teacher's tail beyond k was not stored), as in ``topk_forward_kl``; a student vocabulary smaller
    than k is padded with zero probabilities, as ULD pads the smaller vocabulary.
    """
    k = teacher_logprobs.size(-1)
    top = (student_logits.float() / temperature).topk(min(k, student_logits.size(-1)), dim=-1).values
    s = F.pad(torch.softmax(top, dim=-1), (0, k - top.size(-1)))
    t = torch.softmax(teacher_logprobs.float() / temperature, dim=-1).sort(dim=-1, descending=True).values
    return (s - t).abs().sum(-1).mean()
