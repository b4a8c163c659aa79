"""Input readers: task, replay and recipe files as text, JSON and zero-shot-CoT logs, with errors that
name the file and the line — the one place inputs are read and parsed."""

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
