"""`distill eval --split`: held-out, train or a file of new problems, per-example outputs saved."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from distill.cli import app

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def run_recipe(tmp_path_factory, tiny_student):
    root = tmp_path_factory.mktemp("evalsplit")
    problems = [{"question": f"What is {i} plus 2?", "answer": str(i + 2)} for i in range(10)]
    (root / "task.jsonl").write_text("".join(json.dumps(p) + "\n" for p in problems))
    recs = [{"question": p["question"], "rationale": f"{i} + 2.", "answer": str(i + 2)} for i, p in enumerate(problems)]
    (root / "teacher.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (root / "new.jsonl").write_text(
        "".join(json.dumps({"question": f"{i} + 5 =", "answer": i + 5}) + "\n" for i in range(3))
    )
    recipe = {
        "name": "ev",
        "output_dir": str(root / "runs"),
        "task": {"source": "file", "name": str(root / "task.jsonl"), "train_size": 7, "eval_size": 3},
        "teacher": {"model": f"replay:{root / 'teacher.jsonl'}", "executor": "local"},
        "student": {
            "model": f"hf:{tiny_student}",
            "epochs": 1,
            "batch_size": 4,
            "micro_batch_size": 4,
            "eval_max_new_tokens": 6,
        },
        "export": {"enabled": False},
        "eval": {"models": ["teacher", "student_base", "student"]},
    }
    f = root / "recipe.yaml"
    f.write_text(yaml.safe_dump(recipe))
    res = CliRunner().invoke(app, ["run", str(f)])
    assert res.exit_code == 0, res.output
    return f, root


def test_eval_on_the_train_split_scores_every_train_problem(run_recipe):
    f, root = run_recipe
    res = CliRunner().invoke(app, ["eval", str(f), "--split", "train"])
    assert res.exit_code == 0, res.output
    out = root / "runs" / "ev" / "evaluate-train"
    scores = json.loads((out / "scores.json").read_text())
    assert set(scores) == {"teacher", "student_base", "student"}
    assert scores["teacher"]["n"] == 7 and scores["teacher"]["correct"] == 7
    rows = [json.loads(x) for x in (out / "student.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"train-{i:06d}" for i in range(7)]
    assert sum(r["correct"] for r in rows) == scores["student"]["correct"] and all("output" in r for r in rows)
    assert json.loads((out / "distill_config.json").read_text())["stage_config"]["split"] == "train"
    again = CliRunner().invoke(app, ["eval", str(f), "--split", "train"])
    assert again.exit_code == 0 and "up to date" in again.output


def test_eval_on_a_file_of_new_problems_skips_the_teacher(run_recipe):
    f, root = run_recipe
    res = CliRunner().invoke(app, ["eval", str(f), "--split", str(root / "new.jsonl")])
    assert res.exit_code == 0, res.output
    out = root / "runs" / "ev" / "evaluate-new"
    scores = json.loads((out / "scores.json").read_text())
    assert set(scores) == {"student_base", "student"} and scores["student"]["n"] == 3
    rows = [json.loads(x) for x in (out / "student_base.jsonl").read_text().splitlines()]
    assert [r["gold"] for r in rows] == ["5", "6", "7"] and [r["question"] for r in rows][0] == "0 + 5 ="


def test_unknown_split_is_one_line_error(run_recipe):
    f, root = run_recipe
    res = CliRunner().invoke(app, ["eval", str(f), "--split", "validation"])
    assert res.exit_code == 2
    assert res.output.splitlines() == [
        "error: split 'validation' is neither eval, train nor a file — pass eval, train or a .jsonl path"
    ]
    assert not list((root / "runs" / "ev").glob("evaluate-validation*"))
