"""Task inputs: the rows of a task file or a Hugging Face dataset, and how a row becomes a problem.

Every source but the generators goes through here. ``open_splits(cfg)`` gives each split of the source
as ``Rows`` (a ``datasets.Dataset`` is memory-mapped Arrow read a row at a time, so a million-row
dataset is never held in memory); ``RowMapper`` turns one row into a problem: the question and the gold
answer from columns or sandboxed templates (``task.columns``), or a conversation's last user turn
(``messages``); the kept columns (``task.keep_columns``) and the row's provenance ride along.

A problem here is ``{"question", "gold", "source", "source_row", "extra", "system", "history"}``; the
last two are a conversation's system turn and the turns before its last user turn (JSON), else None.
"""

from __future__ import annotations

import difflib
import glob
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from distill.core.errors import DistillError
from distill.core.readers import json_kind, parse_json, parse_json_lines, parse_kojima_text, read_input
from distill.core.templates import compile_template, is_template, render_template

# Field names read when task.columns does not name one, in order of preference.
QUESTION_FIELDS = ("question", "problem", "sQuestion", "prompt", "input", "instruction", "query")
ANSWER_FIELDS = ("answer", "lSolutions", "solution", "output", "target", "label", "response")
MESSAGE_FIELDS = ("messages", "conversations")
_DATA_FILES = {
    ".parquet": "parquet",
    ".csv": "csv",
    ".tsv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".arrow": "arrow",
}
_ROLES = {"human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant", "system": "system"}


@dataclass
class Rows:
    """One split of a source: ``len(rows)`` and ``rows[i]`` (a dict); ``what`` names it in messages
    ("task file a.jsonl"), ``label`` in provenance ("gsm8k/main:train"); ``lines`` maps a JSONL row
    to its 1-based line (messages say "line 7" there, "row 7" elsewhere)."""

    label: str
    what: str
    rows: Sequence
    lines: list[int] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        return self.rows[i]

    def where(self, i: int) -> str:
        return f"line {self.lines[i]}" if self.lines else f"row {i + 1}"

    def columns(self) -> list[str]:
        names = getattr(self.rows, "column_names", None)
        if names is not None:
            return list(names)
        first = self.rows[0] if len(self.rows) else {}
        return list(first) if isinstance(first, dict) else []


# --- reading sources ------------------------------------------------------------------------------


def open_splits(cfg) -> dict[str, Rows]:
    """The splits of a ``file`` or ``hf`` task's source, by name (a file has one, ``train``)."""
    if cfg.source == "hf":
        return _hf_splits(cfg)
    return {"train": file_rows(cfg.name)}


def file_rows(path: str | Path) -> Rows:
    """The rows of a task file: JSONL (the default), JSON (a list or ``{"examples": [...]}``), a
    zero-shot-CoT ``.log``, or CSV / TSV / Parquet / Arrow (read by ``datasets``, memory-mapped)."""
    p = Path(path)
    if not p.exists():
        raise DistillError(f"task file {p} does not exist", "set task.name to a .jsonl/.json/.csv/.parquet/.log path")
    what = f"task file {p}"
    if p.suffix in (".csv", ".tsv", ".parquet", ".arrow"):
        data = _load(lambda d: d.load_dataset(_DATA_FILES[p.suffix], data_files=str(p), split="train", **_csv(p)), what)
        return Rows(str(path), what, data)
    text = read_input(p, "task file")
    if p.suffix == ".log":
        records = parse_kojima_text(text)
        if any(not r["question"] for r in records):
            line = next((i for i, ln in enumerate(text.splitlines(), 1) if ln.strip() == "Q:"), "?")
            raise DistillError(f"task file {p} line {line} has an empty question after Q:", "fix or remove that block")
        if not records:
            raise DistillError(
                f"task file {p} holds no problems", "a zero-shot-CoT log has blocks with Q:, pred_mode : and GT : lines"
            )
        return Rows(str(path), what, [{"question": r["question"], "answer": r["gold"]} for r in records])
    if p.suffix == ".json":
        data = parse_json(text, p, "task file")
        rows = data["examples"] if isinstance(data, dict) and "examples" in data else data
        if not isinstance(rows, list):
            raise DistillError(
                f"task file {p} holds {json_kind(rows)}, not a list of problems",
                'write a list of {"question": ..., "answer": ...} objects, or {"examples": [...]}',
            )
        return _nonempty(Rows(str(path), what, rows))
    numbered = parse_json_lines(text, p, "task file")
    return _nonempty(Rows(str(path), what, [r for _, r in numbered], lines=[i for i, _ in numbered]))


