"""A judge model: scores teacher rows against a rubric, and compares two candidates pairwise.

``judge_rows(teacher, rows, settings)`` asks the judge (any ``CachedTeacher``: an ``embedded:``/``hf:``
model, or ``distill serve`` / any OpenAI-compatible endpoint) about every answered train row and returns
the rows with ``judge_score`` (1-7, or 1 / 0 for PASS / FAIL), ``judge_reasoning`` (the judge's whole
text), ``judge_error`` (why there is no score: unparsable output, no reference) and the judge's token
counts, kept apart from the teacher's. Judge calls go through the same ``CachedTeacher`` as teacher
calls, so they are cached (a rerun asks nothing), retried by the backend, and counted by the job's
budget; a judge call whose retries ran out fails its row (``error``), which the rerun retries.

Where it runs: inside the generation worker, on the batch the teacher just answered, before the batch
is committed as a shard. A committed row therefore always carries its score, resume skips exactly the
committed rows (judged once), and a kill between teacher and judge loses nothing paid for: both
completions are in the cache. Judging in the driver after all shards would need a second set of
shards and a second exactly-once protocol for the same rows.

Judge output is untrusted text: it is never evaluated, the score is read by bounded regexes from its
tail, and output that states no score is kept with the reason (never an exception).

Bias. Position bias (a judge preferring whichever answer it reads first) is removed from pairwise
picks by asking both orders, A-vs-B and B-vs-A: a candidate wins only when both orders agree, anything
else is a tie (``debias: both_orders``; MT-Bench's conservative swap). Verbosity bias is reduced by the
rubric (told not to reward length) and by anchoring on the reference answer when the task has one;
``bench/judge_agreement.py`` measures both (first-position win share when the order is swapped, and
the correlation of score with length) and the judge's agreement with gold.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from distill.teachers.backends.base import Decoding, GenerationRequest

SCALES = {"1-7": (1.0, 7.0), "pass_fail": (0.0, 1.0)}
_TAIL = 20_000  # judge output past this many trailing characters is not searched for the score
_MARKERS = ("[BEGIN", "[END")


@dataclass(frozen=True)
class Verdict:
    """The score read from a judge's output (None when it states none) and, then, why."""

    score: float | None
    reason: str | None = None


def _fenced(label: str, text: str) -> str:
    """``text`` between ``[BEGIN label]`` / ``[END label]`` lines; markers inside it are defused so a
    candidate cannot close its own block and write instructions after it."""
    for m in _MARKERS:
        text = text.replace(m, m.replace("[", "("))
    return f"[BEGIN {label}]\n{text.strip()}\n[END {label}]"


def _instructions(scale: str) -> str:
    if scale == "pass_fail":
        return 'Write one or two sentences of reasoning, then a last line "Verdict: PASS" or "Verdict: FAIL".'
    return (
        'Write one or two sentences of reasoning, then a last line "Score: N" where N is an integer from '
        "1 (wrong or useless) to 7 (correct and complete)."
    )


def candidate_text(row: dict, open_answer: bool = False) -> str:
    """What the judge reads of a teacher row: its rationale and, unless the answer is the whole response
    (``open_answer``), the final answer extracted from it."""
    text = (row.get("rationale") or "").strip()
    if not open_answer and row.get("pred") is not None:
        text += f"\nFinal answer: {row['pred']}"
    return text


def judge_messages(question: str, candidate: str, settings, reference: str | None = None) -> list[dict]:
    """The chat messages asking the judge to score ``candidate`` on ``settings.rubric`` and scale,
    with the ``reference`` answer shown when given."""
    parts = [settings.rubric.strip(), _fenced("QUESTION", question)]
    if reference is not None:
        parts.append(_fenced("REFERENCE ANSWER", reference))
    parts += [_fenced("CANDIDATE RESPONSE", candidate), _instructions(settings.scale)]
    return [
        {"role": "system", "content": "You are a careful, impartial grader of answers."},
        {"role": "user", "content": "\n\n".join(parts)},
    ]


