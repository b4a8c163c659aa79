"""Budgets of a generation job: estimated spend, and the error that stops a job cleanly at its cap."""

from __future__ import annotations

from distill.core.errors import DistillError


class BudgetExceeded(DistillError):
    """The job spent its token or cost budget; committed shards stay and ``resume`` continues."""


class PartialRun(DistillError):
    """The teacher failed on some rows (retries spent), so the run is partial: ``distill run`` stops
    after generate unless partial runs are allowed, and the CLI exits with ``exit_code``. Failed rows
    count in no accuracy and train nothing; running the same command again retries only them."""

    exit_code = 3

    @classmethod
    def from_metrics(cls, gen: dict, stopped_before: str | None = None, allowed: bool = False) -> PartialRun:
        """The one line for a generate stage's metrics with failed rows. ``stopped_before``: the stage
        the run stopped before (None: it stopped nowhere, generate was the last stage or the run went
        on); ``allowed``: partial runs were allowed (``--allow-partial``)."""
        what = (
            f"the teacher failed on {gen['failed_rows']} of {gen['problems']} rows "
            f"({failures_text(gen.get('failures', []))})"
        )
        retry = "rerun the same command to retry only the failed rows"
        kept = gen.get("train_rows_kept", 0)
        if allowed and stopped_before:
            return cls(f"{what}: the run is partial and no train rationale was kept, nothing to train on", retry)
        if allowed:
            return cls(f"{what}: the run is partial, the student learned from the rows that succeeded", retry)
        if stopped_before:
            go_on = f", or pass --allow-partial to train on the {kept} rationales kept" if kept else ""
            return cls(f"{what}: the run is partial and stopped before {stopped_before}", retry + go_on)
        go_on = f" (`distill run --allow-partial` trains on the {kept} rationales kept)" if kept else ""
        return cls(f"{what}: the run is partial", retry + go_on)


