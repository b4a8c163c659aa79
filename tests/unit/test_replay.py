"""The replay teacher on the real recorded InstructGPT-175B zero-shot-CoT logs in ../shared/data."""

import json

import pytest
from conftest import SHARED_DATA

from distill.config import TaskConfig
from distill.core.answers import Task
from distill.core.errors import DistillError
from distill.core.problems import load_problems
from distill.core.readers import normalize_question, parse_kojima_log
from distill.teachers.replay import ReplayTeacher, load_records

LOGS = SHARED_DATA / "zero_shot_cot" / "teacher_logs"
needs_data = pytest.mark.skipif(not LOGS.exists(), reason="../shared/data not present")


@needs_data
@pytest.mark.parametrize(
    "log,answer_type,n,accuracy",
    [("coin_flip", "text", 500, 0.914), ("last_letters", "text", 500, 0.576), ("multiarith", "number", 600, 0.787)],
)
def test_recorded_logs_parse_to_the_published_accuracy(log, answer_type, n, accuracy):
    records = parse_kojima_log(LOGS / f"{log}_zero_shot_cot.log")
    assert len(records) == n
    task = Task(answer_type)
    correct = sum(task.is_correct(task.extract(r["answer"]).answer, r["gold"]) for r in records)
    assert abs(correct / n - accuracy) < 0.002  # Kojima et al. Table 1, recomputed from the logs
    assert all(r["rationale"] and not r["rationale"].startswith("Let's think") for r in records)


@needs_data
def test_replay_teacher_rows_on_the_coin_flip_split():
    cfg = TaskConfig(
        source="file",
        name=str(SHARED_DATA / "zero_shot_cot/datasets/coin_flip/coin_flip.json"),
        answer_type="text",
        train_size=400,
        eval_size=100,
    )
    train, evals = load_problems(cfg)
    assert len(train) == 400 and len(evals) == 100
    teacher = ReplayTeacher(LOGS / "coin_flip_zero_shot_cot.log")
    rows = teacher.rows(train + evals, Task("text"))
    assert all(r["pred"] in ("yes", "no") for r in rows)
    # BASELINES.md: the teacher got 363 of the first 400 right and 94 of the last 100.
    assert sum(r["correct"] for r in rows[:400]) == 363
    assert sum(r["correct"] for r in rows[400:]) == 94
    # Every row is a recording: the logged rationale itself, no token generated, none missing.
    logged = {
        normalize_question(r["question"]): r["rationale"]
        for r in parse_kojima_log(LOGS / "coin_flip_zero_shot_cot.log")
    }
    assert [r["rationale"] for r in rows] == [logged[normalize_question(p["question"])] for p in train + evals]
    assert {(r["finish_reason"], r["tokens_in"], r["tokens_out"], r["cached"]) for r in rows} == {
        ("recorded", 0, 0, True)
    }
    assert teacher.model_id == "replay:coin_flip_zero_shot_cot.log"


def test_missing_question_is_kept_with_a_reason(tmp_path):
    f = tmp_path / "rec.jsonl"
    f.write_text(json.dumps({"question": "1 + 1 = ?", "rationale": "one and one", "answer": "2"}) + "\n")
    rows = ReplayTeacher(f).rows(
        [
            {"id": "a", "split": "train", "question": "1  +  1 = ?", "gold": "2"},
            {"id": "b", "split": "train", "question": "2 + 2 = ?", "gold": "4"},
        ],
        Task("number"),
    )
    assert rows[0]["correct"] and rows[0]["rationale"] == "one and one"
    assert rows[1]["pred"] is None and "no recorded output" in rows[1]["parse_error"]


def test_bad_replay_sources_are_clear(tmp_path):
    with pytest.raises(DistillError, match="does not exist"):
        load_records(tmp_path / "nope.jsonl")
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(DistillError, match="missing"):
        load_records(f)
