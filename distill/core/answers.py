"""Answer types: how a final answer is extracted from model text, put in canonical form and checked.

``Task(answer_type, ...)`` holds one type's settings (``Task.from_config(recipe.task)`` reads them from
``task.answer``; this layer imports no config). ``Task.extract`` returns the answer as a canonical string,
so two outputs meaning the same answer give the same string (self-consistency counts equal strings), and
``Task.answer_sentence`` states an answer so that ``extract`` reads it back unchanged. Canonical forms:

- number: the exact value (``fractions.Fraction``) as an integer (``72``), a decimal when it ends within
  20 digits (``0.75`` for ``0.75``, ``3/4`` and ``\\frac{3}{4}``), else ``p/q`` in lowest terms (``1/3``).
  ``45%`` is 45; currency, units and thousands separators are dropped (``$1,200.50`` → ``1200.5``).
- yes_no: ``yes`` / ``no``; choice: the letter ``A``-``J``.
- text: the answer after ``task.answer.normalize`` (by default SQuAD's: lowercase, no punctuation, no
  a/an/the, single spaces).
- json: ``json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)``, integral floats
  written as integers (``1.0`` → ``1``: the same JSON number).
- regex: the first group of the pattern's last match, stripped.
- custom: the text answer with nothing normalised (case kept).
- code: the solution's Python code (the last ```python block), dedented and stripped; the gold is its tests
  (``distill.core.code``), run with it in a sandboxed subprocess (``distill.core.sandbox``).
- open: the whole response, stripped (summaries, extraction, instructions). There is no gold check (a gold,
  when present, is a reference a judge model may see: ``distill.teachers.judge``); any non-empty output parses.

Custom checkers (``task.answer.checker: "mypkg.checks:grade"``) are called as
``grade(answer: str, gold: str) -> bool``. ``answer`` is the extracted answer: what follows "the answer is"
(else the output's last non-empty line), stripped of surrounding whitespace, quotes, markdown ``*`` and
backticks, colons and final periods, case kept. ``gold`` is the dataset's gold answer as given. A bool is
the verdict; a float in [0, 1] is a score, correct when ≥ 0.5 (NaN is wrong); any other value counts by its
truth value (``bool``). If ``grade`` raises, that row is wrong and keeps the reason
``checker mypkg.checks:grade raised ValueError: <message>``; the run goes on. The module is imported once,
when first needed; an import that fails is a ``DistillError``.

Model output is untrusted input: nothing in it is evaluated, every regex here runs in linear time on long
outputs, and the JSON search tries a bounded number of starts.
"""

from __future__ import annotations

import importlib
import json
import math
import numbers
import os
import re
import string
import sys
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from fractions import Fraction
from functools import cached_property, lru_cache
from typing import Any

from distill.core.code import check_code, code_sentence, extract_code, require_sandbox, tests_source
from distill.core.errors import DistillError

ANSWER_TYPES = ("number", "yes_no", "choice", "text", "json", "regex", "custom", "code", "open")
NORMALIZATIONS = ("case", "punctuation", "articles", "whitespace")
MATCHES = ("exact", "contains", "f1")

# A final-answer marker: "the answer is", "Answer:", "the answer (arabic numerals) is", "the answer to
# the problem is". Every repeat is bounded or meets a distinct character: no backtracking blow-up.
_MARKER = r"(?i:\banswer(?:[ \t]*\([^()\n]{0,40}\))?(?:\s+to\s[^.\n]{0,80}?)?\s*(?:is\b|:))"
_MARKER_RE = re.compile(_MARKER)


@dataclass(frozen=True)
class Extraction:
    """The parsed answer (or None) and, when parsing failed, why."""

    answer: str | None
    reason: str | None = None
    explicit: bool = False  # stated with a final-answer marker, not guessed from the last number


# --- number -----------------------------------------------------------------------------------------

_D = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?"  # 1,234,567.5 or 1234567.5
_SIGN = r"(?:(?<![\w)\]}])[-−+])"  # not the minus of "5-3"
_CUR = r"(?:\\?\$|[€£¥₹])"
_TEXFRAC = r"\\[dt]?frac\s*(?:\{\s*-?" + _D + r"\s*\}\s*\{\s*" + _D + r"\s*\}|\d\d)"
# One number as written: sign, currency, then a (mixed) LaTeX fraction, a mixed number "2 1/2", a
# fraction or a decimal, then an optional percent sign. ``(?<!\d)`` starts it only at a run of digits'
# first digit, which keeps a scan of a long digit run linear.
_NUMBER = (
    rf"(?:{_SIGN}?(?:{_CUR}\s?)?{_SIGN}?(?<!\d)"
    rf"(?:(?:\d+\s*)?{_TEXFRAC}|\d+\s\d+/\d+(?!\d)|{_D}(?:/{_D})?)(?:\s?\\?%)?)"
)
_NUMBER_RE = re.compile(_NUMBER)
_NUMBER_PARTS = re.compile(
    r"(?P<s1>[-−+])?(?:\\?\$|[€£¥₹])?\s?(?P<s2>[-−+])?"
    r"(?:(?P<fw>\d+)?\s*\\[dt]?frac\s*(?:\{\s*(?P<fs>-)?(?P<fn>[\d,.]+)\s*\}\s*\{\s*(?P<fd>[\d,.]+)\s*\}"
    r"|(?P<fn1>\d)(?P<fd1>\d))"
    r"|(?P<mw>\d+)\s(?P<mn>\d+)/(?P<md>\d+)"
    r"|(?P<n>[\d,.]+)(?:/(?P<d>[\d,.]+))?)"
    r"(?:\s?\\?%)?"
)
_SCIENTIFIC = re.compile(r"[-+]?\d+(?:\.\d+)?[eE][-+]?\d{1,3}")
# What may stand between a marker and its number: spaces, colons, bold, "$", "\(", "\boxed{", "x =", "about".
_LEAD = (
    r"(?:[\s:*=~≈$(\[{]|\\[(\[]|\\boxed\{|\\text(?:bf)?\{|\\mathbf\{"
    r"|(?i:approximately|about|around|roughly)\s|[a-zA-Z]\s?=){0,8}"
)
_NUMBER_MARKED = (
    re.compile(r"####" + _LEAD + "(" + _NUMBER + ")"),
    re.compile(_MARKER + _LEAD + "(" + _NUMBER + ")"),
)
_MAX_NUMBER_CHARS = 400  # a longer "number" is noise (and Python caps int parsing at 4300 digits)
_MAX_DECIMALS = 20  # past this a fraction is written p/q


