"""Logit KD through the CLI: `distill ablate` trains a KD student on the teacher's stored top-k, and
a student with another tokenizer is one clear error."""

import json

import pytest
import yaml
from tiny import write_recipe
from typer.testing import CliRunner

from distill.cli import app

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def kd_recipe(tmp_path_factory, tiny_teacher, tiny_student, tiny_task_cfg):
    root = tmp_path_factory.mktemp("kd")
    f = write_recipe(
        root,
        "kd",
        tiny_task_cfg,
        teacher={
            "model": f"hf:{tiny_teacher}",
            "max_new_tokens": 16,
            "batch_size": 6,
            "executor": "local",
            "dtype": "float32",
            "topk_logprobs": 5,
            "keep": "all",
        },
        student={
            "model": f"hf:{tiny_student}",
            "epochs": 4,
            "lr": 3e-3,
            "batch_size": 4,
            "micro_batch_size": 2,
            "max_length": 128,
            "eval_max_new_tokens": 8,
            "kd": {"loss": "forward_kl", "temperature": 1.0, "weight": 0.5},
        },
    )
    return f


def test_ablate_trains_a_kd_student_on_stored_top_k(kd_recipe):
    import pyarrow.parquet as pq

    res = CliRunner().invoke(app, ["ablate", str(kd_recipe), "--formats", "rationale,kd,on_policy"])
    assert res.exit_code == 0, res.output
    run = f"{yaml.safe_load(kd_recipe.read_text())['output_dir']}/kd"
    rows = pq.read_table(f"{run}/generate/dataset/train.parquet").to_pylist()
    assert len(rows) == 12
    for r in rows:
        assert len(r["teacher_topk_ids"]) == len(r["teacher_token_ids"]) == len(r["teacher_topk_logprobs"]) > 0
        assert (
            all(len(x) == 5 for x in r["teacher_topk_ids"]) and r["teacher_topk_ids"][0][0] == r["teacher_token_ids"][0]
        )
        lp = r["teacher_topk_logprobs"][0]
        assert lp == sorted(lp, reverse=True) and lp[0] <= 0
    table = json.loads(open(f"{run}/ablate/ablation.json").read())
    kd = next(r for r in table["rows"] if r["model"] == "kd")
    assert "skipped" not in kd and kd["n"] == 6 and kd["train_examples"] == 12
    losses = json.loads(open(f"{run}/ablate/train-kd/loss.json").read())
    assert losses[-1]["loss"] < losses[0]["loss"]
    cfg = json.loads(open(f"{run}/ablate/train-kd/distill_config.json").read())
    assert cfg["stage_config"]["format"] == "kd"
    # The on-policy row: the rationale student with its own samples scored by the model teacher
    op = next(r for r in table["rows"] if r["model"] == "on_policy")
    assert "skipped" not in op and op["n"] == 6 and op["train_steps"] == kd["train_steps"]
    cfg = json.loads(open(f"{run}/ablate/train-on_policy/distill_config.json").read())["stage_config"]
    assert cfg["format"] == "rationale" and cfg["on_policy"]["lmbda"] == 0.5
    state = json.loads(open(f"{run}/ablate/train-on_policy/metrics.json").read())["on_policy"]
    assert state["loss"] == "jsd" and 0 < state["steps"] < op["train_steps"] and state["scored"] > 0
    assert "| on-policy (GKD) |" in open(f"{run}/ablate/ablation.md").read()


