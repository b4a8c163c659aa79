"""``distill data export --format messages`` as a user runs it, then fed to TRL's ``SFTTrainer``: the
export is only worth having if another trainer reads it as written and trains on the same text.

(Not ``test_data_export.py``: that basename is the unit test's, and pytest refuses two test modules
of one basename in folders without ``__init__.py``.)
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distill.teachers.rows import ROW_SCHEMA

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TEACHER = {"method": "zero_shot_cot", "temperature": 0.0, "top_p": 1.0, "samples": 1, "max_new_tokens": 64}


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "distill", *args], capture_output=True, text=True, cwd=ROOT, env=env)


def _make_run(root: Path) -> Path:
    """A finished run folder: four kept train rows (one with provenance and kept columns), two eval
    rows of which the teacher failed one (exported with the user turn only)."""

    def row(i: int, split: str, **kw) -> dict:
        a, b = i + 2, i + 5
        return {
            "id": f"{split}-{i}",
            "split": split,
            "question": f"State the final answer to the following arithmetic problem: {a} + {b} =",
            "gold": str(a + b),
            "rationale": f"First {a} + {b} = {a + b}.",
            "pred": str(a + b),
            "correct": True,
            "tokens_in": 30,
            "tokens_out": 12,
            "cached": False,
            "teacher": "tiny@0",
            **kw,
        }

    train = [row(0, "train", source="chain_sum:train", source_row=0, extra='{"level": 1}')]
    train += [row(i, "train") for i in range(1, 4)]
    evals = [row(0, "eval"), row(1, "eval", pred=None, correct=None, rationale="", error="timeout")]
    gen = root / "generate"
    (gen / "dataset").mkdir(parents=True)
    for name, rows in (("train", train), ("eval", evals)):
        pq.write_table(pa.Table.from_pylist(rows, schema=ROW_SCHEMA), gen / "dataset" / f"{name}.parquet")
    recipe = {"task": {"answer_type": "number"}, "teacher": TEACHER}
    (gen / "distill_config.json").write_text(
        json.dumps({"stage": "generate", "stage_config": recipe, "recipe": recipe})
    )
    (gen / "DONE.json").write_text('{"hash": "x"}')
    (gen / "shards.json").write_text('{"shards": []}')
    return root


def test_trl_sft_trains_one_step_on_the_messages_export(tmp_path):
    """The CLI writes the export with one summary line; ``load_dataset("json")`` reads both files
    (provenance columns, a null ``extra`` beside an object one, a user-only eval row); SFTTrainer
    tokenizes the messages through the chat template (the target text lands in the input ids), runs
    one step with a finite loss and evaluates the eval split with a finite loss too."""
    from datasets import load_dataset
    from tiny import build_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    run = _make_run(tmp_path / "run")
    res = _cli("data", "export", str(run), "--format", "messages")
    out = run / "data" / "messages"
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip() == f"data export: 4 train + 2 eval rows (messages) → {out}"

    files = {"train": str(out / "train.jsonl"), "eval": str(out / "eval.jsonl")}
    ds = load_dataset("json", data_files=files, cache_dir=str(tmp_path / "cache"))
    assert ds["train"][0]["extra"] == {"level": 1} and ds["train"][1]["extra"] is None
    assert [len(m) for m in ds["eval"]["messages"]] == [2, 1]

    folder = build_model(tmp_path / "model", "llama", seed=0)
    tok = AutoTokenizer.from_pretrained(folder)
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(folder),
        args=SFTConfig(
            output_dir=str(tmp_path / "sft"),
            max_steps=1,
            per_device_train_batch_size=2,
            per_device_eval_batch_size=2,
            learning_rate=1e-3,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            max_length=256,
            dataloader_num_workers=0,
            seed=0,
        ),
        train_dataset=ds["train"],
        eval_dataset=ds["eval"],
        processing_class=tok,
    )
    target = ds["train"][0]["messages"][1]["content"]
    assert target.startswith("Let's think step by step. First 2 + 5 = 7.")
    assert target in tok.decode(trainer.train_dataset[0]["input_ids"])

    result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert result.global_step == 1 and len(losses) == 1 and math.isfinite(losses[0]) and losses[0] > 0
    assert math.isfinite(trainer.evaluate()["eval_loss"])


def test_a_bad_run_path_is_one_error_line_and_exit_2(tmp_path):
    """As typed in a shell: a folder without a generate stage gets one line naming it and the fix."""
    (tmp_path / "notarun").mkdir()
    res = _cli("data", "export", str(tmp_path / "notarun"), "--format", "hf")
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stdout + res.stderr
    assert lines[0].startswith(f"error: {tmp_path / 'notarun'} is not a run folder")
    assert not (tmp_path / "notarun" / "data").exists()