def pairwise_messages(question: str, first: str, second: str, settings, reference: str | None = None) -> list[dict]:
    """The chat messages asking which of two responses (shown as A then B) better meets the rubric."""
    parts = [settings.rubric.strip(), _fenced("QUESTION", question)]
    if reference is not None:
        parts.append(_fenced("REFERENCE ANSWER", reference))
    parts += [
        _fenced("RESPONSE A", first),
        _fenced("RESPONSE B", second),
        "Which response is better? The order they are shown in and their length do not matter. Write one or "
        'two sentences of reasoning, then a last line "Winner: A", "Winner: B" or "Winner: tie".',
    ]
    return [
        {"role": "system", "content": "You are a careful, impartial grader of answers."},
        {"role": "user", "content": "\n\n".join(parts)},
    ]


_NUM = r"(\d{1,3}(?:\.\d{1,3})?)"
_JSON_SCORE = re.compile(r'"(?:score|rating)"\s*:\s*"?' + _NUM, re.I)
_MARKED_SCORE = re.compile(
    r"\b(?:score|rating|grade)\b[^0-9\n]{0,16}?" + _NUM + r"(?:\s*(?:/|out of)\s*(\d{1,3}))?", re.I
)
_OVER = re.compile(_NUM + r"\s*(?:/|out of)\s*(\d{1,3})\b")
_BARE = re.compile(r"\[*\s*" + _NUM + r"\s*\]*\s*\.?")
_JSON_VERDICT = re.compile(r'"(?:verdict|decision|result|grade)"\s*:\s*"?(pass|fail)', re.I)
_JSON_PASS = re.compile(r'"(?:pass|passed|correct)"\s*:\s*(true|false)', re.I)
_MARKED_VERDICT = re.compile(r"\b(?:verdict|decision|result|grade)\b\W{0,8}(pass|fail)(?:ed|es|s)?\b", re.I)
_UPPER_VERDICT = re.compile(r"\b(PASS|FAIL)(?:ED)?\b")


def _last(pattern: re.Pattern, text: str):
    match = None
    for match in pattern.finditer(text):  # noqa: B007 - the last statement wins
        pass
    return match


def _on_scale(value: float, out_of: str | None, lo: float, hi: float) -> Verdict:
    if out_of is not None and float(out_of) != hi:
        return Verdict(None, f"score {value:g}/{out_of} is not on the {lo:g}-{hi:g} scale")
    if not lo <= value <= hi or math.isnan(value):
        return Verdict(None, f"score {value:g} is off the {lo:g}-{hi:g} scale")
    return Verdict(value)


def parse_verdict(text: str, scale: str = "1-7") -> Verdict:
    """The score a judge's ``text`` states: on ``1-7`` a JSON ``"score": 6``, "Score: 6", "Rating: 6/7",
    "6/7", or an output (or last line) that is only the number; on ``pass_fail`` PASS = 1 and FAIL = 0
    from "Verdict: PASS", JSON, or an upper-case PASS / FAIL (the last one stated wins). Anything else is
    ``Verdict(None, reason)``; never raises."""
    tail = (text or "")[-_TAIL:]
    if not tail.strip():
        return Verdict(None, "the judge wrote nothing")
    if scale == "pass_fail":
        for pattern in (_JSON_VERDICT, _MARKED_VERDICT, _UPPER_VERDICT):
            m = _last(pattern, tail)
            if m:
                return Verdict(1.0 if m.group(1).lower() == "pass" else 0.0)
        m = _last(_JSON_PASS, tail)
        if m:
            return Verdict(1.0 if m.group(1).lower() == "true" else 0.0)
        word = tail.strip().strip(".*!").lower()
        if word in ("pass", "fail", "passed", "failed"):
            return Verdict(1.0 if word.startswith("pass") else 0.0)
        return Verdict(None, "no PASS or FAIL verdict in the judge's output")
    lo, hi = SCALES[scale]
    m = _last(_JSON_SCORE, tail)
    if m:
        return _on_scale(float(m.group(1)), None, lo, hi)
    m = _last(_MARKED_SCORE, tail)
    if m:
        return _on_scale(float(m.group(1)), m.group(2), lo, hi)
    m = _last(_OVER, tail)
    if m:
        return _on_scale(float(m.group(1)), m.group(2), lo, hi)
    lines = [line for line in tail.splitlines() if line.strip()]
    m = _BARE.fullmatch(lines[-1].strip()) if lines else None
    if m:
        return _on_scale(float(m.group(1)), None, lo, hi)
    return Verdict(None, 'no score in the judge\'s output (expected "Score: N")')


