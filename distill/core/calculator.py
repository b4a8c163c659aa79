"""A calculator for decoding: when a model has just written an arithmetic expression and ``=``, the
decoder writes the result for it.

Small students learn a teacher's plan ("18 − 3 = …, then … / 3 = …") long before they learn its
arithmetic: most of their wrong answers on word problems are one wrong sum in a right chain. GSM8K's
solutions carry calculator annotations for that reason (Cobbe et al., 2021: at test time a calculator
overrides the model's result after each ``<<expr=``); this module does the same on plain rationale
text, so no annotation is needed in the training data — the teacher's own ``8 + 2 = 10`` steps are the
pattern. ``forced_text(text)`` returns what to write next, or None when the text does not end in an
expression the calculator can read.

Teachers that write LaTeX (``\\[ 3 \\text{ hours} + 5 \\text{ hours} = 8 \\text{ hours} \\]``,
``\\frac{24}{3}``) are read too: on the line being written, ``\\text{…}`` unit labels, ``\\$`` and LaTeX
spacing are blanked and ``\\frac{a}{b}`` is read as ``(a)/(b)`` before the expression is looked for.

Model output is untrusted: the expression is parsed by a small recursive-descent parser over exact
fractions (no ``eval``), bounded in length, digits, nesting and result size. Only ``+ - * / × ÷ ·``,
``\\times``, ``\\div``, ``\\cdot``, parentheses, unary minus and decimal numbers are read; an expression
glued to a word, a variable, a thousands separator, an exponent or a percentage is left alone, since
its value is not what the visible digits say.

This file imports nothing outside the standard library: export bundles carry a copy next to the
torch-free runtime.
"""

from __future__ import annotations

import re
from fractions import Fraction

MAX_EXPRESSION_CHARS = 120
MAX_NUMBER_DIGITS = 15
MAX_DEPTH = 8
MAX_RESULT = Fraction(10) ** 15
DECIMALS = 4  # a result that is no finite decimal is rounded to this many places
# how many of a row's last tokens a decoder decodes to look for an expression (more than any it reads)
WINDOW_TOKENS = 48

_OPERATOR_WORDS = {"\\times": "*", "\\cdot": "*", "\\div": "/", "×": "*", "·": "*", "÷": "/", "−": "-"}
# The longest run of expression characters that ends in "=" (optionally followed by spaces) at the
# very end of the text. Newlines end a run: an "=" at the end of a line is rarely the middle of a sum.
_TAIL = re.compile(r"((?:\d|\.|[ \t]|[-+*/×÷·−()]|\\times|\\div|\\cdot)+)=([ \t]*)$")
_TOKEN = re.compile(r"\d+(?:\.\d+)?|[-+*/()]")
# what may stand right before an expression that starts without a space: a letter, a number's
# separator or a power makes the visible digits a fragment of something else ("x2 + 2 =",
# "1,200 + 5 =", "2^3 + 1 =")
_GLUED = re.compile(r"[\w,.^_]$")
# LaTeX on the line being written: unit labels and spacing are blanked, fractions read as divisions
_LATEX_LABEL = re.compile(r"\\(?:text|mathrm|textrm|textit|textbf|mbox)\s*\{[^{}\n]{0,80}\}")
_LATEX_BLANK = re.compile(r"\\(?:[,;:! $]|q?quad\b|left\b|right\b)")
_LATEX_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}\n]{1,80})\}\s*\{([^{}\n]{1,80})\}")
LINE_CHARS = 400  # how much of the line being written is read for LaTeX


class _Unreadable(ValueError):
    pass


def evaluate(expression: str) -> Fraction:
    """The exact value of ``expression`` (numbers, + - * /, parentheses, unary minus).

    Raises ValueError for anything else, division by zero, or past the bounds above."""
    for word, op in _OPERATOR_WORDS.items():
        expression = expression.replace(word, op)
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise _Unreadable("expression too long")
    # Tokens are read with the spaces between them kept apart: "3 4 + 1" is two numbers side by side
    # (unreadable), not 34 + 1.
    tokens = _TOKEN.findall(expression)
    if "".join(tokens) != re.sub(r"\s+", "", expression) or not tokens:
        raise _Unreadable("not an arithmetic expression")
    pos = 0

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> str:
        nonlocal pos
        pos += 1
        return tokens[pos - 1]

    def expr(depth: int) -> Fraction:
        value = term(depth)
        while peek() in ("+", "-"):
            value = value + term(depth) if take() == "+" else value - term(depth)
        return value

    def term(depth: int) -> Fraction:
        value = factor(depth)
        while peek() in ("*", "/"):
            op, rhs = take(), factor(depth)
            if op == "/" and rhs == 0:
                raise _Unreadable("division by zero")
            value = value * rhs if op == "*" else value / rhs
        return value

    def factor(depth: int) -> Fraction:
        if depth > MAX_DEPTH:
            raise _Unreadable("nested too deeply")
        tok = peek()
        if tok == "-":
            take()
            return -factor(depth + 1)
        if tok == "(":
            take()
            value = expr(depth + 1)
            if peek() != ")":
                raise _Unreadable("unbalanced parentheses")
            take()
            return value
        if tok is None or not tok[0].isdigit():
            raise _Unreadable("a number was expected")
        take()
        if len(tok.replace(".", "")) > MAX_NUMBER_DIGITS:
            raise _Unreadable("number too long")
        return Fraction(tok)

    value = expr(0)
    if pos != len(tokens):
        raise _Unreadable("trailing tokens")
    if abs(value) > MAX_RESULT:
        raise _Unreadable("result too large")
    return value


