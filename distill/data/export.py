"""A run's generated data in the formats other trainers read: ``distill data export``.

Formats (one row per line in ``<split>.jsonl``, or a ``datasets.DatasetDict`` on disk for ``hf``):

- ``hf``: ``datasets.load_from_disk(DIR)`` gives splits ``train`` / ``eval`` with ``messages`` and the
  row columns below;
- ``messages``: ``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}], ...}``, what TRL's
  ``SFTTrainer`` reads;
- ``sharegpt``: ``{"conversations": [{"from": "human", ...}, {"from": "gpt", ...}], ...}`` (Axolotl,
  LLaMA-Factory);
- ``alpaca``: ``{"instruction": question, "input": "", "output": target, ...}``.

Every row, in every format, also carries ``ROW_COLUMNS``: the row's content (question, gold,
rationale, answer, correct) and its provenance (source and row index there, kept source columns,
teacher, how it was generated, tokens and cost, cache hit).

The user turn is the bare question, as the student is prompted (``students.data.prompt_template``
puts the question alone in the user message; the student's chat template adds the rest). The
assistant turn of a train row is exactly the completion a ``rationale`` student learns, built by
``students.data.target_text`` as ``build_examples`` builds it. An eval row is a held-out problem: its
assistant turn is the teacher's own answer in that same shape (so an SFT eval loss measures the
same thing), with ``correct`` saying whether it matches ``gold``; when the teacher gave no parsable
answer (or its call failed) the row has the user turn only, rather than a target pairing the
teacher's text with an answer it never gave.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from distill.core.artifacts import CONFIG_FILE
from distill.core.errors import DistillError

FORMATS = ("hf", "messages", "sharegpt", "alpaca")
SPLITS = ("train", "eval", "all")

# The columns every exported row carries besides its format's conversation fields.
ROW_COLUMNS = (
    "id",
    "split",
    "question",
    "gold",
    "rationale",
    "answer",
    "correct",
    "source",
    "source_row",
    "extra",
    "teacher",
    "generation",
    "tokens_in",
    "tokens_out",
    "cost",
    "cached",
)
# The recipe's teacher keys that say how a row was generated (the ``generation`` column).
GENERATION_KEYS = ("method", "temperature", "top_p", "samples", "max_new_tokens")


@dataclass(frozen=True)
class ExportResult:
    out: Path
    format: str
    rows: dict[str, int]  # rows written per split


def export_data(run: Path, fmt: str, out: Path | None = None, split: str = "all", force: bool = False) -> ExportResult:
    """Export the rows of ``run`` (a run folder or its ``generate`` folder) in format ``fmt`` to ``out``
    (default ``<run>/data/<fmt>``), written into a temp folder beside it and renamed into place: a
    failure leaves no ``out`` (or, with ``force``, the old one untouched). An existing ``out`` is
    refused unless ``force``."""
    if fmt not in FORMATS:
        raise DistillError(f"--format {fmt} is not a data format", f"use one of {', '.join(FORMATS)}")
    if split not in SPLITS:
        raise DistillError(f"--split {split} is not a split", f"use one of {', '.join(SPLITS)}")
    gen = generate_dir(Path(run))
    out = Path(out) if out is not None else gen.parent / "data" / fmt
    if (out.exists() or out.is_symlink()) and not force:
        raise DistillError(f"{out} already exists", "pass --force to replace it, or --out another folder")
    records = export_records(gen, split)
    _write_atomically(out, lambda tmp: _write(fmt, records, tmp))
    return ExportResult(out, fmt, {name: len(rows) for name, rows in records.items()})


def generate_dir(run: Path) -> Path:
    """The finished generate folder of ``run`` (a run folder or the generate folder itself), or one
    clear error saying what to pass or run."""
    gen = run / "generate" if (run / "generate").is_dir() else run
    if not gen.is_dir():
        raise DistillError(f"no run folder at {run}", "pass a run folder such as runs/quickstart")
    started = any(run.glob(".generate.work-*")) or (run / ".generate.tmp").exists()  # killed mid-generate
    if gen is run and started:
        raise DistillError(
            f"the generate stage of {run} is unfinished", "rerun `distill generate <recipe>` to finish it"
        )
    if not (gen / "DONE.json").is_file() and not (gen / "shards.json").is_file():
        raise DistillError(
            f"{run} is not a run folder (no generate/ stage in it)",
            "pass a run folder such as runs/quickstart, or its generate folder",
        )
    missing = [
        name
        for name in ("DONE.json", CONFIG_FILE, "dataset/train.parquet", "dataset/eval.parquet")
        if not (gen / name).is_file()
    ]
    if missing:
        raise DistillError(
            f"the generate stage in {gen} is unfinished (no {', '.join(missing)})",
            "rerun `distill generate <recipe>` to finish it (committed rows are kept)",
        )
    return gen


def run_recipe(gen: Path) -> dict:
    """The recipe the generate stage ran with (its ``task`` and ``teacher`` sections at least)."""
    try:
        config = json.loads((gen / CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise DistillError(f"cannot read {gen / CONFIG_FILE}: {e}", "rerun `distill generate <recipe>`") from None
    recipe = config.get("recipe") or config.get("stage_config") or {}
    if not isinstance(recipe.get("teacher"), dict) or not isinstance(recipe.get("task"), dict):
        raise DistillError(f"{gen / CONFIG_FILE} holds no task and teacher config", "rerun `distill generate <recipe>`")
    return recipe


def export_records(gen: Path, split: str = "all") -> dict[str, list[dict]]:
    """The exported rows per split (``train``: the rows the student trains on; ``eval``: the held-out
    problems), each a dict of ``messages`` plus ``ROW_COLUMNS``; formats are views of these."""
    from distill.core.answers import Task
    from distill.teachers.rows import read_rows

    recipe = run_recipe(gen)
    task = Task(recipe["task"].get("answer_type", "number"))
    teacher = recipe["teacher"]
    names = ("train", "eval") if split == "all" else (split,)
    return {
        name: [
            export_record(r, name, task, teacher)
            for r in read_rows(gen / "dataset" / f"{name}.parquet", ("id", "question", "gold", "rationale"))
        ]
        for name in names
    }


def export_record(row: dict, split: str, task, teacher: dict) -> dict:
    """One dataset row as an exported record: its turns, content and provenance.

    ``teacher`` is the recipe's teacher section: the prices give the cost (0.0 without prices: a
    local model), and ``GENERATION_KEYS`` say how the row was generated. A row from a run older than
    provenance has ``source``, ``source_row`` and ``extra`` null."""
    from distill.students.data import target_text
    from distill.teachers.budget import cost_of

    turns = [{"role": "user", "content": row["question"]}]
    if split == "train":
        # exactly as students.data.build_examples builds a `rationale` example's target
        turns.append({"role": "assistant", "content": target_text(row, "rationale", task)})
    elif row.get("error") is None and row.get("pred") is not None and row.get("rationale") is not None:
        turns.append({"role": "assistant", "content": target_text(row, "rationale", task)})
    prices = SimpleNamespace(
        price_per_1k_input=teacher.get("price_per_1k_input") or 0.0,
        price_per_1k_output=teacher.get("price_per_1k_output") or 0.0,
    )
    tokens_in, tokens_out = row.get("tokens_in") or 0, row.get("tokens_out") or 0
    return {
        "messages": turns,
        "id": row["id"],
        "split": split,
        "question": row["question"],
        "gold": row["gold"],
        "rationale": row.get("rationale"),
        "answer": row.get("pred"),
        "correct": row.get("correct"),
        "source": row.get("source"),
        "source_row": row.get("source_row"),
        "extra": _extra(row),
        "teacher": row.get("teacher"),
        "generation": generation(teacher),
        "tokens_in": tokens_in,
        "tokens_out": tokens_out,
        "cost": float(cost_of(tokens_in, tokens_out, prices)),
        "cached": row.get("cached"),
    }


def generation(teacher: dict) -> dict:
    """How the rows were decoded (``GENERATION_KEYS``): only self-consistency samples; every other
    method decodes greedily, one path (temperature 0, top_p 1, whatever the recipe's sampling keys say)."""
    g = {k: teacher.get(k) for k in GENERATION_KEYS}
    if g["method"] != "self_consistency":
        g.update(temperature=0.0, top_p=1.0, samples=1)
    return g


def _extra(row: dict):
    """The kept source columns as an object (null when none were kept, or the run predates them)."""
    text = row.get("extra")
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        raise DistillError(
            f"row {row['id']} has an extra column that is not JSON: {text[:80]!r}", "rerun `distill generate`"
        ) from None
    return value or None  # {}: nothing kept (an empty struct is no Arrow type either)


def as_format(record: dict, fmt: str) -> dict:
    """``record`` (from ``export_record``) as one JSONL object of format ``fmt``."""
    rest = {k: record[k] for k in ROW_COLUMNS}
    turns = record["messages"]
    if fmt == "messages":
        return {"messages": turns, **rest}
    if fmt == "sharegpt":
        who = {"user": "human", "assistant": "gpt"}
        return {"conversations": [{"from": who[t["role"]], "value": t["content"]} for t in turns], **rest}
    if fmt == "alpaca":
        output = next((t["content"] for t in turns if t["role"] == "assistant"), "")
        return {"instruction": turns[0]["content"], "input": "", "output": output, **rest}
    raise ValueError(f"no JSONL view for format {fmt}")


def _write(fmt: str, records: dict[str, list[dict]], folder: Path) -> None:
    if fmt == "hf":
        _write_hf(records, folder)
        return
    for name, rows in records.items():
        _write_jsonl(folder / f"{name}.jsonl", [as_format(r, fmt) for r in rows])


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _write_hf(records: dict[str, list[dict]], folder: Path) -> None:
    """A ``DatasetDict`` with one schema for all splits: inferred from every row, the columns whose
    type is known typed as such (an old run's all-null ``source`` is still a string column), so the
    splits of any two runs concatenate; an empty split keeps the columns. No progress bars: the
    command prints one line."""
    import pyarrow as pa
    from datasets import Dataset, DatasetDict, Features
    from datasets.utils import logging as ds_logging

    every = [r for rows in records.values() for r in rows]
    schema = pa.Table.from_pylist(every).schema if every else pa.schema([])
    for name, kind in _hf_types().items():
        if name in schema.names:
            schema = schema.set(schema.get_field_index(name), pa.field(name, kind))
    features = Features.from_arrow_schema(schema) if every else None
    splits = {name: Dataset.from_list(rows, features=features) for name, rows in records.items()}
    shown = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        DatasetDict(splits).save_to_disk(str(folder))
    finally:
        if shown:
            ds_logging.enable_progress_bar()


def _hf_types() -> dict:
    import pyarrow as pa

    text = pa.string()
    return {
        **{k: text for k in ("id", "split", "question", "gold", "rationale", "answer", "source", "teacher")},
        "messages": pa.list_(pa.struct([("role", text), ("content", text)])),
        "correct": pa.bool_(),
        "cached": pa.bool_(),
        "source_row": pa.int64(),
        "tokens_in": pa.int64(),
        "tokens_out": pa.int64(),
        "cost": pa.float64(),
    }


def _write_atomically(out: Path, write) -> None:
    """Run ``write(tmp)`` on a new temp folder beside ``out``, then rename it to ``out`` (an existing
    ``out`` is replaced only once the new one is complete); on failure the temp folder is removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    try:
        write(tmp)
        if out.exists() or out.is_symlink():
            old = out.parent / f".{out.name}.{secrets.token_hex(4)}.old"
            os.replace(out, old)
            os.replace(tmp, out)
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def summary_line(result: ExportResult) -> str:
    """``data export: 73 train + 40 eval rows (messages) → runs/x/data/messages``."""
    counts = " + ".join(f"{n} {name}" for name, n in result.rows.items())
    return f"data export: {counts} rows ({result.format}) → {result.out}"