_MARKED_WINNER = re.compile(
    r"\b(?:winner|better|preferred|preference|choice|verdict)\b[^A-Za-z\n]{0,12}(?:response\s+)?(A|B|tie)\b", re.I
)
_BRACKETED = re.compile(r"\[\[(A|B|C|tie)\]\]", re.I)


def parse_preference(text: str) -> str | None:
    """The response a pairwise judge's ``text`` prefers: ``"A"``, ``"B"`` or ``"tie"`` ("Winner: B",
    MT-Bench's ``[[A]]`` / ``[[C]]`` for a tie, or an output that is only the letter); None when it says none."""
    tail = (text or "")[-_TAIL:]
    for pattern in (_MARKED_WINNER, _BRACKETED):
        m = _last(pattern, tail)
        if m:
            pick = m.group(1).upper()
            return "tie" if pick in ("C", "TIE") else pick
    word = tail.strip().strip(".*[]()").upper()
    if word in ("A", "B"):
        return word
    return "tie" if word == "TIE" else None


def _reference(row: dict, settings, has_gold: bool) -> tuple[str | None, str | None]:
    """(the reference shown to the judge, or None; the reason a row cannot be judged, or None)."""
    if settings.reference == "never" or not has_gold:
        return None, (
            "no reference answer (teacher.judge.reference=always)" if settings.reference == "always" else None
        )
    return row.get("gold"), None


def judge_rows(teacher, rows: list[dict], settings, has_gold=None, open_answer: bool = False) -> list[dict]:
    """``rows`` with the judge's verdict on each answered train row (no ``error``, a ``pred``).

    Adds ``judge_score`` (float or None), ``judge_reasoning`` (the judge's text), ``judge_error`` (why
    there is no score), ``judge_tokens_in`` / ``judge_tokens_out`` and ``judge_cached``; other rows get
    them empty. ``has_gold(row)``: whether the row's gold is the task's (not a vote standing in for a
    missing one; default: any gold). A judge call that failed for good fails the row: ``error`` is set,
    so the rerun retries it. ``teacher``: a ``CachedTeacher`` (or anything with ``generate`` and
    ``chat_prompt``); ``settings``: ``rubric``, ``scale``, ``reference``, ``max_new_tokens``."""
    empty = {
        "judge_score": None,
        "judge_reasoning": None,
        "judge_error": None,
        "judge_tokens_in": None,
        "judge_tokens_out": None,
        "judge_cached": None,
    }
    has_gold = has_gold or (lambda r: r.get("gold") is not None)
    out = [{**r, **empty} for r in rows]
    asked, requests = [], []
    decoding = Decoding(max_new_tokens=settings.max_new_tokens)
    for i, r in enumerate(out):
        if r.get("error") is not None or r.get("split") != "train" or r.get("pred") is None:
            continue
        reference, why_not = _reference(r, settings, has_gold(r))
        if why_not:
            r["judge_error"] = why_not
            continue
        messages = judge_messages(r["question"], candidate_text(r, open_answer), settings, reference)
        asked.append(i)
        requests.append(GenerationRequest(teacher.chat_prompt(messages), decoding))
    for i, c in zip(asked, teacher.generate(requests) if requests else []):
        r = out[i]
        r.update(judge_tokens_in=c.tokens_in, judge_tokens_out=c.tokens_out, judge_cached=c.cached)
        if c.error is not None:
            r["judge_error"] = f"judge call failed: {c.error}"
            r["error"] = r["judge_error"]  # retried on resume, as a failed teacher call is
            continue
        v = parse_verdict(c.text, settings.scale)
        r.update(judge_score=v.score, judge_reasoning=c.text, judge_error=v.reason)
    return out


def both_orders(first: str | None, swapped: str | None) -> str:
    """The outcome of one pair asked in both orders: ``first`` is the preference with (x, y) shown as
    (A, B), ``swapped`` with (y, x). ``"x"`` or ``"y"`` only when both orders name the same response,
    else ``"tie"`` (a judge that always picks the first position ties every pair)."""
    if first == "A" and swapped == "B":
        return "x"
    if first == "B" and swapped == "A":
        return "y"
    return "tie"


def one_order(first: str | None) -> str:
    """The outcome of one pair asked in one order (``debias: none``): whatever that order says."""
    return {"A": "x", "B": "y"}.get(first or "", "tie")


