"""`distill ablate` on a tiny student with a replay teacher: one table, reused units, a resumable run."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from distill.cli import app

pytestmark = pytest.mark.integration


def _problems(n):
    return [{"question": f"What is {i} plus {i % 3}?", "answer": str(i + i % 3)} for i in range(n)]


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory, tiny_student):
    root = tmp_path_factory.mktemp("ablate")
    problems = _problems(14)
    (root / "task.jsonl").write_text("".join(json.dumps(p) + "\n" for p in problems))
    # Recorded teacher: right on every problem but the last two.
    recs = [
        {"question": p["question"], "rationale": f"{i} + {i % 3} = {i + i % 3}.", "answer": str(i + i % 3 + (i >= 12))}
        for i, p in enumerate(problems)
    ]
    (root / "teacher.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    recipe = {
        "name": "abl",
        "output_dir": str(root / "runs"),
        "cache": str(root / "cache.sqlite"),
        "task": {"source": "file", "name": str(root / "task.jsonl"), "train_size": 10, "eval_size": 4},
        "teacher": {"model": f"replay:{root / 'teacher.jsonl'}", "executor": "local"},
        "student": {
            "model": f"hf:{tiny_student}",
            "epochs": 2,
            "lr": 3e-3,
            "batch_size": 4,
            "micro_batch_size": 2,
            "max_length": 96,
            "eval_max_new_tokens": 8,
            "save_every": 1,
        },
    }
    f = root / "recipe.yaml"
    f.write_text(yaml.safe_dump(recipe))
    return f


def test_ablate_writes_one_table_and_reuses_finished_students(recipe_file):
    res = CliRunner().invoke(app, ["ablate", str(recipe_file)])
    assert res.exit_code == 0, res.output
    root = yaml.safe_load(recipe_file.read_text())["output_dir"]
    out = f"{root}/abl/ablate"
    table = json.loads(open(f"{out}/ablation.json").read())
    rows = {r["model"]: r for r in table["rows"]}
    assert list(rows) == ["teacher", "student_base", "label", "rationale", "multitask", "kd", "on_policy"]
    assert rows["teacher"]["correct"] == 2 and rows["teacher"]["n"] == 4  # eval = last 4; 2 recorded wrong
    assert "replay teacher" in rows["kd"]["skipped"]
    assert rows["on_policy"]["skipped"].startswith("the replay teacher cannot score the student's samples")
    # The replay teacher generated nothing: every row is a recording, no token paid for.
    gen = json.loads(open(f"{root}/abl/generate/metrics.json").read())
    assert gen["tokens_in"] == gen["tokens_out"] == gen["estimated_cost"] == 0
    assert gen["cached_rows"] == gen["problems"] == 14 and gen["teacher_model"].startswith("replay:")
    # Same questions, epochs and optimizer steps for every trained student; multitask doubles the examples.
    assert rows["label"]["train_steps"] == rows["rationale"]["train_steps"] == rows["multitask"]["train_steps"] == 6
    assert rows["multitask"]["train_examples"] == 2 * rows["rationale"]["train_examples"] == 20
    assert rows["label"]["train_tokens"] < rows["rationale"]["train_tokens"] < rows["multitask"]["train_tokens"]
    for r in table["rows"][:5]:
        assert r["n"] == 4 and r["ci95"][0] <= r["accuracy"] <= r["ci95"][1]
    for m in ("student_base", "label", "rationale", "multitask"):
        per = [json.loads(x) for x in open(rows[m]["outputs"])]
        assert len(per) == 4 and sum(x["correct"] for x in per) == rows[m]["correct"]
    md = open(f"{out}/ablation.md").read()
    assert "| label-only |" in md and "skipped: the replay teacher" in md and "distill ablate" in md
    assert "| label-only | " in md and "| 6 | — | 2 epochs done |" in md  # steps, no dev split, why it stopped
    import os

    assert os.path.getsize(f"{out}/ablation.png") > 1000
    again = CliRunner().invoke(app, ["ablate", str(recipe_file), "--formats", "label,rationale"])
    assert again.exit_code == 0, again.output
    assert again.output.count("up to date") >= 4  # generate, base eval, and both students' train + eval
    assert "train-label up to date" in again.output and "eval-rationale up to date" in again.output


def test_unknown_format_is_one_line_error(recipe_file):
    res = CliRunner().invoke(app, ["ablate", str(recipe_file), "--formats", "label,cot"])
    assert res.exit_code == 2
    assert res.output.splitlines() == [
        "error: unknown ablation format(s) ['cot'] — choose from label, rationale, multitask, kd, on_policy"
    ]


def test_killed_ablation_resumes_to_the_uninterrupted_weights(recipe_file, tmp_path, monkeypatch, capsys):
    import functools

    from safetensors.torch import load_file

    import distill.students.trainer
    from distill.ablate import ablate
    from distill.config import load_recipe
    from distill.students.trainer import TrainingInterrupted

    fresh = load_recipe(recipe_file, [f"output_dir={tmp_path / 'fresh'}"])
    killed = load_recipe(recipe_file, [f"output_dir={tmp_path / 'killed'}"])
    ablate(fresh, ("rationale",))
    original = distill.students.trainer.train
    monkeypatch.setattr(distill.students.trainer, "train", functools.partial(original, stop_after=3))
    with pytest.raises(TrainingInterrupted):
        ablate(killed, ("rationale",))
    base = tmp_path / "killed" / "abl" / "ablate"
    assert not (base / "train-rationale").exists() and list(base.glob(".train-rationale.work-*/rng.json"))
    monkeypatch.setattr(distill.students.trainer, "train", original)
    capsys.readouterr()
    table = ablate(killed, ("rationale",))
    assert "resuming from the checkpoint" in capsys.readouterr().err
    a = load_file(tmp_path / "fresh/abl/ablate/train-rationale/model/model.safetensors")
    b = load_file(base / "train-rationale/model/model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert table["rows"][-1]["train_steps"] == 6