def format_number(value: Fraction) -> str:
    """``value`` as the model would write it: an integer, or a decimal (rounded to DECIMALS places
    when it does not terminate)."""
    if value.denominator == 1:
        return str(value.numerator)
    text = f"{float(round(value, DECIMALS)):.{DECIMALS}f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def forced_text(text: str) -> str | None:
    """What the calculator writes after ``text``, or None.

    ``text`` (a model's output so far) must end in ``<expression> =`` with at least one operator
    between two numbers; the answer is the expression's value, with a leading space unless the text
    already ends in one: ``"so 8 + 2 ="`` → ``" 10"``, ``"(3 + 4) × 2 = "`` → ``"14"``."""
    line = _plain_latex(text[-LINE_CHARS:].rpartition("\n")[2]) if "\\" in text[-LINE_CHARS:] else text
    match = _TAIL.search(line[-(MAX_EXPRESSION_CHARS + 16) :])
    if match is None:
        return None
    expression, spaces = match.group(1), match.group(2)
    head = line[: len(line) - len(match.group(0))]
    glued = expression[:1] not in (" ", "\t") and _GLUED.search(head)
    if glued or not re.search(r"\d[\s)]*(?:[-+*/×÷·−]|\\times|\\div|\\cdot)[\s(]*-?[\s(]*\d", expression):
        return None
    try:
        value = evaluate(expression)
    except ValueError:  # _Unreadable, or a Fraction that would not parse
        return None
    return ("" if spaces else " ") + format_number(value)


def _plain_latex(line: str) -> str:
    """``line`` with LaTeX unit labels, ``\\$`` and spacing blanked and ``\\frac{a}{b}`` as ``(a)/(b)``
    (the innermost fractions first, twice: a fraction of fractions is read, deeper ones are not)."""
    line = _LATEX_BLANK.sub(" ", _LATEX_LABEL.sub(" ", line))
    for _ in range(2):
        line = _LATEX_FRAC.sub(r"(\1)/(\2)", line)
    return line


def continues_number(token: str) -> bool:
    """Whether a vocabulary entry would extend a number written just before it ("0", "5k", ".5")."""
    return token[:1].isdigit() or (token[:1] == "." and token[1:2].isdigit())


def number_token_ids(vocab: dict[str, int]) -> list[int]:
    """The ids of a tokenizer vocabulary (``get_vocab()``) that ``continues_number``."""
    return [i for token, i in vocab.items() if continues_number(token)]


class CalculatorState:
    """Per-row bookkeeping for a decoder: which tokens the calculator still has to write.

    Before choosing each row's next token a decoder calls ``next_forced(row, text_so_far)``: a token id
    to write instead of the model's choice, or None. On the step right after a written value,
    ``blocks_digits(row)`` is True and the decoder bans the ``number_tokens`` ids (vocabulary entries
    that would extend the number: the model must not turn a written "-5" into "-50"). ``encode`` turns
    the calculator's text into token ids (the tokenizer's, without special tokens)."""

    def __init__(self, rows: int, encode, number_tokens=()):
        self.encode = encode
        self.number_tokens = list(number_tokens)
        self.pending: list[list[int]] = [[] for _ in range(rows)]
        self.written = [False] * rows
        self.block = [False] * rows
        self.calls = 0

    def next_forced(self, row: int, text: str) -> int | None:
        self.block[row] = False
        if not self.pending[row]:
            if self.written[row]:  # the step after a value: the model writes, but not more digits
                self.written[row] = False
                self.block[row] = True
                return None
            forced = forced_text(text)
            if forced is None:
                return None
            self.pending[row] = list(self.encode(forced))
            self.calls += 1
            if not self.pending[row]:
                return None
        token = self.pending[row].pop(0)
        self.written[row] = not self.pending[row]
        return token

    def blocks_digits(self, row: int) -> bool:
        return self.block[row] and bool(self.number_tokens)