def _nonempty(rows: Rows) -> Rows:
    if not len(rows):
        raise DistillError(f"{rows.what} holds no problems", 'write one {"question": ..., "answer": ...} per row')
    return rows


def _csv(p: Path) -> dict:
    return {"delimiter": "\t"} if p.suffix == ".tsv" else {}


def _load(fn, what: str):
    """``fn(datasets)`` with whatever ``datasets`` raises turned into one line naming the source."""
    import datasets

    datasets.disable_progress_bars()
    try:
        return fn(datasets)
    except DistillError:
        raise
    except Exception as e:  # datasets raises many types (FileNotFoundError, ValueError, its own, pyarrow's)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise DistillError(f"{what} cannot be read ({type(e).__name__}: {first})", _load_fix(e)) from None


def _load_fix(e: Exception) -> str:
    name = type(e).__name__
    if "NotFound" in name or "Connection" in name or "offline" in str(e).lower():
        from datasets import config

        return (
            f"distill runs offline: a hub dataset must already be in the local Hugging Face cache "
            f"({config.HF_DATASETS_CACHE}), or save it once where the hub is reachable "
            "(load_dataset(...).save_to_disk(DIR)) and set task.name to DIR"
        )
    return "check task.name, task.config and task.revision, and that the files are readable data of one format"


def _hf_splits(cfg) -> dict[str, Rows]:
    """Every split of a ``task.source: hf`` dataset: a ``save_to_disk`` folder, data files or a glob, a
    folder of data files, or a hub id (from the local cache: distill is offline)."""
    name = cfg.name
    path = Path(name).expanduser()
    what = f"dataset {name}"
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        if cfg.config or cfg.revision:
            raise DistillError(
                f"{name} is a saved dataset folder: task.config / task.revision do not apply", "remove them"
            )
        data = _load(lambda d: d.load_from_disk(str(path)), what)
    elif path.is_file() or any(c in name for c in "*?["):
        builder = _DATA_FILES.get(path.suffix)
        if builder is None:
            raise DistillError(
                f"task.name {name} is not a data file datasets reads", f"use one of: {', '.join(sorted(_DATA_FILES))}"
            )
        if not path.is_file() and not glob.glob(str(path)):
            raise DistillError(f"task.name {name} matches no file", "check the path or glob (relative to this folder)")
        data = _load(lambda d: d.load_dataset(builder, data_files=str(path), **_csv(path)), what)
    else:
        if path.is_absolute() or name.startswith((".", "~")):
            raise DistillError(f"dataset folder {name} does not exist", "fix task.name")
        data = _load(lambda d: d.load_dataset(name, cfg.config, revision=cfg.revision), what)
    import datasets

    if isinstance(data, datasets.Dataset):
        data = datasets.DatasetDict({"train": data})
    if not isinstance(data, datasets.DatasetDict):
        raise DistillError(f"{what} loaded as {type(data).__name__}, not a dataset", "give a map-style dataset")
    label = name + (f"/{cfg.config}" if cfg.config else "")
    return {split: Rows(f"{label}:{split}", f"dataset {label} split {split}", ds) for split, ds in data.items()}


