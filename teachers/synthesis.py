"""Task-data synthesis (self-instruct, Wang et al. 2022): the teacher writes new tasks from seed examples.

Each request shows a few seed tasks (a seeded random choice per request) and asks for one new task of
the same kind. Three kinds (``task.synthesis``):

- ``problems``: a problem statement (no gold: the configured method's self-consistency vote labels it);
- ``instructions``: an instruction and its input (possibly empty), answered free-form (``open``);
- ``code``: a programming problem with its ``assert`` tests; the teacher's own solution (the configured
  method, through the same completion cache the generate stage reads) runs in the sandbox against
  them, and the problem is kept only when it passes.

Model output is untrusted: a candidate that does not parse is dropped with its reason, counted, and
kept in the candidate log (never silently). Candidates are normalised and dropped when they duplicate —
exactly or nearly (word 3-gram Jaccard at or above a threshold; MinHash LSH past ``lsh_rows`` texts:
``teachers.dedup``) — a seed, an evaluation problem (so the student never trains on its test) or an
earlier candidate.
"""

from __future__ import annotations

import ast
import random
import re
from collections import Counter
from collections.abc import Callable

from distill.teachers.backends.base import Decoding, GenerationRequest
from distill.teachers.dedup import LSH_ROWS, NearDuplicateIndex, normalize_question, shingles

__all__ = [
    "NearDuplicateIndex",
    "normalize_question",
    "shingles",
    "parse_problem",
    "parse_instruction",
    "parse_code_problem",
    "synthesize",
    "synthesize_problems",
    "synthesize_instructions",
    "synthesize_code",
    "read_instruction_seeds",
]

INSTRUCTION = (
    "Here are example problems:\n\n{examples}\n\nWrite one new problem of the same kind and difficulty, with "
    "different numbers, names and wording. Reply with the problem only, without its solution."
)
INSTRUCTIONS_PROMPT = (
    "Come up with a new task for an AI assistant. Here are example tasks:\n\n{examples}\n\nWrite one new task, "
    "different from these in topic and wording: an instruction, and the input it works on when it needs one "
    "(else <noinput>). Do not answer it. Reply in this format:\nInstruction: <the instruction>\n"
    "Input: <the input, or <noinput>>"
)
CODE_PROMPT = (
    "Here are example programming problems, each with its tests:\n\n{examples}\n\nWrite one new programming "
    "problem of the same kind, different from these: say what the Python function is called, what it takes and "
    "what it returns, then write 2 to 5 assert tests that call it. Do not write the solution. Reply in this "
    "format:\nProblem: <the problem>\nTests:\n```python\nassert ...\n```"
)
NO_INPUT = {"", "<noinput>", "<no input>", "noinput", "no input", "none", "(none)", "n/a", "na", "-", "empty", '""'}
# Self-instruct's filter: tasks a text model cannot do (the teacher cannot see or make these)
NON_TEXT = re.compile(r"\b(?:image|images|picture|pictures|photo|photos|graph|graphs|draw|plot|video|audio)\b", re.I)
_LABEL = re.compile(
    r"^[ \t*#_>-]{0,8}(instruction|input|output|response|answer|solution|task|example)[ \t]*\d{0,3}[ \t*_]{0,4}[:：]"
    r"[ \t*_]{0,4}",
    re.I,
)
_NEXT_TASK = re.compile(r"^[ \t*#_]{0,8}(?:task|example)[ \t]*\d{1,3}[ \t*_:.]{0,4}$", re.I)  # "Task 2", "## Example 3"
_MAX_LINE = 4000  # chars: a longer line is cut before the label regex sees it


def _seeded_sample(seed: int, sample: int, pool: list, shots: int) -> list:
    rng = random.Random(seed * 1_000_003 + sample)
    return rng.sample(pool, min(shots, len(pool)))


# --- parsing untrusted outputs ---------------------------------------------------------------------


def parse_problem(text: str) -> str | None:
    """The problem statement in a completion: leading label dropped, solution cut off."""
    text = re.sub(r"^\s*(?:new\s+)?problem\s*\d*\s*[:.]\s*", "", text.strip(), flags=re.I)
    text = re.split(r"\n\s*(?:solution|answer|step 1|let's)\b", text, maxsplit=1, flags=re.I)[0]
    text = text.strip().strip('"').strip()
    return text if 5 <= len(text.split()) <= 200 else None


