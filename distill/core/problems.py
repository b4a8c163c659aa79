"""Problem sources: a task's train and eval problems from a generator or a file.

A problem is a dict ``{"id", "split", "question", "gold"}``. Train and eval problems come from
disjoint generator seeds (or disjoint file rows) and are de-duplicated against each other, so a
student never trains on its test questions.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from distill.core.errors import DistillError

_BLOCK_SPLIT = re.compile(r"\n\*{20,}\n")


def normalize_question(q: str) -> str:
    """A question with its whitespace collapsed: how recorded outputs are matched to problems."""
    return " ".join(q.split())


def read_input(path: str | Path, what: str) -> str:
    """The text of an input file (``what``: "task file", "replay file", "recipe"), as UTF-8.

    The one place inputs are read: a missing file, a folder, an unreadable file or bytes that are not
    UTF-8 become one ``DistillError`` naming the file, never a traceback. A UTF-8 byte-order mark is
    dropped (editors on Windows write one)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DistillError(
            f"{what} {path} does not exist", "check the path (relative paths start in this folder)"
        ) from None
    except IsADirectoryError:
        raise DistillError(f"{what} {path} is a folder, not a file", "point at the file inside it") from None
    except PermissionError:
        raise DistillError(f"{what} {path} cannot be read (permission denied)", "make it readable (chmod +r)") from None
    except OSError as e:
        raise DistillError(
            f"{what} {path} cannot be read ({e.strerror or e})", "check the file and its folder"
        ) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DistillError(f"{what} {path} is not UTF-8 text", "re-encode it as UTF-8") from None


def _json_problem(e: ValueError | RecursionError) -> str:
    """Why a JSON text did not parse, in a few words."""
    if isinstance(e, json.JSONDecodeError):
        return f"{e.msg} at column {e.colno}"
    return "nested too deeply" if isinstance(e, RecursionError) else str(e).split(";")[0]


def parse_json(text: str, path: Path, what: str):
    """A whole file's JSON value, or one ``DistillError`` naming the file and the line of the mistake."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DistillError(
            f"{what} {path} is not valid JSON (line {e.lineno}: {_json_problem(e)})",
            "fix the file there (a truncated file, a trailing comma or a missing quote)",
        ) from None
    except (ValueError, RecursionError) as e:
        raise DistillError(f"{what} {path} is not valid JSON ({_json_problem(e)})", "fix the file") from None


def parse_json_lines(text: str, path: Path, what: str) -> list[tuple[int, dict]]:
    """The JSON objects of a JSONL text with their 1-based line numbers (blank lines skipped); a line
    that is not JSON, or JSON but not an object, is one ``DistillError`` naming the file and the line."""
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as e:
            raise DistillError(
                f"{what} {path} line {i} is not valid JSON ({_json_problem(e)})",
                "one JSON object per line (a truncated or hand-edited line?)",
            ) from None
        if not isinstance(row, dict):
            raise DistillError(
                f"{what} {path} line {i} is {json_kind(row)}, not a JSON object",
                'write one object per line, e.g. {"question": "...", "answer": "..."}',
            )
        rows.append((i, row))
    return rows


def json_kind(value) -> str:
    """A JSON value's type in words, for messages: "a number", "a list", "null"."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return {str: "a string", list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def parse_kojima_log(path: Path, what: str = "zero-shot-CoT log") -> list[dict]:
    """Records from a zero-shot-CoT log: question, rationale, answer_raw, pred, gold."""
    return parse_kojima_text(read_input(path, what))


def parse_kojima_text(text: str) -> list[dict]:
    """Records of a zero-shot-CoT log's text; blocks without Q:, pred_mode and GT lines are skipped."""
    records = []
    for block in _BLOCK_SPLIT.split(text):
        q = re.search(r"^Q: (.*?)\nA: ", block, re.S | re.M)
        pred = re.search(r"^pred_mode : (.*)$", block, re.M)
        gold = re.search(r"^GT : (.*)$", block, re.M)
        if not (q and pred and gold):
            continue
        answer_text = block[q.end() : block.index("pred_before")] if "pred_before" in block else block[q.end() :]
        cut = answer_text.rfind("Therefore, the answer")
        rationale = answer_text[:cut] if cut >= 0 else answer_text
        rationale = rationale.strip().removeprefix("Let's think step by step.").strip()
        records.append(
            {
                "question": q.group(1).strip(),
                "rationale": rationale,
                "answer_raw": answer_text[cut:].strip() if cut >= 0 else "",
                "answer": pred.group(1).strip(),
                "gold": gold.group(1).strip(),
            }
        )
    return records


def reasoning_gym_problems(name: str, params: dict, size: int, seed: int) -> list[dict]:
    import reasoning_gym

    try:
        data = reasoning_gym.create_dataset(name, size=size, seed=seed, **params)
    except (KeyError, ValueError) as e:
        raise DistillError(f"reasoning_gym dataset {name!r} failed: {e}", "check task.name and task.params") from None
    except TypeError as e:
        raise DistillError(f"reasoning_gym {name!r} rejected task.params: {e}", "fix task.params") from None
    return [{"question": x["question"].strip(), "gold": str(x["answer"])} for x in data]


