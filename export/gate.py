"""The quality gate: score every exported variant on a gate split (``export.gate_size`` problems
disjoint from training and evaluation, or the evaluation split) through the torch-free runtime, then
keep the smallest variant whose accuracy is shown to be within a tolerance of the fp32 model's.

"Shown" is a paired test: both models answer the same problems, so the gap ``(gained - lost) / n``
depends on the discordant pairs (problems one solves and the other does not). It gets Tango's score
95% interval for a difference of paired proportions, and a variant is kept when the interval's lower
end is at or above ``-tolerance`` (non-inferiority). A variant whose 99% interval on the problems
scored so far lies entirely below ``-tolerance`` is rejected early, without scoring the rest.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# Tie order between variants of equal size (smallest kind first): int4 → int4_mixed → int8 → fp16 → fp32.
SIZE_ORDER = ["int4", "int4_mixed", "int8", "int8_static", "int8_dynamic", "fp16", "fp32"]


@dataclass
class VariantResult:
    """One row of the gate table."""

    preset: str
    file: str
    bytes: int
    accuracy: float | None = None
    correct: int | None = None
    n: int | None = None
    tokens_per_second: float | None = None
    top1_agreement: float | None = None
    greedy_identical: str | None = None
    lost: int | None = None  # gate problems fp32 solves and this variant does not
    gained: int | None = None  # and the reverse; lost - gained is the accuracy gap in problems
    error: str | None = None
    chosen: bool = False
    gap_low: float | None = None  # 95% interval of (variant - fp32) accuracy, paired
    gap_high: float | None = None
    rejected_after: int | None = None  # scoring stopped early after this many problems
    decision: str | None = None  # the gate's sentence for this variant
    first_token_ms: float | None = None  # median prompt-to-first-token time, batch 1, 1 thread
    peak_rss_bytes: int | None = None  # peak resident memory of the process that scored it alone

    def row(self) -> dict:
        return asdict(self)


def paired_changes(reference: list[bool], variant: list[bool]) -> tuple[int, int]:
    """(problems only ``reference`` solves, problems only ``variant`` solves) over the same problems:
    the discordant pairs behind an accuracy gap (a gap of 2 can be 2 vs 0 or 12 vs 10)."""
    if len(reference) != len(variant):
        raise ValueError(f"paired outcomes need the same problems ({len(reference)} vs {len(variant)})")
    lost = sum(bool(a) and not b for a, b in zip(reference, variant))
    gained = sum(bool(b) and not a for a, b in zip(reference, variant))
    return lost, gained


def _restricted_loss_rate(lost: int, gained: int, n: int, gap: float) -> float:
    """The maximum-likelihood loss rate ``q`` of the paired table under the constraint that the gain
    rate is ``q + gap`` (the root of ``2n q² + B q + C = 0``, from the multinomial likelihood)."""
    m = n - lost - gained
    b = -((lost + gained) * (1 - gap) - 2 * gap * (lost + m))
    c = -lost * gap * (1 - gap)
    return (-b + math.sqrt(max(b * b - 8 * n * c, 0.0))) / (4 * n)


def paired_gap(lost: int, gained: int, n: int, level: float = 0.95) -> tuple[float, float, float]:
    """(gap, low, high): the accuracy difference variant − reference over ``n`` paired problems and
    Tango's score interval for it (Tango 1998; recommended for paired proportions by Newcombe 1998):
    every gap Δ whose score statistic ``(ĝap − Δ) / sqrt((2q + Δ − Δ²) / n)`` is within ``z``, with
    ``q`` the loss rate's restricted maximum-likelihood estimate. Unlike an interval conditional on the
    discordant count, it accounts for how often answers change at all (no change in 200 problems
    still leaves about ±1.9 points)."""
    if n == 0:
        return 0.0, -1.0, 1.0
    z = _z(level)
    gap = (gained - lost) / n

    def score(delta: float) -> float:
        q = _restricted_loss_rate(lost, gained, n, delta)
        var = (2 * q + delta - delta * delta) / n
        return (
            (gap - delta) / math.sqrt(var)
            if var > 0
            else (math.inf if gap > delta else -math.inf if gap < delta else 0.0)
        )

    def bound(lo: float, hi: float, inside_low: bool) -> float:  # the Δ where |score| crosses z
        for _ in range(60):
            mid = (lo + hi) / 2
            if (abs(score(mid)) <= z) == inside_low:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    low = -1.0 if abs(score(-1.0 + 1e-12)) <= z else bound(gap, -1.0, True)
    high = 1.0 if abs(score(1.0 - 1e-12)) <= z else bound(gap, 1.0, True)
    return gap, low, high


def _z(level: float) -> float:
    """The standard normal quantile for a two-sided ``level`` (inverse error function by bisection)."""
    lo, hi = 0.0, 10.0
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if math.erf(mid / math.sqrt(2)) < level else (lo, mid)
    return (lo + hi) / 2


def points(x: float) -> str:
    """``+1.5`` / ``−2.0`` (a true minus sign, as the lost/gained cells use)."""
    return f"{x:+.1f}".replace("-", "−")


GATE_MIN_PROBLEMS = 200  # export.gate_size: auto never gates on fewer, where the task has them


def auto_gate_size(tolerance: float) -> int:
    """``export.gate_size: auto``: at least ``GATE_MIN_PROBLEMS``, and enough for ``tolerance``."""
    return max(GATE_MIN_PROBLEMS, gate_size_for(tolerance))


def gate_size_for(tolerance: float, level: float = 0.95) -> int:
    """Problems a gate needs before a variant that changes no answer can be shown within ``tolerance``:
    Tango's interval for 0 discordant pairs in ``n`` is ±z²/(n + z²)."""
    z2 = _z(level) ** 2
    return math.ceil(z2 * (1 - tolerance) / tolerance) if tolerance > 0 else 0