def pick_splits(cfg, splits: dict[str, Rows]) -> tuple[Rows, Rows | None]:
    """(train, eval) splits: ``task.train_split`` (default train, else the only split) and
    ``task.eval_split`` (default test, else validation; None: hold eval rows out of train)."""
    names = ", ".join(splits)
    train_name = cfg.train_split or ("train" if "train" in splits else next(iter(splits)) if len(splits) == 1 else None)
    if train_name is None:
        raise DistillError(f"dataset {cfg.name} has splits {names} and none is called train", "set task.train_split")
    if train_name not in splits:
        raise DistillError(f"dataset {cfg.name} has no split {train_name!r} (it has: {names})", "fix task.train_split")
    eval_name = cfg.eval_split or next((s for s in ("test", "validation") if s in splits and s != train_name), None)
    if eval_name is not None and eval_name not in splits:
        raise DistillError(f"dataset {cfg.name} has no split {eval_name!r} (it has: {names})", "fix task.eval_split")
    if eval_name == train_name:
        raise DistillError(
            f"task.eval_split and task.train_split are both {train_name!r}", "evaluate on a split never trained on"
        )
    return splits[train_name], splits[eval_name] if eval_name else None


# --- rows to problems -----------------------------------------------------------------------------


class RowMapper:
    """Turns a source row into a problem, as ``task.columns`` / ``task.keep_columns`` say.

    A ``task.columns`` value is a column name, or a Jinja template over the row (``{{ Body }}
    {{ Question }}``; a column whose name is no identifier is ``{{ row['a b'] }}``), rendered in the
    sandbox. Unmapped, the first present of ``QUESTION_FIELDS`` / ``ANSWER_FIELDS`` is used, or a
    ``messages`` conversation. Every mistake is one ``DistillError`` naming the source, the row and
    the columns it has."""

    def __init__(self, columns: dict | None, keep: Sequence[str] = (), structured_gold: bool = False):
        from jinja2 import TemplateError

        self.columns = dict(columns or {})
        self.keep = list(keep)
        self.structured_gold = structured_gold  # json answers: a gold object is the answer, as JSON
        for key, spec in self.columns.items():
            if is_template(spec):
                try:
                    compile_template(spec)
                except TemplateError as e:
                    raise DistillError(
                        f"task.columns.{key} template {spec!r} does not parse ({e})",
                        "fix its Jinja syntax: {{ column }}, or {{ row['a column'] }}",
                    ) from None

    def problem(self, rows: Rows, i: int) -> dict:
        row = rows[i]
        where = f"{rows.what} {rows.where(i)}"
        if not isinstance(row, dict):
            raise DistillError(
                f"{where} is {json_kind(row)}, not an object",
                'each row is an object like {"question": "...", "answer": "..."}',
            )
        system = history = None
        messages_field = self._messages_field(row)
        if messages_field is not None:
            question, system, history, reply = _conversation(row, messages_field, where)
            gold = self._value(row, "answer", where, rows) if self._has("answer", row) else reply
            if gold is None:
                raise DistillError(
                    f"{where}: the conversation has no assistant reply after its last user turn, and no answer column",
                    "set task.columns.answer to the column holding the gold answer",
                )
        else:
            question = self._value(row, "question", where, rows)
            gold = self._value(row, "answer", where, rows)
        if not isinstance(question, str) or not question.strip():
            got = "empty" if isinstance(question, str) else f"{json_kind(question)}, not text"
            raise DistillError(
                f"{where}: {self._name('question', row)!r} is {got}", "the question must be non-empty text"
            )
        return {
            "question": question.strip(),
            "gold": self._gold(gold, row, where),
            "source": rows.label,
            "source_row": i,
            "extra": self._extra(row, where, rows),
            "system": system,
            "history": json.dumps(history, ensure_ascii=False) if history else None,
        }

    def _messages_field(self, row: dict) -> str | None:
        if "messages" in self.columns:
            return self.columns["messages"]
        if "question" in self.columns or any(f in row for f in QUESTION_FIELDS):
            return None
        return next((f for f in MESSAGE_FIELDS if f in row), None)

    def _has(self, key: str, row: dict) -> bool:
        return key in self.columns or any(f in row for f in (ANSWER_FIELDS if key == "answer" else QUESTION_FIELDS))

    def _name(self, key: str, row: dict) -> str:
        if key in self.columns:
            return self.columns[key]
        fields = QUESTION_FIELDS if key == "question" else ANSWER_FIELDS
        return next((f for f in fields if f in row), key)

    def _value(self, row: dict, key: str, where: str, rows: Rows):
        spec = self.columns.get(key)
        if spec is not None and is_template(spec):
            from jinja2 import TemplateError

            names = {k: v for k, v in row.items() if isinstance(k, str) and k.isidentifier() and k != "row"}
            try:
                return render_template(spec, row=row, **names)
            except (TemplateError, TypeError) as e:
                raise DistillError(
                    f"task.columns.{key} template {spec!r} failed on {where} ({type(e).__name__}: {e})",
                    f"its columns are: {_listing(row)}; attributes, imports and files are not allowed",
                ) from None
        if spec is not None:
            if spec not in row:
                close = difflib.get_close_matches(spec, [str(k) for k in row], n=1, cutoff=0.6)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise DistillError(
                    f"task.columns.{key} {spec!r} is not a column of {rows.what} (its columns: {_listing(row)})",
                    f"{hint}set task.columns.{key} to one of them, or to a template like '{{{{ a }}}} {{{{ b }}}}'",
                )
            return row[spec]
        fields = QUESTION_FIELDS if key == "question" else ANSWER_FIELDS
        field = next((f for f in fields if f in row), None)
        if field is None:
            raise DistillError(
                f"{where} has no {key} field (its fields: {_listing(row)})",
                f"set task.columns.{key} to the column holding the {key}, or to a template over the row",
            )
        value = row[field]
        if field == "lSolutions":  # MultiArith: a list of equivalent solutions
            if not isinstance(value, list) or not value:
                raise DistillError(f"{where}: lSolutions is not a non-empty list", "fix that row")
            value = value[0]
        return value

    def _gold(self, gold, row: dict, where: str) -> str:
        if isinstance(gold, dict | list) and self.structured_gold:
            return json.dumps(gold, ensure_ascii=False, sort_keys=True)
        if gold is None or isinstance(gold, list | dict):
            raise DistillError(
                f"{where}: {self._name('answer', row)!r} is {json_kind(gold)}, not a value",
                "write the gold answer as a string or a number (a JSON object needs task.answer_type=json)",
            )
        return str(gold)

    def _extra(self, row: dict, where: str, rows: Rows) -> str | None:
        if not self.keep:
            return None
        missing = [c for c in self.keep if c not in row]
        if missing:
            raise DistillError(
                f"task.keep_columns {missing} are not columns of {rows.what} (its columns: {_listing(row)})",
                "keep only columns the source has",
            )
        return json.dumps({c: row[c] for c in self.keep}, ensure_ascii=False, default=str)