def _number_of(token: str) -> Fraction | None:
    """The exact value of one ``_NUMBER`` match, or None (division by zero, absurd length)."""
    if len(token) > _MAX_NUMBER_CHARS:
        return None
    m = _NUMBER_PARTS.fullmatch(token)
    if m is None:
        return None
    try:
        if m["fn"] or m["fn1"]:
            num, den = (m["fn"], m["fd"]) if m["fn"] else (m["fn1"], m["fd1"])
            value = Fraction(num.replace(",", "")) / Fraction(den.replace(",", ""))
            value = (-value if m["fs"] else value) + int(m["fw"] or 0)
        elif m["mw"]:
            value = int(m["mw"]) + Fraction(int(m["mn"]), int(m["md"]))
        else:
            value = Fraction(m["n"].replace(",", "")) / Fraction((m["d"] or "1").replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None
    negative = (m["s1"] in ("-", "−")) != (m["s2"] in ("-", "−"))
    return -value if negative else value


def format_number(value: Fraction) -> str:
    """The canonical string of a number: ``72``, ``0.75``, ``-12.5``, or ``1/3`` (no short decimal)."""
    if value.denominator == 1:
        return str(value.numerator)
    rest, twos, fives = value.denominator, 0, 0
    while rest % 2 == 0:
        rest, twos = rest // 2, twos + 1
    while rest % 5 == 0:
        rest, fives = rest // 5, fives + 1
    places = max(twos, fives)
    if rest != 1 or places > _MAX_DECIMALS:
        return f"{value.numerator}/{value.denominator}"
    digits = str(abs(value.numerator) * 10**places // value.denominator).rjust(places + 1, "0")
    return ("-" if value < 0 else "") + digits[:-places] + "." + digits[-places:]


def number_value(text: str) -> Fraction | None:
    """The value of ``text`` when it is one number (``'1,000.50'``, ``'$5'``, ``'3/4'``, ``'\\frac{1}{2}'``,
    ``'45%'``, ``'-.5'``, ``'1e3'``; a final period is allowed), else None."""
    t = str(text).strip().replace("{,}", ",").rstrip(".").strip()
    if len(t) > _MAX_NUMBER_CHARS:
        return None
    t = re.sub(r"^([-+]?)\.(?=\d)", r"\g<1>0.", t)
    if _SCIENTIFIC.fullmatch(t):
        return Fraction(t)
    return _number_of(t) if _NUMBER_RE.fullmatch(t) else None


def normalize_number(text: str) -> str | None:
    """Canonical string for a number (``'1,000.50'`` → ``'1000.5'``, ``'3/4'`` → ``'0.75'``); None if not a number."""
    value = number_value(text)
    return None if value is None else format_number(value)


def _boxed(text: str, keep: int = 16, width: int = 120) -> list[str]:
    """Contents of the last ``keep`` ``\\boxed{...}`` in ``text`` (nested braces matched, ``width`` chars at most)."""
    out = []
    for m in list(re.finditer(r"\\(?:boxed|fbox)\s*\{", text))[-keep:]:
        depth, i = 1, m.end()
        for j in range(i, min(len(text), i + width)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                out.append(text[i:j])
                break
    return out


def extract_number(text: str, fallback_last: bool = True) -> Extraction:
    """Final numeric answer in ``text``: ``####``, ``\\boxed{}`` (holding one number), "the answer is",
    then (``fallback_last``) the last number."""
    text = text.replace("{,}", ",")  # LaTeX thousands separator: 1{,}234
    tiers = (
        lambda: _NUMBER_MARKED[0].findall(text),
        lambda: [tokens[0] for box in _boxed(text) if len(tokens := _NUMBER_RE.findall(box)) == 1],
        lambda: _NUMBER_MARKED[1].findall(text),
    )
    for hits in tiers:
        for token in reversed(hits()):
            value = _number_of(token)
            if value is not None:
                return Extraction(format_number(value), explicit=True)
    if fallback_last:
        for token in reversed(_NUMBER_RE.findall(text)):
            value = _number_of(token)
            if value is not None:
                return Extraction(format_number(value))
    return Extraction(None, "no number in output")


# --- text -------------------------------------------------------------------------------------------

_TEXT_MARKED = re.compile(_MARKER + r"[:\s]*([^\n]+)")
_ARTICLES = re.compile(r"(?<!\S)(?:a|an|the)(?!\S)", re.I)
_ASCII_PUNCTUATION = frozenset(string.punctuation)


def _is_punctuation(c: str) -> bool:
    return c in _ASCII_PUNCTUATION or unicodedata.category(c).startswith("P")


def _strip_punctuation(s: str) -> str:
    """``s`` without punctuation, except between two letters or digits: "Paris," and "(london)" lose
    theirs, "3.14", "U.S" and "n-a-e-y" keep it (3.14 is not 314; a spelled-out "n-a-e-y" is not the
    word "naey")."""
    n = len(s)
    return "".join(
        c
        for i, c in enumerate(s)
        if not _is_punctuation(c) or (0 < i < n - 1 and s[i - 1].isalnum() and s[i + 1].isalnum())
    )


def _trim(s: str) -> str:
    """``s`` without the dressing of a sentence around an answer: whitespace, quotes, ``*``, backticks,
    colons and final periods."""
    while True:
        t = s.strip().strip(".\"'*`:")
        if t == s:
            return s
        s = t


def normalize_text(s: str, steps: tuple[str, ...] | list[str] = NORMALIZATIONS) -> str:
    """SQuAD-style normalisation, in this order: lowercase, drop punctuation (ASCII and Unicode; not
    inside a word, see ``_strip_punctuation``), drop the words a/an/the, collapse whitespace; each only
    when named in ``steps``. Idempotent."""
    if "case" in steps:
        s = s.lower()
    if "punctuation" in steps:
        s = _strip_punctuation(s)
    if "articles" in steps:
        s = _ARTICLES.sub(" ", s)
    if "whitespace" in steps:
        s = " ".join(s.split())
    return s


def canonical_text(s: str, steps: tuple[str, ...] | list[str] = NORMALIZATIONS) -> str:
    """``s`` trimmed and normalised until stable (an article can hide dressing: "the 'x'"), so a
    canonical answer is its own canonical form."""
    for _ in range(32):
        t = _trim(normalize_text(_trim(s), steps))
        if t == s:
            break
        s = t
    return s


def extract_text(
    text: str, fallback_last: bool = True, normalize: tuple[str, ...] | list[str] = NORMALIZATIONS
) -> Extraction:
    """Final short-text answer: what follows "the answer is", else (``fallback_last``) the last
    non-empty line; trimmed and normalised as ``normalize`` says."""
    hits = _TEXT_MARKED.findall(text)
    candidate = canonical_text(hits[-1], normalize) if hits else ""
    explicit = bool(candidate)
    if not candidate and fallback_last and text.strip():
        candidate = canonical_text(text.strip().splitlines()[-1], normalize)
    if not candidate:
        return Extraction(None, "empty output" if not text.strip() else "no answer in output")
    return Extraction(candidate, explicit=explicit)


def _has_run(tokens: list[str], run: list[str]) -> bool:
    """Whether ``run`` occurs in ``tokens`` as consecutive tokens."""
    n = len(run)
    return any(tokens[i : i + n] == run for i in range(len(tokens) - n + 1))


def token_f1(pred: str, gold: str) -> float:
    """SQuAD token F1 of two normalised strings."""
    p, g = pred.split(), gold.split()
    same = sum((Counter(p) & Counter(g)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


# --- yes/no -----------------------------------------------------------------------------------------

_YES_NO = {"yes": "yes", "no": "no", "true": "yes", "false": "no"}
_YES_NO_WORD = r"(?i:\b(yes|no|true|false)\b)"
_YES_NO_MARKED = re.compile(_MARKER + r"(?:[\s:*$(]|\\boxed\{|\\text(?:bf)?\{){0,8}" + _YES_NO_WORD)
_YES_NO_BOXED = re.compile(r"\\boxed\s*\{\s*(?:\\text(?:bf)?\{\s*)?" + _YES_NO_WORD)
_YES_NO_ANY = re.compile(_YES_NO_WORD)


def extract_yes_no(text: str, fallback_last: bool = True) -> Extraction:
    """yes/no (also true/false): after "the answer is" or in ``\\boxed{}``, else the last yes/no word."""
    m = _YES_NO_MARKED.findall(text) or _YES_NO_BOXED.findall(text)
    if m:
        return Extraction(_YES_NO[m[-1].lower()], explicit=True)
    words = _YES_NO_ANY.findall(text) if fallback_last else []
    return Extraction(_YES_NO[words[-1].lower()]) if words else Extraction(None, "no yes/no in output")


# --- choice -----------------------------------------------------------------------------------------

_CHOICE_AFTER = re.compile(r"(?:[\s:*$]|\\boxed\{|\\text(?:bf)?\{|\\\(|(?i:option|choice|letter)\s){0,8}\(?([A-J])\b")
_CHOICE_BOXED = re.compile(r"\\boxed\s*\{\s*(?:\\text(?:bf)?\{\s*)?\(?([A-J])\b")
_CHOICE_LINE = re.compile(r"[\s*]*(?:(?i:option|choice)\s+)?\(?([A-J])\s*[).:]?[\s*]*")  # a line that is a letter
_OPTION_LINE = re.compile(r"\s*\(?([A-J])\s*[).:]\s*(.*)")  # "B) London", "(B) London", "B. London"
_CHOICE_PAREN = re.compile(r"\(([A-J])\)|(?<![\w(])([A-J])\)")  # "(C)" or "C)"
# An option's label in a question: "A)" "A." "A:" "(A)" at a line's start, or "(A)" / "A)" inline.
_OPTION_LABEL = re.compile(r"(?m)^[ \t]*\(?([A-J])[).:]|\(([A-J])\)|(?<!\S)([A-J])\)")


@lru_cache(maxsize=512)
def question_options(question: str) -> tuple[tuple[str, str], ...]:
    """The options a multiple-choice question lists, as (letter, text): one per line ("A) Paris",
    "A. Paris", "A: Paris", "(A) Paris") or inline ("(A) Paris (B) London"). The last run of labels
    A, B, C, ... in order counts (an earlier "(A) and (B)" in the question's prose does not), two at least."""
    labels = [(m[1] or m[2] or m[3], m.start(), m.end()) for m in _OPTION_LABEL.finditer(question)]
    best: list[tuple[str, int, int]] = []
    run: list[tuple[str, int, int]] = []
    for label in labels:
        if label[0] == "A":
            run = [label]
        elif run and ord(label[0]) == ord(run[-1][0]) + 1:
            run.append(label)
        else:
            continue
        if len(run) >= 2:
            best = list(run)
    options = []
    for i, (letter, _, end) in enumerate(best):
        line_end = question.find("\n", end)
        stop = best[i + 1][1] if i + 1 < len(best) else len(question) if line_end < 0 else line_end
        options.append((letter, question[end:stop].strip()))
    return tuple(options)


@lru_cache(maxsize=512)
def _normalized_options(question: str) -> tuple[tuple[str, str], ...]:
    return tuple((k, normalize_text(v)) for k, v in question_options(question) if normalize_text(v))


def _option_letter(candidate: str, question: str | None, contained: bool) -> str | None:
    """The letter of the question's option that ``candidate`` states: its whole text (after
    normalisation), or with ``contained`` the one option whose text it contains (the longest wins)."""
    options = _normalized_options(question) if question else ()
    c = normalize_text(candidate[:300])
    if not options or not c:
        return None
    exact = [k for k, v in options if v == c]
    if exact or not contained:
        return exact[0] if len(exact) == 1 else None
    tokens = c.split()
    hits = [(len(v.split()), k) for k, v in options if _has_run(tokens, v.split())]
    longest = [k for n, k in hits if n == max(hits)[0]]
    return longest[0] if len(longest) == 1 else None


def extract_choice(text: str, fallback_last: bool = True, question: str | None = None) -> Extraction:
    """Multiple-choice letter A-J. Explicit: the last "the answer is (C)" / "Answer: C" (with
    ``question``, also "the answer is London" for the option London), then ``\\boxed{C}``, or a whole
    output that is just the letter ("C", "C.", "(C)", "C)") or, with ``question``, just an option's text.
    Fallback: the last line in one of those forms ("B) London" too), else the last "(C)". A sentence
    starting "A farmer..." is never read as a letter."""
    for m in list(_MARKER_RE.finditer(text))[-32:][::-1]:
        rest = text[m.end() : m.end() + 300].split("\n", 1)[0]
        letter = _CHOICE_AFTER.match(rest)
        if letter:
            return Extraction(letter[1], explicit=True)
        option = _option_letter(rest, question, contained=True)
        if option:
            return Extraction(option, explicit=True)
    boxed = _CHOICE_BOXED.findall(text)
    if boxed:
        return Extraction(boxed[-1], explicit=True)
    lines = text.strip().splitlines()
    if lines and (fallback_last or len(lines) == 1):
        last = lines[-1]
        m = _CHOICE_LINE.fullmatch(last)
        letter = m[1] if m else None
        if letter is None and (m := _OPTION_LINE.fullmatch(last)):
            option = dict(_normalized_options(question)).get(m[1]) if question else None
            letter = m[1] if option is None or normalize_text(m[2]).startswith(option) else None
        letter = letter or _option_letter(last, question, contained=False)
        if letter:
            return Extraction(letter, explicit=len(lines) == 1)
    letters = _CHOICE_PAREN.findall(text) if fallback_last else []
    return Extraction("".join(letters[-1])) if letters else Extraction(None, "no choice letter in output")


# --- json -------------------------------------------------------------------------------------------

_FENCE = re.compile(r"```[ \t]*(?:json5?|JSON)?[ \t]*\n?(.*?)```", re.S)
_AFTER_MARKER = re.compile(r"[\s:*`]*(?:json\b)?\s*")
_MAX_JSON_STARTS = 64  # "{" / "[" positions tried when no answer is marked
_MAX_JSON_DEPTH = 64  # deeper answers are refused: what handles a value after parsing recurses


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


_DECODER = json.JSONDecoder(parse_constant=_no_constant)


def _tidy(value: Any) -> Any:
    """The same JSON value with integral floats as ints (``1.0`` and ``1`` are one JSON number)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _tidy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_tidy(v) for v in value]
    return value


def canonical_json(value: Any) -> str:
    return json.dumps(_tidy(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _decode(text: str, start: int = 0, whole: bool = False) -> Any:
    """The JSON value at ``text[start:]`` (all of it with ``whole``); ValueError when there is none."""
    try:
        value, end = _DECODER.raw_decode(text, start)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    if whole and text[end:].strip():
        raise ValueError(f"extra data after the JSON value at char {end}")
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > _MAX_JSON_DEPTH:
                raise ValueError(f"JSON nested deeper than {_MAX_JSON_DEPTH} levels")
            stack += [(v, depth + 1) for v in (item.values() if isinstance(item, dict) else item)]
    return _tidy(value)


def _schema_error(validator, value: Any) -> str | None:
    """Why ``value`` fails the schema (the most relevant error, with where), or None when it passes."""
    if validator is None:
        return None
    from jsonschema.exceptions import best_match

    error = best_match(validator.iter_errors(value))
    if error is None:
        return None
    where = f" (at {error.json_path})" if error.path else ""
    return f"answer does not match task.answer.json_schema: {_short(error.message)}{where}"


def extract_json(text: str, fallback_last: bool = True, validator=None) -> Extraction:
    """A JSON answer, valid against ``validator`` (a jsonschema validator) when one is given. Explicit:
    the value after the last "the answer is", else the last ```json fenced block that parses: the first of
    these that parses is the answer (or, failing the schema, the reason). Fallback: the first ``{...}`` /
    ``[...]`` in the text that parses and passes the schema."""
    explicit: list[tuple[str, int, bool]] = []
    markers = list(_MARKER_RE.finditer(text))
    if markers:
        start = _AFTER_MARKER.match(text, markers[-1].end()).end()
        explicit.append((text, start, False))
    explicit += [(block, 0, True) for block in _FENCE.findall(text)[-8:][::-1]]
    parse_error = schema_error = None
    for source, start, whole in explicit:
        try:
            value = _decode(source, start, whole)
        except ValueError as e:
            parse_error = parse_error or f"JSON does not parse: {_short(str(e))}"
            continue
        problem = _schema_error(validator, value)
        return Extraction(None, problem) if problem else Extraction(canonical_json(value), explicit=True)
    if fallback_last:
        for m in list(re.finditer(r"[{\[]", text[:1_000_000]))[:_MAX_JSON_STARTS]:
            try:
                value = _decode(text, m.start())
            except ValueError as e:  # often a brace in prose: the reason only when nothing better
                parse_error = parse_error or f"JSON does not parse: {_short(str(e))}"
                continue
            problem = _schema_error(validator, value)
            if problem is None:
                return Extraction(canonical_json(value))
            schema_error = schema_error or problem
    return Extraction(None, schema_error or parse_error or "no JSON value in output")


def _json_difference(gold: Any, pred: Any, path: str = "$") -> str | None:
    """Where ``pred`` first differs from ``gold`` (every field of a gold object must match, recursively;
    lists match element by element; numbers as numbers, but true is no 1), or None when it matches."""
    if isinstance(gold, dict):
        if not isinstance(pred, dict):
            return path
        for key, value in gold.items():
            where = f"{path}.{key}"
            if key not in pred:
                return where
            if (diff := _json_difference(value, pred[key], where)) is not None:
                return diff
        return None
    if isinstance(gold, list):
        if not isinstance(pred, list) or len(pred) != len(gold):
            return path
        for i, (g, p) in enumerate(zip(gold, pred)):
            if (diff := _json_difference(g, p, f"{path}[{i}]")) is not None:
                return diff
        return None
    if isinstance(gold, bool) or isinstance(pred, bool):
        return None if type(gold) is type(pred) and gold == pred else path
    if isinstance(gold, int | float) and isinstance(pred, int | float):
        return None if gold == pred else path
    return None if gold == pred else path


# --- regex ------------------------------------------------------------------------------------------

_CATEGORY_CHARS = {
    "CATEGORY_DIGIT": "0",
    "CATEGORY_NOT_DIGIT": "x",
    "CATEGORY_SPACE": " ",
    "CATEGORY_NOT_SPACE": "x",
    "CATEGORY_WORD": "x",
    "CATEGORY_NOT_WORD": " ",
    "CATEGORY_LINEBREAK": "\n",
    "CATEGORY_NOT_LINEBREAK": "x",
}
_CATEGORY_TESTS: dict[str, Callable[[str], bool]] = {
    "CATEGORY_DIGIT": str.isdigit,
    "CATEGORY_SPACE": str.isspace,
    "CATEGORY_WORD": lambda c: c.isalnum() or c == "_",
    "CATEGORY_LINEBREAK": lambda c: c == "\n",
}
_REPEATS = ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT")


def _regex_instance(pattern: re.Pattern, answer: str) -> str | None:
    """A short string ``pattern`` matches with ``answer`` as its first group: literals kept, other
    groups and repeats at their minimum, the first branch; None where the pattern has parts this does
    not write (the caller checks the string reads back)."""
    try:
        from re import _parser as sre  # Python 3.11+
    except ImportError:  # pragma: no cover - Python 3.10
        import sre_parse as sre  # type: ignore[no-redef]

    groups: dict[int, str] = {}

    def has_first_group(items) -> bool:
        for op, av in items:
            name = op.name
            if name == "SUBPATTERN" and (av[0] == 1 or has_first_group(av[-1])):
                return True
            if (name in _REPEATS and has_first_group(av[2])) or (name == "ATOMIC_GROUP" and has_first_group(av)):
                return True
            if name == "BRANCH" and any(has_first_group(alt) for alt in av[1]):
                return True
        return False

    def one_char(items) -> str:
        negate = any(op.name == "NEGATE" for op, _ in items)

        def member(c: str) -> bool:
            for op, av in items:
                if (op.name == "LITERAL" and c == chr(av)) or (op.name == "RANGE" and av[0] <= ord(c) <= av[1]):
                    return True
                if op.name == "CATEGORY":
                    base = av.name.replace("_NOT", "")
                    if _CATEGORY_TESTS[base](c) != ("_NOT" in av.name):
                        return True
            return False

        first = [chr(av) if op.name == "LITERAL" else chr(av[0]) for op, av in items if op.name in ("LITERAL", "RANGE")]
        return next(c for c in [*first[:1], *"x0 a#_-."] if member(c) != negate)

    def write(items) -> str:
        out = []
        for op, av in items:
            name = op.name
            if name == "LITERAL":
                out.append(chr(av))
            elif name == "NOT_LITERAL":
                out.append("y" if chr(av) == "x" else "x")
            elif name == "ANY":
                out.append("x")
            elif name == "IN":
                out.append(one_char(av))
            elif name == "CATEGORY":
                out.append(_CATEGORY_CHARS[av.name])
            elif name == "SUBPATTERN":
                text = answer if av[0] == 1 else write(av[-1])
                if av[0]:
                    groups[av[0]] = text
                out.append(text)
            elif name in _REPEATS:
                low, _, sub = av
                count = max(low, 1 if has_first_group(sub) else 0)
                piece = write(sub) if count else ""
                if len(piece) * count > 10_000:
                    raise ValueError("repeat too long to write")
                out.append(piece * count)
            elif name == "BRANCH":
                alts = av[1]
                out.append(write(next((a for a in alts if has_first_group(a)), alts[0])))
            elif name == "ATOMIC_GROUP":
                out.append(write(av))
            elif name == "GROUPREF":
                out.append(groups.get(av, ""))
            elif name not in ("AT", "ASSERT", "ASSERT_NOT"):
                raise ValueError(f"cannot write {name}")
        return "".join(out)

    try:
        return write(sre.parse(pattern.pattern, pattern.flags))
    except Exception:  # best effort: any part it cannot write means no instance
        return None


# --- the task ---------------------------------------------------------------------------------------


def _import_here(module_name: str):
    """``importlib.import_module``, with the current folder on the path as ``python -m`` has it: a
    checker module beside the recipe imports from the ``distill`` command too (Ray workers run there)."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name.split(".")[0] or os.getcwd() in sys.path:
            raise
        sys.path.append(os.getcwd())
        return importlib.import_module(module_name)


def _short(message: str, limit: int = 200) -> str:
    message = " ".join(message.split())
    return message if len(message) <= limit else message[: limit - 1] + "…"


def _verdict(value: Any) -> bool:
    """A checker's return value as correct / wrong: a bool as is, a float in [0, 1] as a score (≥ 0.5
    is correct, NaN is wrong), anything else by its truth value."""
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        score = float(value)
        if math.isnan(score):
            return False
        if 0.0 <= score <= 1.0:
            return score >= 0.5
    return bool(value)


_SANDBOX_LIMITS = ("timeout_s", "memory_mb", "max_processes", "max_output_kb")  # code
_SETTINGS = ("tolerance", "normalize", "match", "f1_threshold", "json_schema", "pattern", "checker", *_SANDBOX_LIMITS)


@dataclass(frozen=True)
class Task:
    """Answer extraction, canonical form and checking for one answer type (settings: ``task.answer``).

    Only the settings of ``answer_type`` matter: ``tolerance`` (number: relative to the gold, 0 = equal),
    ``normalize`` / ``match`` / ``f1_threshold`` (text), ``json_schema`` (json), ``pattern`` (regex),
    ``checker`` (custom), ``timeout_s`` / ``memory_mb`` / ``max_processes`` / ``max_output_kb`` (code: the
    sandbox's limits). Invalid settings are a ``DistillError`` at construction; the schema is checked
    and the pattern compiled there, once; the checker is imported on first use."""

    answer_type: str = "number"
    tolerance: float = 0.0
    normalize: tuple[str, ...] = NORMALIZATIONS
    match: str = "exact"
    f1_threshold: float = 0.8
    json_schema: dict | None = field(default=None, hash=False)
    pattern: str | None = None
    checker: str | None = None
    timeout_s: float = 10.0
    memory_mb: int = 512
    max_processes: int = 16
    max_output_kb: int = 64

    @classmethod
    def from_config(cls, task_cfg) -> Task:
        """The task of a ``TaskConfig`` (duck-typed: ``answer_type`` and the ``answer`` settings, which
        may be missing: defaults)."""
        answer = getattr(task_cfg, "answer", None)
        settings = {k: getattr(answer, k) for k in _SETTINGS if answer is not None and hasattr(answer, k)}
        return cls(task_cfg.answer_type, **settings)

    def __post_init__(self):
        object.__setattr__(self, "normalize", tuple(self.normalize))
        if self.answer_type not in ANSWER_TYPES:
            raise DistillError(f"unknown answer type {self.answer_type!r}", f"use one of {', '.join(ANSWER_TYPES)}")
        unknown = [s for s in self.normalize if s not in NORMALIZATIONS]
        if unknown:
            raise DistillError(
                f"task.answer.normalize has unknown steps {unknown}", f"use any of {', '.join(NORMALIZATIONS)}"
            )
        if self.match not in MATCHES:
            raise DistillError(f"task.answer.match {self.match!r} is unknown", f"use one of {', '.join(MATCHES)}")
        if not self.tolerance >= 0 or math.isinf(self.tolerance):
            raise DistillError(f"task.answer.tolerance {self.tolerance!r} is invalid", "use a relative tolerance ≥ 0")
        if not 0 < self.f1_threshold <= 1:
            raise DistillError(f"task.answer.f1_threshold {self.f1_threshold!r} is invalid", "use a value in (0, 1]")
        if self.answer_type == "regex":
            self._regex  # noqa: B018 - compiles (and checks) the pattern now
        if self.answer_type == "json":
            self._validator  # noqa: B018 - checks the schema now
        if self.answer_type == "custom" and not re.fullmatch(r"[\w.]+:[\w.]+", self.checker or ""):
            raise DistillError(
                f"task.answer.checker {self.checker!r} is not 'module:function'",
                "set task.answer.checker to an entry point such as mypkg.checks:grade",
            )

    # The caches below live in the instance's __dict__ (cached_property writes there, past the frozen
    # __setattr__); pickling (Ray workers) sends only the settings and each side rebuilds them.
    def __getstate__(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def __setstate__(self, state: dict) -> None:
        for key, value in state.items():
            object.__setattr__(self, key, value)

    @cached_property
    def _regex(self) -> re.Pattern:
        if not self.pattern:
            raise DistillError(
                "task.answer_type=regex needs task.answer.pattern", "set it to a regex whose first group is the answer"
            )
        try:
            compiled = re.compile(self.pattern)
        except re.error as e:
            raise DistillError(f"task.answer.pattern {self.pattern!r} is not a valid regex ({e})", "fix it") from None
        if compiled.groups < 1:
            raise DistillError(f"task.answer.pattern {self.pattern!r} has no group", "wrap the answer part in ( )")
        return compiled

    @cached_property
    def _validator(self):
        """A jsonschema validator for ``json_schema`` (its ``$schema`` draft, else Draft 2020-12), or None."""
        if self.json_schema is None:
            return None
        from jsonschema import Draft202012Validator
        from jsonschema.exceptions import SchemaError
        from jsonschema.validators import validator_for

        cls = validator_for(self.json_schema, default=Draft202012Validator)
        try:
            cls.check_schema(self.json_schema)
        except SchemaError as e:
            where = f" at {e.json_path}" if e.path else ""
            raise DistillError(
                f"task.answer.json_schema is not a valid JSON Schema: {_short(e.message)}{where}",
                "fix the schema (https://json-schema.org; Draft 2020-12 unless its $schema names another)",
            ) from None
        return cls(self.json_schema)

    def prepare(self) -> Task:
        """Import what checking runs (a custom checker) now, so a bad entry point is one line before
        any teacher call rather than a worker's error; returns the task."""
        if self.answer_type == "custom":
            self._checker  # noqa: B018 - imports and checks the entry point
        if self.answer_type == "code":
            require_sandbox()
        return self

    @cached_property
    def _checker(self) -> Callable[[str, str], Any]:
        """The custom checker function, imported once."""
        module_name, _, attr = (self.checker or "").partition(":")
        where = f"task.answer.checker {self.checker!r}"
        try:
            target: Any = _import_here(module_name)
        except Exception as e:
            raise DistillError(
                f"{where}: importing {module_name!r} failed ({type(e).__name__}: {_short(str(e))})",
                f"make {module_name.split('.')[0]} importable (pip install -e . in its project, or add its folder "
                "to PYTHONPATH) and fix any error it raises on import",
            ) from None
        for part in attr.split("."):
            if not hasattr(target, part):
                raise DistillError(
                    f"{where}: module {module_name!r} has no attribute {attr!r}",
                    f"define {attr}(answer, gold) -> bool in {module_name}, or fix the name",
                )
            target = getattr(target, part)
        if not callable(target):
            raise DistillError(
                f"{where} is a {type(target).__name__}, not a function",
                "point it at a function grade(answer, gold) -> bool",
            )
        return target

    def extract(self, text: str, fallback_last: bool = True, question: str | None = None) -> Extraction:
        """The canonical final answer in a model's ``text`` (see the module docstring). ``fallback_last``
        False: only an explicitly stated answer, no guess from the last number or line. ``question``:
        lets a choice answer name an option by its text."""
        t = self.answer_type
        if t == "number":
            return extract_number(text, fallback_last)
        if t == "yes_no":
            return extract_yes_no(text, fallback_last)
        if t == "choice":
            return extract_choice(text, fallback_last, question)
        if t in ("text", "custom"):
            return extract_text(text, fallback_last, self.normalize if t == "text" else ())
        if t == "json":
            return extract_json(text, fallback_last, self._validator)
        if t == "open":
            whole = text.strip()
            return Extraction(whole, explicit=True) if whole else Extraction(None, "empty output")
        if t == "code":
            code, explicit = extract_code(text, fallback_last)
            return Extraction(code, explicit=explicit) if code else Extraction(None, "no Python code block in output")
        last = None
        for last in self._regex.finditer(text):  # noqa: B007 - the last match is the answer
            pass
        if last is None:
            return Extraction(None, f"no match of task.answer.pattern {_short(self.pattern or '', 80)!r} in output")
        answer = (last.group(1) or "").strip()
        if not answer:
            return Extraction(None, "the last match of task.answer.pattern has an empty first group")
        return Extraction(answer, explicit=True)

    def normalize_gold(self, gold, question: str | None = None) -> str:
        """The dataset's gold answer in canonical form (idempotent: a normalised gold stays as it is);
        a gold that cannot be one is a ``DistillError`` naming it and the fix."""
        t = self.answer_type
        shown = _short(repr(gold), 120)
        if t == "number":
            value = normalize_number(str(gold))
            if value is None:
                found = extract_number(str(gold), fallback_last=False)
                numbers_in = _NUMBER_RE.findall(str(gold)[:100_000].replace("{,}", ","))
                if found.answer is None and len(numbers_in) == 1:
                    found = extract_number(numbers_in[0])
                value = found.answer
            if value is None:
                raise DistillError(
                    f"gold answer {shown} is not a number (nor a solution ending '#### <number>' or "
                    "'the answer is <number>', nor text holding one number)",
                    "fix the gold, or set task.answer_type=text",
                )
            return value
        if t == "yes_no":
            value = _YES_NO.get(str(gold).strip().strip(".").lower())
            if value is None:
                raise DistillError(f"gold answer {shown} is not yes/no", "set task.answer_type=text")
            return value
        if t == "choice":
            return _choice_gold(gold, question, shown)
        if t == "text":
            return canonical_text(str(gold), self.normalize)
        if t == "json":
            if gold is None or (isinstance(gold, str) and not gold.strip()):
                return ""
            if not isinstance(gold, str):
                return canonical_json(gold)
            try:
                return canonical_json(_decode(gold.strip(), whole=True))
            except ValueError as e:
                raise DistillError(
                    f"gold answer {shown} is not JSON ({_short(str(e), 80)})",
                    'write the gold as JSON (e.g. {"age": 30}), or leave it empty to accept any answer that '
                    "matches task.answer.json_schema",
                ) from None
        if t == "regex":
            return str(gold).strip()
        if t == "code":
            return tests_source(gold)
        if t == "open":
            return str(gold).strip()
        return gold if isinstance(gold, str) else str(gold)

    def is_correct(self, pred: str | None, gold, question: str | None = None) -> bool:
        """Whether the extracted ``pred`` answers ``gold`` (raw or normalised): ``check(...)[0]``."""
        return self.check(pred, gold, question)[0]

    def check(self, pred: str | None, gold, question: str | None = None) -> tuple[bool, str | None]:
        """(correct, why not) for the extracted answer ``pred`` against the raw or normalised ``gold``;
        the reason is None unless there is one worth keeping on the row.

        number: equal values, or within ``tolerance`` of the gold (relative: ``|pred - gold| <=
        tolerance * |gold|``). text: ``match`` after ``normalize``: exact, contains (the gold's tokens
        appear consecutively in the prediction's), or token F1 ≥ ``f1_threshold``. json: the prediction
        passes the schema; an empty gold accepts any valid answer, else every field of the gold must equal
        the prediction's (recursively; ``1 == 1.0``). regex: equal stripped strings. choice / yes_no: equal.
        code: the solution and the gold's tests run to their end in the sandbox (the reason names the
        failing test line or the limit hit). open: never correct (there is no gold check; a judge decides).

        custom: ``grade(answer, gold)`` from ``task.answer.checker`` decides: ``answer`` is ``pred`` (the
        extracted text, case kept), ``gold`` the dataset's gold string as given. A bool is the verdict, a
        float in [0, 1] a score (≥ 0.5 is correct), anything else counts by ``bool``. If ``grade`` raises,
        the answer is wrong with the reason ``"checker mypkg.checks:grade raised ValueError: ..."``; the
        exception never propagates. An entry point that cannot be imported is a ``DistillError``."""
        t = self.answer_type
        if t == "custom":
            grade = self._checker
            if pred is None:
                return False, None
            try:
                return _verdict(grade(pred, gold if isinstance(gold, str) else str(gold))), None
            except Exception as e:
                return False, f"checker {self.checker} raised {type(e).__name__}: {_short(str(e))}"
        if pred is None:
            return False, None
        if t == "open":
            return False, None  # no gold check: a judge decides (teacher.keep=judged)
        if t == "json":
            return self._check_json(pred, gold)
        if t == "code":
            limits = {k: getattr(self, k) for k in _SANDBOX_LIMITS}
            return check_code(pred, self.normalize_gold(gold), **limits)
        g = self.normalize_gold(gold, question)
        if t == "number":
            p, want = number_value(pred), number_value(g)
            if p is None or want is None:
                return False, None
            return (p == want if not self.tolerance else abs(p - want) <= Fraction(self.tolerance) * abs(want)), None
        if t == "text":
            return self._text_match(canonical_text(pred, self.normalize), g), None
        if t == "yes_no":
            return _YES_NO.get(pred.strip().lower()) == g, None
        return pred.strip() == g, None

    def _text_match(self, pred: str, gold: str) -> bool:
        if not pred or not gold:
            return False
        if self.match == "exact":
            return pred == gold
        if self.match == "contains":
            return _has_run(pred.split(), gold.split())
        return token_f1(pred, gold) >= self.f1_threshold - 1e-12

    def _check_json(self, pred: str, gold) -> tuple[bool, str | None]:
        try:
            value = _decode(pred.strip(), whole=True)
        except ValueError as e:
            return False, f"answer is not JSON: {_short(str(e))}"
        problem = _schema_error(self._validator, value)
        if problem:
            return False, problem
        g = self.normalize_gold(gold)
        if not g:
            return True, None
        try:
            where = _json_difference(json.loads(g), value)
        except RecursionError:
            return False, "answer nested too deeply to compare"
        return where is None, None if where is None else f"answer differs from the gold at {where}"

    def answer_sentence(self, answer: str) -> str:
        """How a training target states its final answer: one that ``extract`` reads back as ``answer``
        (a canonical answer). For regex answers, a string the pattern matches with ``answer`` as its
        group: "Therefore, the answer is <answer>.", else one written from the pattern, else the answer."""
        sentence = f"Therefore, the answer is {answer}."
        if self.answer_type == "open":
            return ""  # the response is the answer: nothing to state again after it
        if self.answer_type == "code":
            return code_sentence(answer)
        if self.answer_type != "regex":
            return sentence
        for candidate in (sentence, _regex_instance(self._regex, answer), answer):
            if candidate is not None and self.extract(candidate).answer == answer.strip():
                return candidate
        raise DistillError(
            f"task.answer.pattern {_short(self.pattern or '', 80)!r} cannot state the answer {_short(answer, 80)!r}",
            "use a pattern whose first group matches the answers (e.g. 'answer is (.+?)\\.?$')",
        )


def _choice_gold(gold, question: str | None, shown: str) -> str:
    """The letter of a choice gold: "C", "(c)", "C)", "the answer is C", "\\boxed{C}", or an option's text."""
    s = str(gold).strip()
    letter = s.strip(".()").upper()
    if re.fullmatch(r"[A-J]", letter):
        return letter
    found = extract_choice(s, True, question).answer if s else None
    if found:
        return found
    if re.fullmatch(r"\d+", s):
        raise DistillError(
            f"gold answer {shown} is an option number, not a choice letter A-J",
            "map it to a letter in task.columns.answer, e.g. \"{{ 'ABCDEFGHIJ'[answer] }}\" (0-based)",
        )
    if question and question_options(question):
        fix = "write the gold as a letter, or as one option's exact text"
    else:
        fix = "write the gold as a letter A-J (option text maps to a letter only when the question lists options)"
    raise DistillError(f"gold answer {shown} is not a choice letter A-J nor an option of the question", fix)
