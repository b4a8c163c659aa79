"""Training losses as pure functions on tensors."""

from __future__ import annotations

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
