"""Tasks own their problems, their answer parsing and their correctness check.

A problem is a dict ``{"id", "split", "question", "gold"}``. Train and eval problems come from
disjoint generator seeds and are de-duplicated against each other, so a student never trains on
its test questions.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from distill.errors import DistillError

_NUM = r"-?\$?\d[\d,]*(?:\.\d+)?"
_ANSWER_PATTERNS = [
    re.compile(r"####\s*(" + _NUM + ")"),
    re.compile(r"\\boxed\{\s*(" + _NUM + r")\s*\}"),
    re.compile(
        r"answer(?: \(arabic numerals\))?(?: to [^.\n]{0,80}?)? is[:\s]*\**\s*(?:\\\(|\$)?\s*(" + _NUM + ")", re.I
    ),
]


def normalize_number(text: str) -> str | None:
    """Canonical string for a number (``'1,000.50'`` → ``'1000.5'``); None if not a number."""
    t = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = float(t)
    except ValueError:
        return None
    if value.is_integer():
        return str(int(value))
    return repr(value)


@dataclass(frozen=True)
class Extraction:
    """The parsed answer (or None) and, when parsing failed, why."""

    answer: str | None
    reason: str | None = None
    explicit: bool = False  # stated with a final-answer marker, not guessed from the last number


def extract_number(text: str, fallback_last: bool = True) -> Extraction:
    """Final numeric answer in ``text``: ``####``, ``\\boxed{}``, "the answer is", then the last number."""
    for pattern in _ANSWER_PATTERNS:
        hits = pattern.findall(text)
        if hits:
            value = normalize_number(hits[-1])
            if value is not None:
                return Extraction(value, explicit=True)
    if fallback_last:
        nums = re.findall(_NUM, text)
        if nums:
            value = normalize_number(nums[-1])
            if value is not None:
                return Extraction(value)
    return Extraction(None, "no number in output")


def extract_text(text: str) -> Extraction:
    """Final short-text answer: what follows "the answer is", lowercased and stripped of punctuation."""
    m = re.findall(r"answer(?: \([^)]*\))? is[:\s]*([^\n]+)", text, re.I)
    candidate = m[-1] if m else text.strip().splitlines()[-1] if text.strip() else ""
    candidate = candidate.strip().strip(".\"'*` ").lower()
    if not candidate:
        return Extraction(None, "empty output")
    return Extraction(candidate, explicit=bool(m))


_YES_NO = {"yes": "yes", "no": "no", "true": "yes", "false": "no"}


def extract_yes_no(text: str, fallback_last: bool = True) -> Extraction:
    """yes/no (also true/false): after "the answer is", else the last yes/no word."""
    m = re.findall(r"answer(?: \([^)]*\))? is[:\s]*\**\s*\(?\b(yes|no|true|false)\b", text, re.I)
    if m:
        return Extraction(_YES_NO[m[-1].lower()], explicit=True)
    words = re.findall(r"\b(yes|no|true|false)\b", text, re.I) if fallback_last else []
    return Extraction(_YES_NO[words[-1].lower()]) if words else Extraction(None, "no yes/no in output")


def extract_choice(text: str, fallback_last: bool = True) -> Extraction:
    """Multiple-choice letter A-J: "the answer is (C)", ``\\boxed{C}``, else the last "(C)"."""
    m = re.findall(r"answer(?: \([^)]*\))? is[:\s]*\**\s*\(?([A-J])\b\)?", text) or re.findall(
        r"\\boxed\{\s*\(?([A-J])\)?\s*\}", text
    )
    if m:
        return Extraction(m[-1], explicit=True)
    letters = re.findall(r"\(([A-J])\)", text) if fallback_last else []
    return Extraction(letters[-1]) if letters else Extraction(None, "no choice letter in output")


@dataclass(frozen=True)
class Task:
    """Answer parsing and comparison for one answer type."""

    answer_type: str = "number"

    def extract(self, text: str, fallback_last: bool = True) -> Extraction:
        if self.answer_type == "number":
            return extract_number(text, fallback_last)
        if self.answer_type == "yes_no":
            return extract_yes_no(text, fallback_last)
        if self.answer_type == "choice":
            return extract_choice(text, fallback_last)
        return extract_text(text)

    def normalize_gold(self, gold: str) -> str:
        if self.answer_type == "number":
            value = normalize_number(str(gold))
            if value is None:
                raise DistillError(f"gold answer {gold!r} is not a number", "set task.answer_type=text")
            return value
        if self.answer_type == "yes_no":
            value = _YES_NO.get(str(gold).strip().strip(".").lower())
            if value is None:
                raise DistillError(f"gold answer {gold!r} is not yes/no", "set task.answer_type=text")
            return value
        if self.answer_type == "choice":
            value = str(gold).strip().strip(".()").upper()
            if not re.fullmatch(r"[A-J]", value):
                raise DistillError(f"gold answer {gold!r} is not a choice letter A-J", "set task.answer_type=text")
            return value
        return str(gold).strip().strip(".").lower()

    def is_correct(self, pred: str | None, gold: str) -> bool:
        return pred is not None and pred == self.normalize_gold(gold)

    def answer_sentence(self, answer: str) -> str:
        """How a training target states its final answer (what ``extract`` reads back)."""
        return f"Therefore, the answer is {answer}."