def _listing(row: dict) -> str:
    """The row's field names for a one-line message: a name that is not plain printable text is quoted
    (``'\\n'``), so a file's odd keys cannot break the line."""
    names = [str(k) if str(k).isprintable() and str(k).strip() == str(k) and str(k) else repr(str(k)) for k in row]
    return ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")


def _conversation(row: dict, field: str, where: str) -> tuple[str, str | None, list[dict], str | None]:
    """(last user turn, system turn, the turns between them, the assistant reply after the last user
    turn or None) of a ``messages`` ({role, content}) or ShareGPT ``conversations`` ({from, value}) row."""
    turns = row.get(field)
    if not isinstance(turns, list) or not turns:
        raise DistillError(f"{where}: {field!r} is {json_kind(turns)}, not a list of turns", "each row needs turns")
    norm = []
    for k, t in enumerate(turns, 1):
        role = _ROLES.get(str(t.get("role", t.get("from", ""))).lower()) if isinstance(t, dict) else None
        content = t.get("content", t.get("value")) if isinstance(t, dict) else None
        if role is None or not isinstance(content, str):
            raise DistillError(
                f"{where}: turn {k} of {field!r} is not a {{role, content}} message with role system/user/assistant",
                'write turns like {"role": "user", "content": "..."}',
            )
        norm.append({"role": role, "content": content})
    last_user = max((k for k, t in enumerate(norm) if t["role"] == "user"), default=None)
    if last_user is None:
        raise DistillError(f"{where}: {field!r} has no user turn", "the teacher answers the last user turn")
    system = next((t["content"] for t in norm if t["role"] == "system"), None)
    history = [t for t in norm[:last_user] if t["role"] != "system"]
    reply = next((t["content"] for t in norm[last_user + 1 :] if t["role"] == "assistant"), None)
    return norm[last_user]["content"], system, history, reply
