"""Replay teacher: outputs someone already paid for, used as the teacher (no model call at all).

Sources: JSONL or Parquet rows with ``question``, ``rationale`` and ``answer`` (``gold`` optional),
or the logs of Kojima et al.'s zero-shot-CoT runner (``Q:``/``A:`` blocks with ``pred_mode`` and
``GT``). Questions are matched after whitespace normalisation; a problem without a recorded output
is kept with a reason, never dropped silently.
"""

from __future__ import annotations

from pathlib import Path

from distill.core.answers import Task
from distill.core.errors import DistillError
from distill.core.readers import json_kind, normalize_question, parse_json_lines, parse_kojima_text, read_input

WHAT = "replay file"

# parse_error of a problem the replay file has no recording for (not a teacher failure)
NO_RECORDING = "no recorded output for this question"


def load_records(path: str | Path) -> list[dict]:
    """Recorded teacher outputs from a .log, .jsonl or .parquet file.

    Every row is checked here, in the driver: a broken line, a row without question, rationale and
    answer, or a file that is not UTF-8 is one ``DistillError`` naming the file and the line (row
    for Parquet), never a worker's traceback."""
    path = Path(path)
    if not path.exists():
        raise DistillError(f"{WHAT} {path} does not exist", "point teacher.model at replay:<file>")
    if path.suffix == ".log":
        records = [(f"block {i}", r) for i, r in enumerate(parse_kojima_text(read_input(path, WHAT)), 1)]
    elif path.suffix == ".jsonl":
        records = [(f"line {i}", r) for i, r in parse_json_lines(read_input(path, WHAT), path, WHAT)]
    elif path.suffix == ".parquet":
        records = [(f"row {i}", r) for i, r in enumerate(_parquet_rows(path), 1)]
    else:
        raise DistillError(f"{WHAT} {path} has an unknown format", "use .jsonl, .parquet or a zero-shot-CoT .log")
    if not records:
        raise DistillError(
            f"{WHAT} {path} has no usable rows",
            "rows need question, rationale and answer"
            + (" (a zero-shot-CoT log: Q:, pred_mode : and GT : lines)" if path.suffix == ".log" else ""),
        )
    return [_check_record(r, path, where) for where, r in records]


def _parquet_rows(path: Path) -> list[dict]:
    """The rows of a Parquet replay file; a file Arrow cannot read is one ``DistillError``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise DistillError(
            f"{WHAT} {path} is not a readable Parquet file ({e})", "re-write it, or use .jsonl"
        ) from None


def _check_record(r: dict, path: Path, where: str) -> dict:
    """``r`` if it is a usable recording: question, rationale and answer present and of the right types."""
    missing = sorted({"question", "rationale", "answer"} - set(r))
    if missing:
        raise DistillError(f"{WHAT} {path} {where} is missing {missing}", "rows need question, rationale and answer")
    bad = [
        f"{key} is {json_kind(r[key])}"
        for key, ok in (
            ("question", isinstance(r["question"], str)),
            ("rationale", isinstance(r["rationale"], str)),
            ("answer", isinstance(r["answer"], str | int | float)),
            ("answer_raw", isinstance(r.get("answer_raw", ""), str)),
        )
        if not ok
    ]
    if bad:
        raise DistillError(
            f"{WHAT} {path} {where}: {', '.join(bad)}",
            "question, rationale and answer_raw are strings, answer a string or a number",
        )
    return r


def covered(records: list[dict], problems: list[dict]) -> int:
    """How many of ``problems`` have a recording in ``records`` (questions matched as ``ReplayTeacher`` does)."""
    recorded = {normalize_question(r["question"]) for r in records}
    return sum(normalize_question(p["question"]) in recorded for p in problems)


class ReplayTeacher:
    """Answers problems from recorded outputs; ``model_id`` names the file for provenance."""

    def __init__(self, path: str | Path):
        self.records = {normalize_question(r["question"]): r for r in load_records(path)}
        self.model_id = f"replay:{Path(path).name}"

    def rows(self, problems: list[dict], task: Task) -> list[dict]:
        """One output row per problem, in the schema the generate stage writes."""
        out = []
        for p in problems:
            r = self.records.get(normalize_question(p["question"]))
            q = p["question"]
            ex = task.extract(str(r["answer"]), question=q) if r else None
            pred = ex.answer if ex else None
            gold = task.normalize_gold(p["gold"], q)
            correct, why = task.check(pred, gold, q) if pred is not None else (False, None)
            out.append(
                {
                    "id": p["id"],
                    "split": p["split"],
                    "question": p["question"],
                    "gold": gold,
                    "prompt": "",
                    "rationale": r["rationale"] if r else "",
                    "answer_raw": r.get("answer_raw", str(r["answer"])) if r else "",
                    "pred": pred,
                    "confidence": 1.0 if pred is not None else 0.0,
                    "correct": correct,
                    "parse_error": why
                    if pred is not None
                    else (NO_RECORDING if not r else f"recorded answer has no parsable value ({ex.reason})"),
                    "finish_reason": "recorded",
                    "tokens_in": 0,
                    "tokens_out": 0,
                    "cached": True,
                }
            )
        return out