def _reasoning_gym(name: str, params: dict, size: int, seed: int) -> list[dict]:
    import reasoning_gym

    try:
        data = reasoning_gym.create_dataset(name, size=size, seed=seed, **params)
    except (KeyError, ValueError) as e:
        raise DistillError(f"reasoning_gym dataset {name!r} failed: {e}", "check task.name and task.params") from None
    except TypeError as e:
        raise DistillError(f"reasoning_gym {name!r} rejected task.params: {e}", "fix task.params") from None
    return [{"question": x["question"].strip(), "gold": str(x["answer"])} for x in data]


def _file(path: str) -> list[dict]:
    """Problems from a file: JSONL (question/answer), JSON ({"examples": [...]} or MultiArith-style
    sQuestion/lSolutions rows), or a zero-shot-CoT log (Q:/GT:)."""
    p = Path(path)
    if not p.is_file():
        raise DistillError(f"task file {p} does not exist", "set task.name to a .jsonl/.json/.log path")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DistillError(f"task file {p} is not UTF-8 text", "re-encode it as UTF-8") from None
    if p.suffix == ".log":
        from teachers.replay import parse_kojima_log

        return [{"question": r["question"], "gold": r["gold"]} for r in parse_kojima_log(p)]
    if p.suffix == ".json":
        data = json.loads(text)
        rows = data["examples"] if isinstance(data, dict) and "examples" in data else data
    else:
        rows = []
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise DistillError(f"{p}:{i + 1} is not valid JSON", "one JSON object per line") from None
    out = []
    for i, row in enumerate(rows):
        if "sQuestion" in row and "lSolutions" in row:
            row = {"question": row["sQuestion"], "answer": row["lSolutions"][0]}
        if not isinstance(row, dict) or "question" not in row or "answer" not in row:
            raise DistillError(f"{p} row {i + 1} lacks 'question' or 'answer'", "each row needs both fields")
        out.append({"question": str(row["question"]).strip(), "gold": str(row["answer"])})
    return out


def load_seeds(cfg) -> list[dict]:
    """Seed problems of a synthetic task: the file's rows before the evaluation split."""
    return _file(cfg.name)[: -cfg.eval_size]


def load_problems(cfg) -> tuple[list[dict], list[dict]]:
    """(train, eval) problems for a ``TaskConfig``; disjoint by question text. A synthetic task has
    no train problems until the teacher writes them (``teachers.synthesis``)."""
    if cfg.source == "reasoning_gym":
        evals = _reasoning_gym(cfg.name, cfg.params, cfg.eval_size, cfg.seed + 1_000_003)
        # Over-draw train problems so de-duplication against eval still leaves train_size of them.
        pool = _reasoning_gym(cfg.name, cfg.params, cfg.train_size * 2 + 16, cfg.seed)
    elif cfg.source == "synthetic":  # the seed rows only; generate() has the teacher write train problems
        rows = _file(cfg.name)
        if len(rows) <= cfg.eval_size:
            raise DistillError(
                f"{cfg.name} has {len(rows)} rows, not more than task.eval_size={cfg.eval_size}", "lower task.eval_size"
            )
        evals = rows[-cfg.eval_size :]
        return [], [{"id": f"eval-{i:06d}", "split": "eval", **r} for i, r in enumerate(evals)]
    else:  # file order: the last eval_size rows are held out (as in the published splits)
        rows = _file(cfg.name)
        if len(rows) <= cfg.eval_size:
            raise DistillError(
                f"{cfg.name} has {len(rows)} rows, not more than task.eval_size={cfg.eval_size}", "lower task.eval_size"
            )
        evals, pool = rows[-cfg.eval_size :], rows[: -cfg.eval_size]
    if not evals or not pool:
        raise DistillError("the task produced no problems", "check task.name / task.params / the JSONL file")
    eval_questions = {r["question"] for r in evals}
    seen: set[str] = set()
    train = []
    for r in pool:
        if r["question"] in eval_questions or r["question"] in seen:
            continue
        seen.add(r["question"])
        train.append(r)
        if len(train) == cfg.train_size:
            break
    out_train = [{"id": f"train-{i:06d}", "split": "train", **r} for i, r in enumerate(train)]
    out_eval = [{"id": f"eval-{i:06d}", "split": "eval", **r} for i, r in enumerate(evals)]
    return out_train, out_eval
