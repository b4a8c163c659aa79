"""Code tasks (``task.answer_type: code``): the answer is a Python solution, the gold is its tests.

The solution is the last ```` ```python ```` fenced block of an output (``py``/``python3`` too), else
its last fenced block with no language, else (only when guessing is allowed) the whole output when it
parses as Python. ``ast.parse`` only checks syntax: nothing of an output runs in this process. The
canonical answer is that code, dedented and stripped. The gold is Python source, typically
``assert f(1) == 2`` lines; a list of such strings (as datasets store MBPP's ``test_list``) is joined
with newlines. A solution is correct when ``solution + "\\n\\n" + tests`` runs to its end and exits 0
in ``distill.core.sandbox``.

Fences are read line by line (CommonMark's rule: a block closes at a line of at least as many
backticks and nothing else), so a long output costs linear time.
"""

from __future__ import annotations

import ast
import json
import re
import textwrap
from functools import cache

from distill.core.errors import DistillError
from distill.core.sandbox import run_python

PYTHON_TAGS = ("python", "py", "python3")
_MAX_WHOLE_PARSE = 200_000  # chars: a longer unfenced output is not tried as a program


def _fences(lines: list[str]) -> list[tuple[int, int, str]]:
    """(opening line, closing line, language tag) of each closed fenced block among ``lines``."""
    out, fence, start, tag = [], "", 0, ""
    for i, line in enumerate(lines):
        s = line.strip()
        if not fence:
            m = re.match(r"`{3,}", s)
            if m and "`" not in s[m.end() :]:  # an info string holds no backtick
                fence, start, tag = m.group(), i, (s[m.end() :].split() or [""])[0].lower()
        elif s.startswith(fence) and not s.strip("`"):
            out.append((start, i, tag))
            fence = ""
    return out


def _body(lines: list[str], start: int, end: int) -> str:
    return textwrap.dedent("\n".join(lines[start + 1 : end]))


def _parses(source: str) -> bool:
    try:
        ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return True


def extract_code(text: str, fallback_last: bool = True) -> tuple[str | None, bool]:
    """(the solution's canonical code or None, whether it was fenced: an explicit answer)."""
    lines = text.splitlines()
    blocks = [(tag, _body(lines, a, b)) for a, b, tag in _fences(lines)]
    for wanted in (PYTHON_TAGS, ("",)):
        code = next((b.strip() for t, b in reversed(blocks) if t in wanted and b.strip()), None)
        if code is not None:
            return code, True
    whole = text.strip()
    if fallback_last and whole and len(whole) <= _MAX_WHOLE_PARSE and _parses(whole):
        return textwrap.dedent(text).strip(), False
    return None, False


def tests_source(gold) -> str:
    """The gold's tests as one Python program: a list (or a JSON list) of strings joined by newlines,
    stripped. A gold that is no Python, or empty, is a ``DistillError`` (caught before teacher calls)."""
    if isinstance(gold, str) and gold.lstrip().startswith("["):
        try:
            decoded = json.loads(gold)
        except ValueError:
            decoded = None
        if isinstance(decoded, list) and all(isinstance(t, str) for t in decoded):
            gold = decoded
    if isinstance(gold, list | tuple):
        gold = "\n".join(str(t).strip() for t in gold)
    tests = str(gold if gold is not None else "").strip()
    shown = tests[:100] + ("…" if len(tests) > 100 else "")
    if not tests:
        raise DistillError("a code task's gold is empty", "give each problem its tests (e.g. assert f(1) == 2 lines)")
    if not _parses(tests):
        raise DistillError(
            f"gold tests {shown!r} are not valid Python", "write the gold as Python test code (assert lines)"
        )
    return tests


@cache
def _sandbox_problem() -> str | None:
    result = run_python("pass", timeout_s=30)
    return None if result.ok else result.reason or "it failed"


def require_sandbox() -> None:
    """Start the sandbox once (cached) so one that cannot run here is one line before any teacher call,
    not a reason on every row."""
    problem = _sandbox_problem()
    if problem:
        raise DistillError(
            f"the sandbox that runs code tasks' tests does not start here: {problem}",
            "as root, install Python where other users can read it (the tests run as an unprivileged uid) or "
            "allow unshare (CAP_SYS_ADMIN), which lets the sandbox mount it",
        )


def check_code(code: str, tests: str, **limits) -> tuple[bool, str | None]:
    """(passed, why not): the solution and its tests run in the sandbox with ``limits`` (``run_python``'s
    keywords). Why not names the failing test line ("tests failed: AssertionError at line 3 of the
    tests: assert f(2) == 5") or the limit that was hit ("timed out after 10 s")."""
    result = run_python(f"{code}\n\n{tests}", **limits)
    if result.ok:
        return True, None
    if result.line is None or result.reason is None:
        return False, result.reason
    base = result.reason.removesuffix(f" at line {result.line}")
    code_lines = code.count("\n") + 1
    if result.line > code_lines + 1:
        k = result.line - code_lines - 1
        lines = tests.splitlines()
        text = lines[k - 1].strip() if k <= len(lines) else ""
        text = text if len(text) <= 120 else text[:119] + "…"
        where, prefix = f"at line {k} of the tests" + (f": {text}" if text else ""), "tests failed: "
    else:
        where, prefix = f"at line {result.line} of the solution", "solution failed: "
    return False, f"{prefix if result.error else ''}{base} {where}"


def code_sentence(code: str) -> str:
    """The solution as a fenced ```` ```python ```` block that ``extract_code`` reads back as ``code``
    (a fence longer than any backtick run that starts one of its lines)."""
    runs = [len(m.group(1)) for m in re.finditer(r"(?m)^[ \t]*(`{3,})", code)]
    fence = "`" * max(3, max(runs, default=0) + 1)
    return f"{fence}python\n{code}\n{fence}"


def without_solution(rationale: str, code: str) -> str:
    """``rationale`` without the last fenced block that holds the solution ``code`` (a teacher's output
    includes it): a training target states the solution once, in its answer sentence."""
    lines = rationale.splitlines()
    for start, end, _ in reversed(_fences(lines)):
        if _body(lines, start, end).strip() == code.strip():
            return "\n".join(lines[:start] + lines[end + 1 :]).strip()
    return rationale