def count_failures(errors: list[str]) -> list[dict]:
    """Each distinct reason of failed rows with its row count, most common first (ties by reason)."""
    from collections import Counter

    counts = Counter(errors)
    return [{"reason": r, "rows": n} for r, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def failures_text(failures: list[dict], top: int = 2, width: int = 160) -> str:
    """The most common reasons as one short phrase: ``ClientConnectorError: ... ×8; HTTP 503 ×1``."""
    shown = [
        f"{f['reason'] if len(f['reason']) <= width else f['reason'][: width - 1] + '…'} ×{f['rows']}"
        for f in failures[:top]
    ]
    if len(failures) > top:
        shown.append(f"{len(failures) - top} other reason{'s' if len(failures) - top > 1 else ''}")
    return "; ".join(shown) or "no reason recorded"


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
            # what this job paid for: rows not served from the cache (a resumed job counts its earlier
            # attempts' paid rows again from their shards); the budget caps count only these
            "paid_tokens_in": 0,
            "paid_tokens_out": 0,
            "parse_errors": 0,
            "unrecorded": 0,  # replay: problems the recording lacks (skipped, not unparsable answers)
            "failed": 0,
            "total": total,
            # requests to the teacher (and judge) made by this run, and those not served by the cache; rows
            # committed by an earlier run count in its figures, not here
            "calls": 0,
            "paid_calls": 0,
        }
        if getattr(cfg, "judge", None) is not None:  # the judge's calls, counted apart from the teacher's
            self.stats.update(judge_tokens_in=0, judge_tokens_out=0, paid_judge_tokens_in=0, paid_judge_tokens_out=0)
            self.stats.update(judged=0, judge_unparsed=0)

    def count_calls(self, calls: int, paid: int) -> None:
        self.stats["calls"] += calls
        self.stats["paid_calls"] += paid

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
        paid = batch.filter(pc.invert(pc.fill_null(batch["cached"], False)))
        s["paid_tokens_in"] += pc.sum(paid["tokens_in"]).as_py() or 0
        s["paid_tokens_out"] += pc.sum(paid["tokens_out"]).as_py() or 0
        s["parse_errors"] += batch.num_rows - pc.count(batch["pred"]).as_py()
        if "judge_tokens_in" in batch.column_names and "judged" in s:
            asked = batch.filter(pc.is_valid(batch["judge_tokens_in"]))
            s["judged"] += asked.num_rows
            s["judge_unparsed"] += asked.num_rows - pc.count(asked["judge_score"]).as_py()
            s["judge_tokens_in"] += pc.sum(asked["judge_tokens_in"]).as_py() or 0
            s["judge_tokens_out"] += pc.sum(asked["judge_tokens_out"]).as_py() or 0
            paid = asked.filter(pc.invert(pc.fill_null(asked["judge_cached"], False)))
            s["paid_judge_tokens_in"] += pc.sum(paid["judge_tokens_in"]).as_py() or 0
            s["paid_judge_tokens_out"] += pc.sum(paid["judge_tokens_out"]).as_py() or 0
        if "parse_error" in batch.column_names:
            from distill.teachers.replay import NO_RECORDING

            s["unrecorded"] += pc.sum(pc.equal(batch["parse_error"], NO_RECORDING)).as_py() or 0

    def snapshot(self) -> dict:
        """The counts, seconds so far, the estimated cost of every row and what this job paid (``paid_cost``:
        rows served from the cache were paid once, by whichever run first asked)."""
        import time

        s = self.stats
        snap = {
            **s,
            "seconds": time.time() - self.t0,
            "cost": cost_of(s["tokens_in"], s["tokens_out"], self.cfg),
            "paid_cost": cost_of(s["paid_tokens_in"], s["paid_tokens_out"], self.cfg),
        }
        if "judged" in s:  # the judge's cost at its own prices, apart from the teacher's
            snap["judge_cost"] = cost_of(s["judge_tokens_in"], s["judge_tokens_out"], self.cfg.judge)
            snap["paid_judge_cost"] = cost_of(s["paid_judge_tokens_in"], s["paid_judge_tokens_out"], self.cfg.judge)
        return snap

    def status(self) -> str:
        """One progress-bar line: correct/done, failures, generation rate."""
        snap = self.snapshot()
        failed = f", {snap['failed']} failed" if snap["failed"] else ""
        rate = snap["tokens_out"] / max(snap["seconds"], 1e-9)
        return f"{snap['correct']}/{snap['rows']} correct{failed}, {rate:.0f} tok/s"

    def check(self) -> None:
        """Raise when the job must stop now: DistillError (nothing parsable), BudgetExceeded (cap reached)."""
        snap, cfg = self.snapshot(), self.cfg
        answered = snap["rows"] - snap["unrecorded"]  # a replay's missing recordings are not the teacher's fault
        if (
            answered >= min(EARLY_STOP_ROWS, snap["total"] - snap["unrecorded"])
            and answered > 0
            and answered == snap["parse_errors"] - snap["unrecorded"]
        ):
            raise DistillError(
                f"the teacher gave no parsable answer for any of the first {answered} problems",
                "check the teacher model, its prompt (teacher.trigger, teacher.prompt_template), "
                "task.answer_type and teacher.max_new_tokens; committed rows are kept",
            )
        tokens = snap["paid_tokens_in"] + snap["paid_tokens_out"]  # cached rows are free: never paid twice
        spent = snap["paid_cost"]
        if "judged" in snap:  # the judge's calls spend the same budget
            tokens += snap["paid_judge_tokens_in"] + snap["paid_judge_tokens_out"]
            spent += snap["paid_judge_cost"]
        if (cfg.max_tokens and tokens >= cfg.max_tokens) or (cfg.max_cost and spent >= cfg.max_cost):
            raise BudgetExceeded(
                f"budget reached after {snap['rows']}/{snap['total']} rows ({tokens} tokens paid, cost {spent:.4f})",
                "raise teacher.max_tokens / teacher.max_cost and resume; committed rows are kept",
            )