def passes(r: VariantResult, base: VariantResult, tolerance: float, rule: str) -> bool:
    """``interval``: the gap's 95% lower end is at or above ``-tolerance``; ``accuracy`` (the raw rule):
    the variant's accuracy is at least fp32's minus ``tolerance``."""
    if rule == "interval":
        return r.rejected_after is None and r.gap_low is not None and r.gap_low >= -tolerance - 1e-12
    return r.accuracy >= base.accuracy - tolerance


def verdict(r: VariantResult, tolerance: float, rule: str = "interval", kept: bool | None = None) -> str:
    """The gate's sentence for one scored variant: its gap, interval and tolerance, in points."""
    if r.preset == "fp32":
        return "fp32: the reference"
    gap = (r.gained - r.lost) / r.n * 100
    interval = (
        f"{points(gap)} points, 95% CI {points(r.gap_low * 100)} … {points(r.gap_high * 100)}, "
        f"tolerance {tolerance * 100:.1f}"
    )
    if r.rejected_after is not None:
        return f"{r.preset} rejected after {r.rejected_after} problems: {interval} (clearly below at 99%)"
    if rule == "interval":
        if r.gap_low >= -tolerance - 1e-12:
            return f"{r.preset} within tolerance: {interval}"
        return f"{r.preset} not shown within tolerance: {interval}"
    within = "within" if kept else "outside"
    if r.gap_low >= -tolerance - 1e-12 or r.gap_high < -tolerance:
        return f"{r.preset} {within} tolerance by raw accuracy: {interval}"
    return (
        f"{r.preset} {within} tolerance by raw accuracy: {interval} — the interval is wider than the "
        f"tolerance on {r.n} problems; export.gate_rule: interval with export.gate_size: auto decides it"
    )


def changes_cell(preset: str, lost: int | None, gained: int | None) -> str:
    """``−lost / +gained`` for a table cell; "—" where there is nothing to compare."""
    return "—" if lost is None or preset == "fp32" else f"−{lost} / +{gained}"


def choose(results: list[VariantResult], tolerance: float, rule: str = "accuracy") -> VariantResult:
    """Smallest working variant within ``tolerance`` of fp32 by ``rule`` (``passes``; fp32 always
    passes). Fills every scored row's ``decision`` with the sentence that says why."""
    base = next(r for r in results if r.preset == "fp32")
    ok = [base]
    for r in results:
        if r.error is not None or r.accuracy is None or r.preset == "fp32":
            continue
        kept = passes(r, base, tolerance, rule)
        if kept:
            ok.append(r)
        if r.gap_low is not None:
            r.decision = verdict(r, tolerance, rule, kept)
    ok.sort(key=lambda r: (r.bytes, SIZE_ORDER.index(r.preset) if r.preset in SIZE_ORDER else 99))
    return ok[0]