def _tidy(text: str) -> str:
    """Surrounding whitespace, quotes and markdown emphasis dropped."""
    return text.strip().strip("*_").strip().strip("\"'`").strip()


def parse_instruction(text: str, finish_reason: str = "stop") -> tuple[dict | None, str | None]:
    """({"instruction", "input"}, None), or (None, why not) for a completion of the instructions prompt
    (which ends with "Instruction:", so the output starts with the instruction itself).

    Read line by line: an ``Input:`` line starts the input; an ``Output:``/``Response:``/``Answer:``/
    ``Solution:`` line, a second ``Instruction:`` or a ``Task 2:`` ends the task (what the teacher wrote
    after it is ignored). ``<noinput>``, ``none``, ``n/a``… mean an empty input."""
    if not text.strip():
        return None, "empty output"
    parts: dict[str, list[str]] = {"instruction": [], "input": []}
    part, ended = "instruction", False
    for raw in text.replace("\r\n", "\n").split("\n"):
        line = raw[:_MAX_LINE]
        m = _LABEL.match(line)
        if _NEXT_TASK.match(line):
            ended = True
            break
        if m:
            label, rest = m.group(1).lower(), line[m.end() :]
            if label == "instruction" and not any(s.strip() for s in parts["instruction"]):
                parts["instruction"].append(rest)
                continue
            if label == "input" and part == "instruction" and not parts["input"]:
                part = "input"
                parts["input"].append(rest)
                continue
            ended = True  # an output, a second task or a second input: the task ended before it
            break
        parts[part].append(line)
    instruction = _tidy("\n".join(parts["instruction"]))
    given = _tidy("\n".join(parts["input"]))
    if part == "instruction":  # "Sort the numbers. Input: 3, 1, 2" on one line
        head, sep, tail = instruction.partition(" Input:")
        if sep:
            instruction, given = _tidy(head), _tidy(tail)
    given = "" if given.lower() in NO_INPUT else given
    if finish_reason == "length" and not ended:
        return None, "truncated (max_new_tokens reached before the task ended)"
    if not instruction:
        return None, "no instruction"
    words = len(instruction.split())
    if words < 3:
        return None, "instruction under 3 words"
    if words > 150:
        return None, "instruction over 150 words"
    if len(given.split()) > 400:
        return None, "input over 400 words"
    if not instruction[0].isalnum():
        return None, "instruction starts with punctuation"
    if NON_TEXT.search(instruction):
        return None, "needs a non-text modality (image, graph, audio…)"
    return {"instruction": instruction, "input": given}, None


def instruction_question(instruction: str, given: str = "") -> str:
    """What the teacher (and the student) is asked: the instruction, then its input when it has one."""
    return f"{instruction.strip()}\n\n{given.strip()}" if given and given.strip() else instruction.strip()


