"""Budgets of a generation job: estimated spend, and the error that stops a job cleanly at its cap."""

from __future__ import annotations

from distill.core.errors import DistillError


class BudgetExceeded(DistillError):
    """The job spent its token or cost budget; committed shards stay and ``resume`` continues."""


def cost_of(tokens_in: int, tokens_out: int, cfg) -> float:
    """Estimated spend from the recipe's per-1k-token prices."""
    return tokens_in / 1000 * cfg.price_per_1k_input + tokens_out / 1000 * cfg.price_per_1k_output


# Stop when this many rows came back and not one had a parsable answer: something is wrong with
# the prompt or the model, and the rest of the job would be paid for nothing.
EARLY_STOP_ROWS = 32


class GenerationMeter:
    """Counts what a generation job got back (rows, correct, tokens, cache hits, parse errors,
    failures) and stops it early: no parsable answer in the first rows, or the budget reached.

    ``cfg`` carries the prices and caps (``price_per_1k_input/output``, ``max_tokens``, ``max_cost``)."""

    def __init__(self, total: int, cfg):
        import time

        self.cfg = cfg
        self.t0 = time.time()
        self.stats = {
            "rows": 0,
            "correct": 0,
            "tokens_in": 0,
            "tokens_out": 0,
            "cached": 0,
            "parse_errors": 0,
            "failed": 0,
            "total": total,
        }

    def count(self, batch) -> None:
        """Add a batch of output rows (a failed row is retried later: it is counted as failed, not done)."""
        import pyarrow.compute as pc

        s = self.stats
        failed = pc.is_valid(batch["error"])
        s["failed"] += pc.sum(failed).as_py() or 0
        batch = batch.filter(pc.invert(failed))
        s["rows"] += batch.num_rows
        s["correct"] += pc.sum(batch["correct"]).as_py() or 0
        s["tokens_in"] += pc.sum(batch["tokens_in"]).as_py() or 0
        s["tokens_out"] += pc.sum(batch["tokens_out"]).as_py() or 0
        s["cached"] += pc.sum(batch["cached"]).as_py() or 0
        s["parse_errors"] += batch.num_rows - pc.count(batch["pred"]).as_py()

    def snapshot(self) -> dict:
        """The counts, seconds so far and estimated cost."""
        import time

        s = self.stats
        return {**s, "seconds": time.time() - self.t0, "cost": cost_of(s["tokens_in"], s["tokens_out"], self.cfg)}

    def status(self) -> str:
        """One progress-bar line: correct/done, failures, generation rate."""
        snap = self.snapshot()
        failed = f", {snap['failed']} failed" if snap["failed"] else ""
        rate = snap["tokens_out"] / max(snap["seconds"], 1e-9)
        return f"{snap['correct']}/{snap['rows']} correct{failed}, {rate:.0f} tok/s"

    def check(self) -> None:
        """Raise when the job must stop now: DistillError (nothing parsable), BudgetExceeded (cap reached)."""
        snap, cfg = self.snapshot(), self.cfg
        if snap["rows"] >= min(EARLY_STOP_ROWS, snap["total"]) and snap["rows"] == snap["parse_errors"]:
            raise DistillError(
                f"the teacher gave no parsable answer for any of the first {snap['rows']} problems",
                "check the teacher model, its prompt (teacher.trigger, teacher.prompt_template), "
                "task.answer_type and teacher.max_new_tokens; committed rows are kept",
            )
        tokens = snap["tokens_in"] + snap["tokens_out"]
        if (cfg.max_tokens and tokens >= cfg.max_tokens) or (cfg.max_cost and snap["cost"] >= cfg.max_cost):
            raise BudgetExceeded(
                f"budget reached after {snap['rows']}/{snap['total']} rows ({tokens} tokens, cost {snap['cost']:.4f})",
                "raise teacher.max_tokens / teacher.max_cost and resume; committed rows are kept",
            )