def test_kd_with_a_different_tokenizer_is_one_clear_error(kd_recipe, tiny_teacher, tiny_student, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    other = tmp_path / "other"
    shutil.copytree(tiny_student, other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<extra_token>"])
    tok.save_pretrained(other)
    gen = CliRunner().invoke(app, ["generate", str(kd_recipe)])  # reused when already there
    assert gen.exit_code == 0, gen.output
    res = CliRunner().invoke(app, ["train", str(kd_recipe), f"student.model=hf:{other}", "student.format=kd"])
    assert res.exit_code == 2
    n_teacher = len(AutoTokenizer.from_pretrained(tiny_teacher))
    assert n_teacher == len(tok) - 1
    assert res.output.splitlines()[-1] == (
        f"error: logit KD needs a shared tokenizer: teacher and student tokenizers differ ({n_teacher} vs {len(tok)}"
        " tokens) — pick a student from the teacher's model family, or student.format=rationale"
    )
    assert sum(ln.startswith("error:") for ln in res.output.splitlines()) == 1


@pytest.fixture(scope="module")
def replay_kd_recipe(tmp_path_factory, tiny_student):
    """A recorded (text-only) teacher, and the tiny model teacher named as the KD scorer."""
    root = tmp_path_factory.mktemp("replay_kd")
    problems = [{"question": f"What is {i} plus {i % 3}?", "answer": str(i + i % 3)} for i in range(12)]
    (root / "task.jsonl").write_text("".join(json.dumps(p) + "\n" for p in problems))
    recs = [
        {"question": p["question"], "rationale": f"{i} + {i % 3} = {i + i % 3}.", "answer": p["answer"]}
        for i, p in enumerate(problems)
    ]
    (root / "teacher.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    recipe = {
        "name": "replay_kd",
        "output_dir": str(root / "runs"),
        "cache": str(root / "cache.sqlite"),
        "task": {"source": "file", "name": str(root / "task.jsonl"), "train_size": 8, "eval_size": 4},
        "teacher": {"model": f"replay:{root / 'teacher.jsonl'}", "executor": "local", "topk_logprobs": 5},
        "student": {
            "model": f"hf:{tiny_student}",
            "format": "kd",
            "epochs": 3,
            "lr": 3e-3,
            "batch_size": 4,
            "micro_batch_size": 2,
            "max_length": 96,
            "eval_max_new_tokens": 8,
        },
    }
    f = root / "recipe.yaml"
    f.write_text(yaml.safe_dump(recipe))
    return f


def test_a_text_only_teacher_distils_through_a_scoring_teacher(replay_kd_recipe, tiny_teacher, tiny_student, tmp_path):
    """student.kd.teacher scores the recorded rationales; the scores are cached, so a student with
    another tokenizer (ULD) trains on the same scores without a new call."""
    import shutil

    from transformers import AutoTokenizer

    run = f"{yaml.safe_load(replay_kd_recipe.read_text())['output_dir']}/replay_kd"
    assert CliRunner().invoke(app, ["generate", str(replay_kd_recipe)]).exit_code == 0
    # without a scorer: one error line that names the fix
    res = CliRunner().invoke(app, ["train", str(replay_kd_recipe)])
    assert res.exit_code == 2 and "set student.kd.teacher" in res.output.splitlines()[-1]
    scorer = f"student.kd.teacher=hf:{tiny_teacher}"
    plan = CliRunner().invoke(app, ["plan", str(replay_kd_recipe), scorer, "--json"])
    assert plan.exit_code == 0, plan.output
    step = next(s for s in json.loads(plan.output)["stages"] if s["part"] == "kd scoring")
    assert step["calls"]["estimate"] == 8 and step["cached"] == 0 and step["tokens_in"]["estimate"] > 0
    res = CliRunner().invoke(app, ["train", str(replay_kd_recipe), scorer, "student.kd.loss=forward_kl"])
    assert res.exit_code == 0, res.output
    metrics = json.loads(open(f"{run}/train/metrics.json").read())
    scoring = metrics["kd_scoring"]
    assert scoring["rows"] == scoring["scored"] == 8 and scoring["cached"] == 0 and scoring["teacher_tokens"] > 0
    assert metrics["examples"] == 8  # every row a KD example
    losses = json.loads(open(f"{run}/train/loss.json").read())
    assert losses[-1]["loss"] < losses[0]["loss"]

    other = tmp_path / "other"  # a student whose vocabulary differs from the scorer's
    shutil.copytree(tiny_student, other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<extra_token>"])
    tok.save_pretrained(other)
    res = CliRunner().invoke(app, ["train", str(replay_kd_recipe), scorer, f"student.model=hf:{other}"])
    assert res.exit_code == 2 and "student.kd.loss=forward_kl needs a shared tokenizer" in res.output
    res = CliRunner().invoke(
        app, ["train", str(replay_kd_recipe), scorer, f"student.model=hf:{other}", "student.kd.loss=uld"]
    )
    assert res.exit_code == 0, res.output
    scoring = json.loads(open(f"{run}/train/metrics.json").read())["kd_scoring"]
    assert scoring["scored"] == scoring["cached"] == 8 and scoring["teacher_tokens"] == 0  # never paid twice
    plan = CliRunner().invoke(app, ["plan", str(replay_kd_recipe), scorer, "--json"])
    assert plan.exit_code == 0, plan.output
    step = next(s for s in json.loads(plan.output)["stages"] if s["part"] == "kd scoring")
    assert step["calls"]["estimate"] == 0 and step["cached"] == 8  # the bill shows they are paid for
