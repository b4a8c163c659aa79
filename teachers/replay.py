"""Replay teacher: outputs someone already paid for, used as the teacher (no model call at all).

Sources: JSONL or Parquet rows with ``question``, ``rationale`` and ``answer`` (``gold`` optional),
or the logs of Kojima et al.'s zero-shot-CoT runner (``Q:``/``A:`` blocks with ``pred_mode`` and
``GT``). Questions are matched after whitespace normalisation; a problem without a recorded output
is kept with a reason, never dropped silently.
"""

from __future__ import annotations

import json
from pathlib import Path

from distill.core.answers import Task
from distill.core.errors import DistillError
from distill.core.problems import normalize_question, parse_kojima_log


def load_records(path: str | Path) -> list[dict]:
    """Recorded teacher outputs from a .log, .jsonl or .parquet file."""
    path = Path(path)
    if not path.is_file():
        raise DistillError(f"replay source {path} does not exist", "point teacher.model at replay:<file>")
    if path.suffix == ".log":
        records = parse_kojima_log(path)
    elif path.suffix == ".jsonl":
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        records = pq.read_table(path).to_pylist()
    else:
        raise DistillError(
            f"replay source {path} has an unknown format", "use .jsonl, .parquet or a zero-shot-CoT .log"
        )
    missing = {"question", "rationale", "answer"} - set(records[0]) if records else set()
    if not records or missing:
        raise DistillError(
            f"replay source {path} has no usable rows" + (f" (missing {sorted(missing)})" if missing else ""),
            "rows need question, rationale and answer",
        )
    return records


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
            pred = task.extract(str(r["answer"])).answer if r else None
            gold = task.normalize_gold(p["gold"])
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
                    "correct": task.is_correct(pred, p["gold"]),
                    "parse_error": None
                    if pred is not None
                    else ("no recorded output for this question" if not r else "recorded answer has no parsable value"),
                    "finish_reason": "recorded",
                    "tokens_in": 0,
                    "tokens_out": 0,
                    "cached": True,
                }
            )
        return out
