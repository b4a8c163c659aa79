"""Answer types: how a final answer is extracted from model text, normalised and checked."""

from __future__ import annotations

import re
from dataclasses import dataclass

from distill.core.errors import DistillError

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
