"""``distill data export``: every format's turns are what distill trains on, every row keeps its
provenance and cost, and a failed or refused export leaves the disk as it was."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from distill.cli import app
from distill.core.answers import Task
from distill.core.errors import DistillError
from distill.data import export
from distill.data.export import ROW_COLUMNS, export_data
from distill.teachers.rows import ROW_SCHEMA

TEACHER = {
    "model": "openai:gpt-x",
    "method": "self_consistency",
    "temperature": 0.7,
    "top_p": 0.95,
    "samples": 5,
    "max_new_tokens": 256,
    "trigger": "Let's think step by step.",
    "price_per_1k_input": 0.5,
    "price_per_1k_output": 1.5,
}
GENERATION = {"method": "self_consistency", "temperature": 0.7, "top_p": 0.95, "samples": 5, "max_new_tokens": 256}
PROVENANCE = ("source", "source_row", "extra")


def _row(id_: str, split: str, **kw) -> dict:
    base = {
        "id": id_,
        "split": split,
        "question": f"What is 5 + 7? ({id_})",
        "gold": "12",
        "prompt": "<chat>What is 5 + 7?",
        "rationale": "5 + 7 = 12.",
        "answer_raw": "",
        "pred": "12",
        "confidence": 1.0,
        "correct": True,
        "finish_reason": "stop",
        "tokens_in": 100,
        "tokens_out": 50,
        "cached": False,
        "teacher": "gpt-x@abc",
        "error": None,
        "alternatives": [],
    }
    return {**base, **kw}


TRAIN = [
    _row("train-000", "train", source="gsm8k:main/train", source_row=7, extra='{"level": 3, "topic": "sum"}'),
    _row("train-001", "train", rationale="  7 + 5 is 12  ", tokens_in=40, tokens_out=10, cached=True),  # no provenance
]
EVAL = [
    _row("eval-000", "eval", source="gsm8k:main/test", source_row=2, pred="11", correct=False),
    _row("eval-001", "eval", rationale="", pred=None, correct=None, error="HTTP 503", tokens_in=0, tokens_out=0),
]


def make_run(root: Path, teacher: dict = TEACHER, old: bool = False) -> Path:
    """A finished run folder by hand: ``generate/`` with DONE.json, its config dump and the two
    dataset files (``old``: written without the provenance columns, as runs before them were)."""
    gen = root / "generate"
    (gen / "dataset").mkdir(parents=True)
    schema = pa.schema([f for f in ROW_SCHEMA if not (old and f.name in PROVENANCE)])
    for name, rows in (("train", TRAIN), ("eval", EVAL)):
        rows = [{k: v for k, v in r.items() if k in schema.names} for r in rows]
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), gen / "dataset" / f"{name}.parquet")
    recipe = {"task": {"answer_type": "number"}, "teacher": teacher}
    (gen / "distill_config.json").write_text(
        json.dumps({"stage": "generate", "stage_config": recipe, "recipe": recipe})
    )
    (gen / "DONE.json").write_text('{"hash": "x"}')
    (gen / "shards.json").write_text('{"shards": []}')
    return root


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def run(tmp_path) -> Path:
    return make_run(tmp_path / "run")


def test_messages_turns_are_the_question_and_the_training_target(run):
    """The user turn is the bare question (the student's prompt holds only it); the assistant turn is
    the rationale student's target, trigger and answer sentence included, whitespace as trained."""
    result = export_data(run, "messages")
    assert result.out == run / "data" / "messages" and result.rows == {"train": 2, "eval": 2}
    first, second = read_jsonl(result.out / "train.jsonl")
    assert first["messages"] == [
        {"role": "user", "content": "What is 5 + 7? (train-000)"},
        {"role": "assistant", "content": "Let's think step by step. 5 + 7 = 12.\nTherefore, the answer is 12."},
    ]
    assert second["messages"][1]["content"] == "Let's think step by step. 7 + 5 is 12\nTherefore, the answer is 12."


def test_the_assistant_turn_is_exactly_what_the_student_learns(run, tmp_path):
    """Tokenized as distill's trainer tokenizes it, the exported turn gives the very labels
    ``build_examples`` trains on, and the user turn in the student's chat template its prompt; a
    change to either side breaks this rather than silently exporting another dataset."""
    from tiny import build_tokenizer

    from distill.students.data import build_examples, prompt_template, render_prompt

    tok = build_tokenizer(tmp_path / "tok")
    row = pq.read_table(run / "generate" / "dataset" / "train.parquet").to_pylist()[0]
    (example,) = build_examples(tok, [row], "rationale", Task("number"), 512, TEACHER["trigger"])
    user, assistant = read_jsonl(export_data(run, "messages").out / "train.jsonl")[0]["messages"]
    target_ids = [t for t in example["labels"] if t != -100]
    assert target_ids == tok(assistant["content"], add_special_tokens=False).input_ids + [tok.eos_token_id]
    prompt = tok.apply_chat_template([user], add_generation_prompt=True, tokenize=False)
    assert prompt == render_prompt(prompt_template(tok), row["question"])


def test_every_row_keeps_its_provenance_decoding_tokens_and_cost(run):
    """Source and row index, kept columns as an object, teacher, the recipe's decoding, tokens and
    tokens × prices; a row generated before provenance has it null, not missing."""
    with_prov, without = read_jsonl(export_data(run, "messages").out / "train.jsonl")
    assert {k: with_prov[k] for k in ("id", "source", "source_row", "extra", "teacher", "cached")} == {
        "id": "train-000",
        "source": "gsm8k:main/train",
        "source_row": 7,
        "extra": {"level": 3, "topic": "sum"},
        "teacher": "gpt-x@abc",
        "cached": False,
    }
    assert with_prov["generation"] == GENERATION
    assert (with_prov["tokens_in"], with_prov["tokens_out"]) == (100, 50)
    assert with_prov["cost"] == pytest.approx(100 / 1000 * 0.5 + 50 / 1000 * 1.5)
    assert without["cost"] == pytest.approx(40 / 1000 * 0.5 + 10 / 1000 * 1.5) and without["cached"] is True
    assert (without["source"], without["source_row"], without["extra"]) == (None, None, None)


def test_a_local_teacher_without_prices_costs_nothing(tmp_path):
    """A recipe dump with no price keys (a local model, an older run) gives cost 0.0, not an error."""
    teacher = {k: v for k, v in TEACHER.items() if not k.startswith("price")}
    rows = read_jsonl(export_data(make_run(tmp_path / "r", teacher), "alpaca").out / "train.jsonl")
    assert [r["cost"] for r in rows] == [0.0, 0.0]


def test_a_run_from_before_provenance_exports_nulls(tmp_path):
    """Dataset files without the source/source_row/extra columns at all still export."""
    rows = read_jsonl(export_data(make_run(tmp_path / "old", old=True), "sharegpt").out / "train.jsonl")
    assert [(r["source"], r["source_row"], r["extra"]) for r in rows] == [(None, None, None)] * 2


def test_eval_rows_carry_the_teachers_answer_only_when_it_gave_one(run):
    """A wrong answer stays (``correct`` false, its own answer, never the gold); a failed call has
    the user turn only, so no target pairs the teacher's text with an answer it did not give."""
    wrong, failed = read_jsonl(export_data(run, "messages").out / "eval.jsonl")
    assert wrong["messages"][1] == {
        "role": "assistant",
        "content": "Let's think step by step. 5 + 7 = 12.\nTherefore, the answer is 11.",
    }
    assert (wrong["correct"], wrong["answer"], wrong["gold"]) == (False, "11", "12")
    assert failed["messages"] == [{"role": "user", "content": "What is 5 + 7? (eval-001)"}]
    assert (failed["answer"], failed["correct"], failed["cost"]) == (None, None, 0.0)


@pytest.mark.parametrize(
    "fmt, head",
    [("messages", ["messages"]), ("sharegpt", ["conversations"]), ("alpaca", ["instruction", "input", "output"])],
)
def test_each_jsonl_format_has_its_fields_then_the_row_columns(run, fmt, head):
    out = export_data(run, fmt).out
    assert sorted(p.name for p in out.iterdir()) == ["eval.jsonl", "train.jsonl"]
    for split in ("train", "eval"):
        for r in read_jsonl(out / f"{split}.jsonl"):
            assert list(r) == [*head, *ROW_COLUMNS] and r["split"] == split


def test_sharegpt_and_alpaca_hold_the_same_turns_as_messages(run):
    messages = read_jsonl(export_data(run, "messages").out / "eval.jsonl")
    sharegpt = read_jsonl(export_data(run, "sharegpt").out / "eval.jsonl")
    alpaca = read_jsonl(export_data(run, "alpaca").out / "eval.jsonl")
    for m, s, a in zip(messages, sharegpt, alpaca):
        turns = m["messages"]
        assert s["conversations"] == [
            {"from": {"user": "human", "assistant": "gpt"}[t["role"]], "value": t["content"]} for t in turns
        ]
        assert a["instruction"] == m["question"] and a["input"] == ""
        assert a["output"] == (turns[1]["content"] if len(turns) > 1 else "")
    assert alpaca[1]["output"] == ""  # the failed eval row


def test_hf_is_a_dataset_dict_load_from_disk_reads(tmp_path):
    """Both splits, one schema (an old run's all-null provenance typed like a new run's), the same
    rows as the messages export."""
    from datasets import load_from_disk

    run = make_run(tmp_path / "old", old=True)
    ds = load_from_disk(str(export_data(run, "hf").out))
    assert set(ds) == {"train", "eval"} and ds["train"].column_names == ["messages", *ROW_COLUMNS]
    assert ds["train"].features == ds["eval"].features
    assert str(ds["train"].features["source"].dtype) == "string"
    assert ds["train"].features["source_row"].dtype == "int64"
    messages = read_jsonl(export_data(run, "messages").out / "eval.jsonl")
    assert ds["eval"].to_list() == messages


def test_split_exports_only_that_split(run):
    result = export_data(run, "alpaca", split="eval")
    assert result.rows == {"eval": 2} and sorted(p.name for p in result.out.iterdir()) == ["eval.jsonl"]


def test_an_existing_folder_is_refused_unless_forced(run):
    out = export_data(run, "messages").out
    (out / "train.jsonl").write_text("mine\n")
    with pytest.raises(DistillError, match="already exists.*--force"):
        export_data(run, "messages")
    assert (out / "train.jsonl").read_text() == "mine\n"
    export_data(run, "messages", force=True)
    assert len(read_jsonl(out / "train.jsonl")) == 2
    assert sorted(p.name for p in out.parent.iterdir()) == ["messages"]  # no temp or old folder left


@pytest.mark.parametrize("fmt", ["messages", "hf"])
@pytest.mark.parametrize("force", [False, True])
def test_a_failure_mid_write_leaves_nothing_half_written(run, monkeypatch, fmt, force):
    """The first split is written, then the write fails: no output folder appears, no temp folder is
    left, and with --force the previous export is still whole."""
    out = run / "data" / fmt
    if force:
        out.mkdir(parents=True)
        (out / "keep").write_text("previous")

    def write_once_then_fail(real):
        calls = []

        def fake(*args, **kwargs):
            calls.append(1)
            if len(calls) > 1:
                raise OSError("disk full")
            return real(*args, **kwargs)

        return fake

    if fmt == "hf":
        from datasets import Dataset

        monkeypatch.setattr(Dataset, "save_to_disk", write_once_then_fail(Dataset.save_to_disk))
    else:
        monkeypatch.setattr(export, "_write_jsonl", write_once_then_fail(export._write_jsonl))
    with pytest.raises(OSError, match="disk full"):
        export_data(run, fmt, force=force)
    assert sorted(p.name for p in out.parent.iterdir()) == ([fmt] if force else [])
    if force:
        assert sorted(p.name for p in out.iterdir()) == ["keep"]


def test_bad_runs_and_arguments_are_one_clear_error(tmp_path, run):
    (tmp_path / "empty").mkdir()
    unfinished = make_run(tmp_path / "unfinished")
    (unfinished / "generate" / "DONE.json").unlink()
    killed = tmp_path / "killed"
    (killed / ".generate.work-0123456789ab" / "shards").mkdir(parents=True)
    cases = [
        (tmp_path / "nope", "no run folder at"),
        (tmp_path / "empty", "is not a run folder"),
        (unfinished, "unfinished \\(no DONE.json\\)"),
        (unfinished / "generate", "unfinished \\(no DONE.json\\)"),
        (killed, "generate stage of .* is unfinished"),
    ]
    for path, problem in cases:
        with pytest.raises(DistillError, match=problem):
            export_data(path, "messages")
    with pytest.raises(DistillError, match="--format csv is not a data format"):
        export_data(run, "csv")
    with pytest.raises(DistillError, match="--split dev is not a split"):
        export_data(run, "hf", split="dev")


def test_cli_writes_and_prints_one_summary_line(run):
    res = CliRunner().invoke(app, ["data", "export", str(run / "generate"), "--format", "sharegpt", "--split", "train"])
    assert res.exit_code == 0, res.output
    assert res.output.strip() == f"data export: 2 train rows (sharegpt) → {run / 'data' / 'sharegpt'}"
    assert len(read_jsonl(run / "data" / "sharegpt" / "train.jsonl")) == 2


def test_cli_bad_run_is_one_error_line_and_exit_2(tmp_path):
    res = CliRunner().invoke(app, ["data", "export", str(tmp_path / "missing"), "--format", "hf"])
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [
        f"error: no run folder at {tmp_path / 'missing'} — pass a run folder such as runs/quickstart"
    ]


def test_greedy_methods_record_greedy_decoding_whatever_the_sampling_keys_say():
    greedy = export.generation({**TEACHER, "method": "zero_shot_cot"})
    assert greedy == {"method": "zero_shot_cot", "temperature": 0.0, "top_p": 1.0, "samples": 1, "max_new_tokens": 256}
    assert export.generation(TEACHER) == GENERATION