def pick_judged(teacher, questions: list[tuple[list, list]], settings, has_gold=None, open_answer=False):
    """``teachers_pick=judged`` for every question at once: ``questions`` holds (rows, kept) per question,
    ``rows[k]`` teacher k's row (None when not asked) and ``kept[k]`` whether its filters keep it.

    With one kept row it is the pick; with none, teacher 0's row stands in, kept by nobody; with several,
    every pair of kept rows is compared by the judge (both orders unless ``settings.debias`` is none), the
    row with the most wins is picked, ties to the higher ``judge_score`` then the earlier teacher.
    Returns ([(teacher index, kept)] per question, stats: calls, tokens, and the pairs' outcomes)."""
    has_gold = has_gold or (lambda r: r.get("gold") is not None)
    decoding = Decoding(max_new_tokens=settings.max_new_tokens)
    pairs, requests = [], []  # (question, x, y), then its requests in order: (x, y) and, debiased, (y, x)
    for q, (rows, kept) in enumerate(questions):
        cands = [k for k, r in enumerate(rows) if r is not None and kept[k]]
        for a in range(len(cands)):
            for b in range(a + 1, len(cands)):
                x, y = rows[cands[a]], rows[cands[b]]
                reference = x.get("gold") if settings.reference != "never" and has_gold(x) else None
                tx, ty = candidate_text(x, open_answer), candidate_text(y, open_answer)
                orders = [(tx, ty), (ty, tx)] if settings.debias == "both_orders" else [(tx, ty)]
                pairs.append((q, cands[a], cands[b]))
                for s1, s2 in orders:
                    messages = pairwise_messages(x["question"], s1, s2, settings, reference)
                    requests.append(GenerationRequest(teacher.chat_prompt(messages), decoding))
    completions = teacher.generate(requests) if requests else []
    per = 2 if settings.debias == "both_orders" else 1
    wins: dict[tuple[int, int], int] = {}
    outcomes = {"x": 0, "y": 0, "tie": 0, "first_position": 0, "orders": 0, "failed": 0}
    for n, (q, kx, ky) in enumerate(pairs):
        said = [parse_preference(c.text) if c.error is None else None for c in completions[n * per : (n + 1) * per]]
        outcomes["failed"] += sum(1 for c in completions[n * per : (n + 1) * per] if c.error is not None)
        outcomes["first_position"] += sum(1 for s in said if s == "A")
        outcomes["orders"] += len(said)
        result = both_orders(*said) if per == 2 else one_order(said[0])
        outcomes[result] += 1
        if result != "tie":
            winner = kx if result == "x" else ky
            wins[q, winner] = wins.get((q, winner), 0) + 1
    picks = []
    for q, (rows, kept) in enumerate(questions):
        cands = [k for k, r in enumerate(rows) if r is not None and kept[k]]
        if not cands:
            picks.append((0, False))
            continue

        def rank(k, q=q, rows=rows):
            score = rows[k].get("judge_score")
            return (wins.get((q, k), 0), -math.inf if score is None else score, -k)

        picks.append((max(cands, key=rank), True))
    stats = {
        "pairs": len(pairs),
        "calls": len(requests),
        "paid_calls": sum(1 for c in completions if not c.cached and c.error is None),
        "tokens_in": sum(c.tokens_in for c in completions),
        "tokens_out": sum(c.tokens_out for c in completions),
        "paid_tokens_in": sum(c.tokens_in for c in completions if not c.cached),
        "paid_tokens_out": sum(c.tokens_out for c in completions if not c.cached),
        "outcomes": outcomes,
        "debias": settings.debias,
    }
    return picks, stats


def length_correlation(scores: list[float], lengths: list[int]) -> float | None:
    """Pearson correlation of judge scores with candidate lengths (verbosity bias; None below 3 pairs or
    when either side is constant)."""
    pairs = [(s, n) for s, n in zip(scores, lengths) if s is not None]
    if len(pairs) < 3:
        return None
    ms = sum(s for s, _ in pairs) / len(pairs)
    mn = sum(n for _, n in pairs) / len(pairs)
    cov = sum((s - ms) * (n - mn) for s, n in pairs)
    vs = sum((s - ms) ** 2 for s, _ in pairs)
    vn = sum((n - mn) ** 2 for _, n in pairs)
    return None if not vs or not vn else cov / math.sqrt(vs * vn)