def score_variants(
    results: list[VariantResult],
    folder: Path,
    problems: list[dict],
    task,
    max_new_tokens: int,
    batch_size: int,
    tolerance: float | None = None,
    workers: int = 1,
    early_reject: bool = False,
) -> dict[str, list[dict]]:
    """Score every working variant in ``folder`` on ``problems`` and fill its row of ``results``
    (accuracy, tokens/s, problems lost / gained against fp32 with the paired interval); returns the
    per-example rows by preset. fp32 (which must be among them) is scored first; the others then run
    in ``workers`` processes at once (one thread each; 0 = one per core), each stopping early once it
    is clearly below ``tolerance`` when ``early_reject``."""
    outcomes: dict[str, list[dict]] = {}
    base = next(r for r in results if r.preset == "fp32")
    todo = [r for r in results if r.error is None and r.preset != "fp32"]
    stop_at = tolerance if early_reject else None
    fp32_args = (folder, base.file, problems, task, max_new_tokens, batch_size, "fp32")
    if workers == 1:  # in this process, one after another (no memory figure: the process holds more)
        summary, outcomes["fp32"] = score_variant(*fp32_args)
        reference = [bool(x["correct"]) for x in outcomes["fp32"]]
        args = [
            (folder, r.file, problems, task, max_new_tokens, batch_size, r.preset, reference, stop_at) for r in todo
        ]
        done = [score_variant(*a) for a in args]
    else:  # each variant in a fresh process of its own: fp32 first, then the others side by side
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        from distill.core.progress import console, progress_bar

        size = max(1, min(len(todo), workers or os.cpu_count() or 1))
        ctx = multiprocessing.get_context("spawn")
        queue = ctx.Queue()  # (preset, problems done) from the workers, for the one bar the parent draws
        with (
            ProcessPoolExecutor(
                size, mp_context=ctx, max_tasks_per_child=1, initializer=_worker_init, initargs=(queue,)
            ) as pool,
            progress_bar("gate", len(problems) * (1 + len(todo))) as advance,
        ):
            counts = {"fp32": 0}
            [(summary, outcomes["fp32"])] = _collect(
                {"fp32": pool.submit(_score_in_worker, fp32_args)}, queue, counts, len(problems), advance
            )
            reference = [bool(x["correct"]) for x in outcomes["fp32"]]
            if todo:
                console.print(f"gate: scoring {', '.join(r.preset for r in todo)} in {size} processes")
            futures = {
                r.preset: pool.submit(
                    _score_in_worker,
                    (folder, r.file, problems, task, max_new_tokens, batch_size, r.preset, reference, stop_at),
                )
                for r in todo
            }
            counts |= dict.fromkeys(futures, 0)
            done = _collect(futures, queue, counts, len(problems), advance)
    _fill(base, summary)
    for r, (summary, rows) in zip(todo, done):
        _fill(r, summary)
        outcomes[r.preset] = rows
        r.lost, r.gained = paired_changes(reference[: len(rows)], [bool(x["correct"]) for x in rows])
        gap = paired_gap(r.lost, r.gained, len(rows))
        r.gap_low, r.gap_high = gap[1], gap[2]
    base.lost = base.gained = 0
    base.gap_low = base.gap_high = 0.0
    return outcomes


def _fill(r: VariantResult, summary: dict) -> None:
    r.accuracy, r.correct, r.n = summary["accuracy"], summary["correct"], summary["n"]
    r.tokens_per_second = summary["tokens_per_second"]
    r.rejected_after = summary.get("rejected_after")
    r.first_token_ms = summary.get("first_token_ms")
    r.peak_rss_bytes = summary.get("peak_rss_bytes")


_PROGRESS = None  # a worker's queue to the parent's bar (set by _worker_init)


def _worker_init(queue) -> None:
    global _PROGRESS
    _PROGRESS = queue