def read_problem_file(path: str) -> list[dict]:
    """Problems from a file: JSONL (question/answer), JSON ({"examples": [...]} or MultiArith-style
    sQuestion/lSolutions rows), or a zero-shot-CoT log (Q:/GT:).

    A file that cannot be read or parsed, a row that is not an object or lacks a field is one
    ``DistillError`` naming the file and the line (JSONL) or row (JSON)."""
    p = Path(path)
    if not p.is_file() and not p.is_dir():
        raise DistillError(f"task file {p} does not exist", "set task.name to a .jsonl/.json/.log path")
    text = read_input(p, "task file")
    if p.suffix == ".log":
        out = [{"question": r["question"], "gold": r["gold"]} for r in parse_kojima_text(text)]
        if any(not r["question"] for r in out):
            line = next((i for i, ln in enumerate(text.splitlines(), 1) if ln.strip() == "Q:"), "?")
            raise DistillError(f"task file {p} line {line} has an empty question after Q:", "fix or remove that block")
        if not out:
            raise DistillError(
                f"task file {p} holds no problems", "a zero-shot-CoT log has blocks with Q:, pred_mode : and GT : lines"
            )
        return out
    if p.suffix == ".json":
        rows = [(f"row {i}", row) for i, row in enumerate(_json_rows(parse_json(text, p, "task file"), p), 1)]
    else:
        rows = [(f"line {i}", row) for i, row in parse_json_lines(text, p, "task file")]
    out = [_problem(row, p, where) for where, row in rows]
    if not out:
        raise DistillError(f"task file {p} holds no problems", 'write one {"question": ..., "answer": ...} per row')
    return out


def _json_rows(data, path: Path) -> list:
    """The rows of a .json task file: a list, or the list under ``examples``."""
    rows = data["examples"] if isinstance(data, dict) and "examples" in data else data
    if not isinstance(rows, list):
        raise DistillError(
            f"task file {path} holds {json_kind(rows)}, not a list of problems",
            'write a list of {"question": ..., "answer": ...} objects, or {"examples": [...]}',
        )
    return rows


def _problem(row, path: Path, where: str) -> dict:
    """One task file row as ``{"question", "gold"}``; ``where`` ("line 3", "row 3") names it in errors."""
    if not isinstance(row, dict):
        raise DistillError(
            f"task file {path} {where} is {json_kind(row)}, not an object",
            'each row is an object like {"question": "...", "answer": "..."}',
        )
    if "sQuestion" in row and "lSolutions" in row:  # MultiArith
        solutions = row["lSolutions"]
        if not isinstance(solutions, list) or not solutions:
            raise DistillError(f"task file {path} {where}: lSolutions is not a non-empty list", "fix that row")
        row = {"question": row["sQuestion"], "answer": solutions[0]}
    if "question" not in row or "answer" not in row:
        raise DistillError(f"task file {path} {where} lacks 'question' or 'answer'", "each row needs both fields")
    question, answer = row["question"], row["answer"]
    if not isinstance(question, str) or not question.strip():
        got = "empty" if isinstance(question, str) else f"{json_kind(question)}, not text"
        raise DistillError(f"task file {path} {where}: 'question' is {got}", "write the question as a non-empty string")
    if answer is None or isinstance(answer, list | dict):
        raise DistillError(
            f"task file {path} {where}: 'answer' is {json_kind(answer)}, not a value",
            "write the gold answer as a string or a number",
        )
    return {"question": question.strip(), "gold": str(answer)}


def load_seeds(cfg) -> list[dict]:
    """Seed problems of a synthetic task: the file's rows before the evaluation split."""
    return read_problem_file(cfg.name)[: -cfg.eval_size]


def gate_problems(cfg, size: int, exclude: set[str]) -> list[dict]:
    """Up to ``size`` problems of the task whose questions are not in ``exclude`` (the training and
    evaluation questions): new draws for a generator task, the rows no split took for a file task
    (none for a synthetic task, whose only gold answers are its seeds)."""
    if cfg.source == "reasoning_gym":
        pool = reasoning_gym_problems(cfg.name, cfg.params, size * 2 + 16, cfg.seed + 2_000_003)
    elif cfg.source == "file":
        pool = read_problem_file(cfg.name)
    else:
        return []
    out, seen = [], set(exclude)
    for r in pool:
        if r["question"] in seen:
            continue
        seen.add(r["question"])
        out.append({"id": f"gate-{len(out):06d}", "split": "gate", **r})
        if len(out) == size:
            break
    return out


def load_problems(cfg) -> tuple[list[dict], list[dict]]:
    """(train, eval) problems for a ``TaskConfig``; disjoint by question text. A synthetic task has
    no train problems until the teacher writes them (``teachers.synthesis``)."""
    if cfg.source == "reasoning_gym":
        evals = reasoning_gym_problems(cfg.name, cfg.params, cfg.eval_size, cfg.seed + 1_000_003)
        # Over-draw train problems so de-duplication against eval still leaves train_size of them.
        pool = reasoning_gym_problems(cfg.name, cfg.params, cfg.train_size * 2 + 16, cfg.seed)
    elif cfg.source == "synthetic":  # the seed rows only; generate() has the teacher write train problems
        rows = read_problem_file(cfg.name)
        if len(rows) <= cfg.eval_size:
            raise DistillError(
                f"{cfg.name} has {len(rows)} rows, not more than task.eval_size={cfg.eval_size}", "lower task.eval_size"
            )
        evals = rows[-cfg.eval_size :]
        return [], [{"id": f"eval-{i:06d}", "split": "eval", **r} for i, r in enumerate(evals)]
    else:  # file order: the last eval_size rows are held out (as in the published splits)
        rows = read_problem_file(cfg.name)
        if len(rows) <= cfg.eval_size:
            raise DistillError(
                f"{cfg.name} has {len(rows)} rows, not more than task.eval_size={cfg.eval_size}", "lower task.eval_size"
            )
        if getattr(cfg, "split", "order") == "shuffle":  # seeded, the same rows for the same file and seed
            import random

            rows = list(rows)
            random.Random(cfg.seed).shuffle(rows)
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
