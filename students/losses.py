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
