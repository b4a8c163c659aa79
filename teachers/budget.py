"""Budgets of a generation job: estimated spend, and the error that stops a job cleanly at its cap."""

from __future__ import annotations

from distill.core.errors import DistillError


class BudgetExceeded(DistillError):
    """The job spent its token or cost budget; committed shards stay and ``resume`` continues."""


def cost_of(tokens_in: int, tokens_out: int, cfg) -> float:
    """Estimated spend from the recipe's per-1k-token prices."""
    return tokens_in / 1000 * cfg.price_per_1k_input + tokens_out / 1000 * cfg.price_per_1k_output