def _calling_asserts(source: str) -> list[str] | None:
    """The top-level ``assert`` statements of ``source`` that call something, as source text; None when
    ``source`` is no Python."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    return [
        ast.get_source_segment(source, node) or ast.unparse(node)
        for node in tree.body
        if isinstance(node, ast.Assert) and any(isinstance(n, ast.Call) for n in ast.walk(node.test))
    ]


def _asserts(source: str) -> list[str]:
    """``_calling_asserts`` of ``source``, else (it is no Python) of each of its ``assert`` lines."""
    found = _calling_asserts(source)
    if found is not None:
        return found
    return [t for line in source.splitlines() if line.startswith("assert ") for t in _calling_asserts(line) or []]


def parse_code_problem(text: str, finish_reason: str = "stop") -> tuple[dict | None, str | None]:
    """({"question", "tests"}, None), or (None, why not) for a completion of the code prompt (which ends
    with "Problem:"). The problem is the text before the first ``Tests:`` line or code fence; the tests
    are the top-level ``assert`` lines that call something in the fenced blocks after it (else its bare
    ``assert`` lines): a solution the teacher wrote anyway is not taken as a test. At most 10."""
    lines = text.replace("\r\n", "\n").split("\n")
    cut = next(
        (i for i, s in enumerate(lines) if s.lstrip().startswith("```") or re.match(r"^[ \t*#]*tests?\b", s, re.I)),
        len(lines),
    )
    question = _tidy(re.sub(r"^\s*(?:new\s+)?problem\s*\d*\s*[:.]\s*", "", "\n".join(lines[:cut]), flags=re.I))
    if not question:
        return None, "no problem statement"
    if not 5 <= len(question.split()) <= 300:
        return None, "problem statement not 5-300 words"
    blocks, fence, body = [], None, []
    for line in lines[cut:]:
        s = line.strip()
        if fence is None and s.startswith("```"):
            fence, body = s[: len(s) - len(s.lstrip("`"))], []
        elif fence is not None and s.startswith(fence) and not s.strip("`"):
            blocks.append("\n".join(body))
            fence = None
        elif fence is not None:
            body.append(line)
    if fence is not None and body:  # an unclosed block (the output ran out): what it holds so far
        blocks.append("\n".join(body))
    tests: list[str] = []
    for source in blocks or ["\n".join(s.strip() for s in lines[cut:])]:
        for t in _asserts(source):
            if t not in tests:
                tests.append(t)
    if not tests:
        return None, "no tests (no assert calling a function)"
    return {"question": question, "tests": "\n".join(tests[:10])}, None


def read_instruction_seeds(path: str) -> list[dict]:
    """The rows of an instruction seed file (JSONL / JSON / CSV / Parquet) as ``{"instruction", "input",
    "output"}`` (input ``""`` when absent, output None when absent); a row without an instruction is one
    ``DistillError`` naming the file and the row."""
    from distill.core.errors import DistillError
    from distill.core.inputs import file_rows

    rows = file_rows(path)
    out = []
    for i in range(len(rows)):
        r = rows[i]
        where = f"{rows.what} {rows.where(i)}"
        if not isinstance(r, dict) or not isinstance(r.get("instruction"), str) or not r["instruction"].strip():
            raise DistillError(
                f"{where} has no instruction",
                'each seed row is {"instruction": "...", "input": "...", "output": "..."}',
            )
        given, output = r.get("input") or "", r.get("output")
        if not isinstance(given, str) or not (output is None or isinstance(output, str)):
            raise DistillError(f"{where}: input and output must be text", "write them as strings (input may be empty)")
        out.append({"instruction": r["instruction"].strip(), "input": given.strip(), "output": output})
    return out


def instruction_split(path: str, eval_size: int) -> tuple[list[dict], list[dict]]:
    """(seed tasks, eval problems) of an instruction seed file: the last ``eval_size`` rows are the eval
    split (their output the reference), the rest the seeds shown to the teacher."""
    from distill.core.errors import DistillError

    rows = read_instruction_seeds(path)
    if len(rows) <= eval_size:
        raise DistillError(f"{path} has {len(rows)} rows, not more than task.eval_size={eval_size}", "lower it")
    evals = [
        {
            "id": f"eval-{k:06d}",
            "split": "eval",
            "question": instruction_question(r["instruction"], r["input"]),
            "gold": r["output"],
        }
        for k, r in enumerate(rows[-eval_size:])
    ]
    return rows[:-eval_size], evals


# --- the synthesis loop ----------------------------------------------------------------------------


def _loop(
    teacher,
    n: int,
    prompt_of: Callable[[int], str],
    parse: Callable,
    known: list[str],
    avoid: list[str],
    *,
    max_new_tokens: int,
    temperature: float,
    threshold: float,
    lsh_rows: int,
    max_rounds: int,
    solve: Callable[[list[dict]], list[dict]] | None = None,
    log: list | None = None,
    reasons: bool = True,
) -> tuple[list[dict], dict]:
    """Rounds of requests until ``n`` candidates are accepted (or ``max_rounds``): each completion parsed
    by ``parse(completion) -> (item with a "question", why not)``, checked against ``avoid`` (eval) and
    every earlier text; with ``solve`` the round's new candidates are then solved and kept when their row
    is correct. ``log`` gets one entry per candidate looked at (its verdict: ``kept`` or the reason)."""
    index = NearDuplicateIndex(threshold, lsh_rows)
    for q in [*known, *avoid]:
        index.add(q)
    avoid_index = NearDuplicateIndex(threshold, lsh_rows)
    for q in avoid:
        avoid_index.add(q)
    accepted: list[dict] = []
    stats = {"requested": 0, "unparsable": 0, "exact_duplicates": 0, "near_duplicates": 0, "eval_overlap": 0}
    why_unparsable: Counter = Counter()
    failed: Counter = Counter()
    sample = 0
    for _ in range(max_rounds):
        need = n - len(accepted)
        if need <= 0:
            break
        requests = []
        for _ in range(need + need // 2 + 1):
            decoding = Decoding(max_new_tokens=max_new_tokens, temperature=temperature)
            requests.append(GenerationRequest(prompt_of(sample), decoding, sample))
            sample += 1
        stats["requested"] += len(requests)
        fresh: list[tuple[dict, dict]] = []
        for r, c in zip(requests, teacher.generate(requests)):
            item, why = parse(c) if c.error is None else (None, f"teacher call failed: {c.error}")
            entry = {"sample": r.sample, "output": c.text, **(item or {})}
            if item is None:
                stats["unparsable"] += 1
                why_unparsable[why] += 1
                entry["verdict"] = f"unparsable: {why}"
            elif avoid_index.find(item["question"]):
                stats["eval_overlap"] += 1
                entry["verdict"] = "eval overlap"
            elif dup := index.find(item["question"]):
                stats[f"{dup}_duplicates"] += 1
                entry["verdict"] = f"{dup} duplicate"
            else:
                index.add(item["question"])
                fresh.append((item, entry))
                entry["verdict"] = "kept"
            if log is not None:
                log.append(entry)
            if solve is None and entry["verdict"] == "kept":
                accepted.append(item)
                if len(accepted) == n:
                    break
        if solve is not None and fresh:
            rows = solve([item for item, _ in fresh])
            for (item, entry), row in zip(fresh, rows):
                entry["solution"] = row.get("pred")
                if len(accepted) == n:
                    entry["verdict"] = "not needed (task.train_size reached)"
                elif row.get("correct"):
                    accepted.append(item)
                else:
                    why = row.get("error") or row.get("parse_error") or "wrong"
                    failed[why.split(":")[0]] += 1
                    entry["verdict"] = f"solution failed: {why}"
    stats["accepted"] = len(accepted)
    if reasons:
        stats["unparsable_reasons"] = dict(why_unparsable.most_common())
        stats["dedup"] = index.method
        if solve is not None:
            stats["solution_failed"] = sum(failed.values())
            stats["solution_failed_reasons"] = dict(failed.most_common())
    return accepted, stats


def synthesize(
    teacher,
    seeds: list[str],
    n: int,
    avoid: list[str],
    seed: int = 0,
    shots: int = 3,
    temperature: float = 0.9,
    max_new_tokens: int = 160,
    threshold: float = 0.7,
    max_rounds: int = 8,
    lsh_rows: int = LSH_ROWS,
    log: list | None = None,
) -> tuple[list[str], dict]:
    """Up to ``n`` new problems and counts of what was dropped and why.

    Deterministic for a seed (and free on a re-run: every request goes through the teacher's
    completion cache under its sample index).
    """

    def prompt_of(sample: int) -> str:
        shown = _seeded_sample(seed, sample, seeds, shots)
        examples = "\n\n".join(f"Problem {i + 1}: {q}" for i, q in enumerate(shown))
        return teacher.chat_prompt(
            [{"role": "user", "content": INSTRUCTION.format(examples=examples)}], assistant_prefix="Problem:"
        )

    def parse(c):
        q = parse_problem(c.text)
        return ({"question": q}, None) if q is not None else (None, "not a 5-200 word problem")

    items, stats = _loop(
        teacher,
        n,
        prompt_of,
        parse,
        seeds,
        avoid,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        threshold=threshold,
        lsh_rows=lsh_rows,
        max_rounds=max_rounds,
        log=log,
        reasons=False,
    )
    return [i["question"] for i in items], stats


def synthesize_instructions(
    teacher,
    seeds: list[dict],
    n: int,
    avoid: list[str],
    seed: int = 0,
    shots: int = 3,
    temperature: float = 0.9,
    max_new_tokens: int = 200,
    threshold: float = 0.7,
    max_rounds: int = 8,
    lsh_rows: int = LSH_ROWS,
    log: list | None = None,
) -> tuple[list[dict], dict]:
    """Up to ``n`` new ``{"instruction", "input", "question"}`` tasks from seed tasks (``{"instruction",
    "input"}``), de-duplicated on their question text (instruction + input), and the counts of what was
    dropped and why. Deterministic for a seed, free on a re-run (the completion cache)."""
    known = [instruction_question(s["instruction"], s.get("input", "")) for s in seeds]

    def prompt_of(sample: int) -> str:
        shown = _seeded_sample(seed, sample, seeds, shots)
        examples = "\n\n".join(
            f"Task {i + 1}\nInstruction: {s['instruction']}\nInput: {s.get('input') or '<noinput>'}"
            for i, s in enumerate(shown)
        )
        return teacher.chat_prompt(
            [{"role": "user", "content": INSTRUCTIONS_PROMPT.format(examples=examples)}],
            assistant_prefix="Instruction:",
        )

    def parse(c):
        item, why = parse_instruction(c.text, c.finish_reason)
        return (item and {**item, "question": instruction_question(item["instruction"], item["input"])}), why

    return _loop(
        teacher,
        n,
        prompt_of,
        parse,
        known,
        avoid,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        threshold=threshold,
        lsh_rows=lsh_rows,
        max_rounds=max_rounds,
        log=log,
    )


def synthesize_code(
    teacher,
    seeds: list[dict],
    n: int,
    avoid: list[str],
    solve: Callable[[list[dict]], list[dict]],
    seed: int = 0,
    shots: int = 3,
    temperature: float = 0.9,
    max_new_tokens: int = 320,
    threshold: float = 0.7,
    max_rounds: int = 8,
    lsh_rows: int = LSH_ROWS,
    log: list | None = None,
) -> tuple[list[dict], dict]:
    """Up to ``n`` new code problems ``{"question", "tests"}`` from seed problems (``{"question",
    "gold"}``: the gold is the tests), each kept only when the teacher's own solution passes its tests:
    ``solve(problems) -> rows`` answers them (train problems with the tests as gold) and a row's
    ``correct`` says so. Returns them and the counts of what was dropped and why."""
    from distill.core.code import tests_source

    shown_tests = [{"question": s["question"], "tests": tests_source(s["gold"])} for s in seeds]

    def prompt_of(sample: int) -> str:
        shown = _seeded_sample(seed, sample, shown_tests, shots)
        examples = "\n\n".join(
            f"Problem {i + 1}: {s['question']}\nTests:\n```python\n{s['tests']}\n```" for i, s in enumerate(shown)
        )
        return teacher.chat_prompt(
            [{"role": "user", "content": CODE_PROMPT.format(examples=examples)}], assistant_prefix="Problem:"
        )

    def solve_problems(items: list[dict]) -> list[dict]:
        return solve([_code_problem(k, it) for k, it in enumerate(items)])

    return _loop(
        teacher,
        n,
        prompt_of,
        lambda c: parse_code_problem(c.text, c.finish_reason),
        [s["question"] for s in seeds],
        avoid,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        threshold=threshold,
        lsh_rows=lsh_rows,
        max_rounds=max_rounds,
        solve=solve_problems,
        log=log,
    )


def _code_problem(k: int, item: dict) -> dict:
    return {"id": f"syn-{k:06d}", "split": "train", "question": item["question"], "gold": item["tests"]}


def synthesize_problems(teacher, seeds: list[str], n: int, avoid: list[str], **settings) -> tuple[list[dict], dict]:
    """``synthesize`` as train problems (ids ``syn-000000``…, no gold: the teacher's vote labels them)
    and its counts; one clear error when the teacher wrote no usable problem at all."""
    questions, stats = synthesize(teacher, seeds, n, avoid, **settings)
    _require_some(questions, stats)
    problems = [{"id": f"syn-{i:06d}", "split": "train", "question": q, "gold": None} for i, q in enumerate(questions)]
    return problems, stats


def as_train_problems(items: list[dict], kind: str, stats: dict) -> list[dict]:
    """Accepted candidates of ``synthesize_instructions`` / ``synthesize_code`` as train problems (ids
    ``syn-000000``…): an instruction's gold is None (nothing to check an open answer against), a code
    problem's its tests; one clear error (with ``stats``) when there are none."""
    _require_some(items, stats)
    if kind == "code":
        return [_code_problem(k, it) for k, it in enumerate(items)]
    return [
        {"id": f"syn-{k:06d}", "split": "train", "question": it["question"], "gold": None} for k, it in enumerate(items)
    ]


def _require_some(items: list, stats: dict) -> None:
    from distill.core.errors import DistillError

    if not items:
        raise DistillError(
            f"the teacher wrote no usable new task ({stats})", "check the seed file and the teacher model"
        )
