"""The quality gate: score every exported variant on the task's evaluation split through the
torch-free runtime, then pick the smallest one within a tolerance of the fp32 model's accuracy."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

# Fallback order when nothing smaller passes: int4 → int8 → fp16 → fp32 (smallest first).
SIZE_ORDER = ["int4", "int8", "int8_static", "int8_dynamic", "fp16", "fp32"]


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
    lost: int | None = None  # eval problems fp32 solves and this variant does not
    gained: int | None = None  # and the reverse; lost - gained is the accuracy gap in problems
    error: str | None = None
    chosen: bool = False

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


def changes_cell(preset: str, lost: int | None, gained: int | None) -> str:
    """``−lost / +gained`` for a table cell; "—" where there is nothing to compare."""
    return "—" if lost is None or preset == "fp32" else f"−{lost} / +{gained}"


def choose(results: list[VariantResult], tolerance: float) -> VariantResult:
    """Smallest working variant whose accuracy is within ``tolerance`` of fp32's (fp32 always passes)."""
    base = next(r for r in results if r.preset == "fp32")
    ok = [r for r in results if r.error is None and r.accuracy is not None and r.accuracy >= base.accuracy - tolerance]
    ok.sort(key=lambda r: (r.bytes, SIZE_ORDER.index(r.preset) if r.preset in SIZE_ORDER else 99))
    return ok[0] if ok else base


def score_variants(
    results: list[VariantResult],
    folder: Path,
    problems: list[dict],
    task,
    max_new_tokens: int,
    batch_size: int,
) -> dict[str, list[dict]]:
    """Score every working variant in ``folder`` on ``problems`` and fill its row of ``results``
    (accuracy, tokens/s, problems lost / gained against fp32, which must be among them); returns the
    per-example rows by preset."""
    outcomes: dict[str, list[dict]] = {}
    for r in results:
        if r.error:
            continue
        summary, rows = score_variant(folder, r.file, problems, task, max_new_tokens, batch_size, r.preset)
        r.accuracy, r.correct, r.n = summary["accuracy"], summary["correct"], summary["n"]
        r.tokens_per_second = summary["tokens_per_second"]
        outcomes[r.preset] = rows
    reference = [bool(x["correct"]) for x in outcomes["fp32"]]
    for r in results:
        if r.preset in outcomes:
            r.lost, r.gained = paired_changes(reference, [bool(x["correct"]) for x in outcomes[r.preset]])
    return outcomes


def score_variant(
    bundle: Path, file: str, problems: list[dict], task, max_new_tokens: int, batch_size: int, label: str
):
    """(summary with accuracy and 1-thread tokens/s, per-example rows) for one ONNX file."""
    from distill.core.progress import progress_bar
    from distill.export.runtime import OnnxGenerator
    from distill.students.evaluate import score

    gen = OnnxGenerator(bundle, file, threads=1)
    questions = [p["question"] for p in problems]
    outs: list[str] = []
    t0 = time.perf_counter()
    with progress_bar(f"gate {label}", len(questions)) as advance:
        for start in range(0, len(questions), batch_size):
            chunk = questions[start : start + batch_size]
            outs += gen.generate(chunk, max_new_tokens, batch_size)
            advance(len(chunk))
    seconds = time.perf_counter() - t0
    summary, rows = score(outs, problems, task)
    summary["tokens_per_second"] = gen.tokens_generated / max(seconds, 1e-9)
    summary["seconds"] = seconds
    return summary, rows