def _score_in_worker(args: tuple):
    """``score_variant`` in a fresh spawned process (one per variant): one thread, its progress sent to
    the parent's bar, and the process's peak resident memory, which is this variant's alone."""
    from distill.core.env import set_env_defaults

    set_env_defaults()
    preset = args[6]
    report = (lambda n: _PROGRESS.put((preset, n))) if _PROGRESS is not None else None
    summary, rows = score_variant(*args, report=report)
    summary["peak_rss_bytes"] = peak_rss_bytes()
    return summary, rows


def _collect(futures: dict, queue, counts: dict[str, int], n: int, advance) -> list:
    """The results of ``futures`` (by preset) in order, advancing the parent's bar as the workers report;
    a variant rejected early is counted done at its end (the rest of its problems are never scored)."""
    import queue as queues
    from concurrent.futures import FIRST_COMPLETED, wait

    def take(preset: str, k: int) -> None:
        k = min(k, n - counts[preset])
        if k <= 0:  # a late report of a variant already counted done
            return
        counts[preset] += k
        advance(k, status=", ".join(f"{p} {c}/{n}" for p, c in counts.items()))

    pending = set(futures.values())
    while pending:
        finished, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
        while True:
            try:
                take(*queue.get_nowait())
            except queues.Empty:
                break
        for preset, f in futures.items():
            if f in finished:
                take(preset, n)
    return [f.result() for f in futures.values()]


def peak_rss_bytes() -> int | None:
    """This process image's peak resident memory: ``VmHWM`` of /proc/self/status, which starts afresh at
    exec. Not ``ru_maxrss``: a spawned worker is forked from its parent before it execs, and ``ru_maxrss``
    keeps the parent's peak across that exec. None where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


EARLY_LOOK = 40  # problems scored before a variant may be rejected early
FIRST_TOKEN_PROMPTS = 3  # prompts timed one at a time for the first-token latency


def first_token_ms(gen, questions: list[str]) -> float | None:
    """Median time from a prompt to its first new token, batch 1 (prefill and one step), in ms."""
    import statistics

    times = []
    for q in questions:
        t0 = time.perf_counter()
        gen.generate([q], 1, 1)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times) if times else None


def score_variant(
    bundle: Path,
    file: str,
    problems: list[dict],
    task,
    max_new_tokens: int,
    batch_size: int,
    label: str,
    reference: list[bool] | None = None,
    tolerance: float | None = None,
    report=None,
):
    """(summary with accuracy and 1-thread tokens/s, per-example rows) for one ONNX file.

    With ``reference`` (fp32's outcome per problem) and ``tolerance``: after each batch, from
    ``EARLY_LOOK`` problems on, scoring stops when the paired 99% interval on the problems so far lies
    entirely below ``-tolerance`` (``summary["rejected_after"]``; the rows cover the problems scored)."""
    import contextlib

    from distill.core.progress import progress_bar
    from distill.export.runtime import OnnxGenerator
    from distill.students.evaluate import score

    gen = OnnxGenerator(bundle, file, threads=1)
    questions = [p["question"] for p in problems]
    outs: list[str] = []
    rejected = None
    t0 = time.perf_counter()
    # a bar of its own, or (in a gate worker) ``report``: the problems done, sent to the parent's bar
    bar = progress_bar(f"gate {label}", len(questions)) if report is None else contextlib.nullcontext(report)
    with bar as advance:
        for start in range(0, len(questions), batch_size):
            chunk = questions[start : start + batch_size]
            outs += gen.generate(chunk, max_new_tokens, batch_size)
            advance(len(chunk))
            if reference is None or tolerance is None or len(outs) < EARLY_LOOK or len(outs) == len(questions):
                continue
            _, so_far = score(outs, problems[: len(outs)], task)
            lost, gained = paired_changes(reference[: len(outs)], [bool(x["correct"]) for x in so_far])
            if paired_gap(lost, gained, len(outs), level=0.99)[2] < -tolerance:
                rejected = len(outs)
                break
    seconds = time.perf_counter() - t0
    summary, rows = score(outs, problems[: len(outs)], task)
    summary["tokens_per_second"] = gen.tokens_generated / max(seconds, 1e-9)
    summary["seconds"] = seconds
    summary["first_token_ms"] = first_token_ms(gen, questions[:FIRST_TOKEN_PROMPTS])
    if rejected is not None:
        summary["rejected_after"] = rejected
    return summary, rows
