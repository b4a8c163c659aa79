"""Training sized by validation on tiny real models: early stopping, the best checkpoint kept,
resume, and the train stage's dev curve and stop reason."""

import json

import pytest
import torch
from tiny import write_recipe
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.config import StudentConfig
from distill.students.data import tokenize_example
from distill.students.trainer import TrainingInterrupted, train

pytestmark = pytest.mark.integration


def _examples(tok):
    return [tokenize_example(tok, f"Q: {i} + 1 =", f" Therefore, the answer is {i + 1}.", 64) for i in range(12)]


class ScriptedDev:
    """Dev scores in a fixed order (the policy under test is the trainer's, not the scorer's); keeps a
    fingerprint of the weights it saw at each evaluation."""

    def __init__(self, accuracies):
        self.accuracies = list(accuracies)
        self.seen: list[torch.Tensor] = []

    def __call__(self, model):
        self.seen.append(torch.cat([p.detach().flatten() for p in model.parameters()]).clone())
        i = len(self.seen) - 1
        return {"dev_loss": 1.0 + i, "dev_accuracy": self.accuracies[i], "dev_correct": 0, "dev_n": 4}


def _cfg(**validation):
    return StudentConfig(
        model="x",
        epochs="auto",
        lr=3e-3,
        batch_size=4,
        micro_batch_size=2,
        seed=1,
        precision="fp32",
        save_every=1,
        validation={"every": 1, "patience": 2, "max_epochs": 4, **validation},
    )


def test_early_stopping_keeps_the_best_evaluations_weights(tiny_student):
    tok = AutoTokenizer.from_pretrained(tiny_student)
    model = AutoModelForCausalLM.from_pretrained(tiny_student)
    dev = ScriptedDev([0.0, 0.25, 0.5, 0.5, 0.25, 0.75, 1.0])  # best at step 2, then two without improvement
    result = train(model, _examples(tok), _cfg(), tok.pad_token_id, dev=dev)
    assert [d["step"] for d in result.dev] == [0, 1, 2, 3, 4]
    assert result.steps == 4 and result.best_step == 2
    assert result.stop_reason == "dev accuracy did not improve for 2 evaluations (best 50.0%, loss 3.000 at step 2)"
    now = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.equal(now, dev.seen[2]) and not torch.equal(now, dev.seen[4])


def test_auto_runs_to_max_epochs_when_dev_keeps_improving(tiny_student):
    tok = AutoTokenizer.from_pretrained(tiny_student)
    model = AutoModelForCausalLM.from_pretrained(tiny_student)
    dev = ScriptedDev([i / 100 for i in range(20)])
    result = train(model, _examples(tok), _cfg(max_epochs=2), tok.pad_token_id, dev=dev)
    assert result.steps == 6 and result.best_step == 6 and len(result.dev) == 7
    assert result.stop_reason == "2 epochs done (validation.max_epochs)"


def test_a_killed_validated_run_resumes_to_the_same_curve_and_weights(tiny_student, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_student)
    curve = [0.0, 0.25, 0.5, 0.5, 0.75, 0.5, 0.5, 0.5]
    ref_model = AutoModelForCausalLM.from_pretrained(tiny_student)
    ref = train(ref_model, _examples(tok), _cfg(), tok.pad_token_id, dev=ScriptedDev(curve))
    crashed = AutoModelForCausalLM.from_pretrained(tiny_student)
    with pytest.raises(TrainingInterrupted):
        train(
            crashed,
            _examples(tok),
            _cfg(),
            tok.pad_token_id,
            checkpoint_dir=tmp_path,
            dev=ScriptedDev(curve),
            stop_after=5,
        )
    resumed_model = AutoModelForCausalLM.from_pretrained(tiny_student)
    dev = ScriptedDev(curve)
    dev.seen = [None] * 5  # the first five evaluations happened before the kill
    resumed = train(resumed_model, _examples(tok), _cfg(), tok.pad_token_id, checkpoint_dir=tmp_path, dev=dev)
    assert [(d["step"], d["dev_accuracy"]) for d in resumed.dev] == [(d["step"], d["dev_accuracy"]) for d in ref.dev]
    assert (resumed.best_step, resumed.stop_reason) == (ref.best_step, ref.stop_reason) == (4, ref.stop_reason)
    for a, b in zip(resumed_model.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)


def test_train_stage_writes_the_dev_curve_and_keeps_the_best_checkpoint(
    tmp_path, tiny_teacher, tiny_student, tiny_task_cfg
):
    import distill
    from distill.students.validation import DevSet

    f = write_recipe(
        tmp_path,
        "val",
        tiny_task_cfg,
        teacher={
            "model": f"hf:{tiny_teacher}",
            "max_new_tokens": 24,
            "executor": "local",
            "dtype": "float32",
            "keep": "all",
        },
        student={
            "model": f"hf:{tiny_student}",
            "epochs": "auto",
            "lr": 3e-3,
            "batch_size": 2,
            "micro_batch_size": 2,
            "max_length": 128,
            "eval_max_new_tokens": 16,
            "validation": {"dev_size": 3, "every": 2, "patience": 2, "max_epochs": 3},
        },
    )
    distill.generate(f)
    result = distill.train(f)
    folder = tmp_path / "runs" / "val" / "train"
    dev = json.loads((folder / "dev.json").read_text())
    metrics = json.loads((folder / "metrics.json").read_text())
    assert result.metrics == metrics and dev[0]["step"] == 0 and metrics["dev_questions"] == 3
    assert metrics["best_step"] in [d["step"] for d in dev] and metrics["stop_reason"]
    best = next(d for d in dev if d["step"] == metrics["best_step"])
    assert metrics["best_dev_accuracy"] == best["dev_accuracy"]
    # The report shows why training stopped, the kept step and the whole dev curve.
    from distill.stages.report import write_report

    md = write_report(folder.parent, {"name": "val"}, {}, {"train": metrics}, {})
    assert f"stopped: {metrics['stop_reason']}. Kept step {metrics['best_step']} (dev accuracy" in md
    table = [line for line in md.splitlines() if line.startswith("| ") and line.count("|") == 6][1:]
    assert [int(line.split("|")[1]) for line in table] == [d["step"] for d in dev]
    assert sum(line.rstrip().endswith("✓ |") for line in table) == 1
    assert (folder.parent / "plots" / "loss.png").stat().st_size > 10_000
    # The saved model is the best evaluation's: scored again on the same dev split it gives the same loss.
    from distill.core.answers import Task
    from distill.students.data import build_examples, prompt_template
    from distill.students.validation import dev_problems, split_dev
    from distill.teachers.rows import read_rows

    rows = read_rows(tmp_path / "runs" / "val" / "generate" / "dataset" / "train.parquet")
    _, dev_rows = split_dev(rows, 3, 0)
    tok = AutoTokenizer.from_pretrained(folder / "model")
    model = AutoModelForCausalLM.from_pretrained(folder / "model")
    task = Task("number")
    scorer = DevSet(
        build_examples(tok, dev_rows, "rationale", task, 128),
        dev_problems(dev_rows),
        tok,
        prompt_template(tok, "rationale"),
        task,
        16,
        8,
        tok.pad_token_id,
    )
    again = scorer(model)
    assert again["dev_loss"] == pytest.approx(best["dev_loss"], rel=1e-4)
    assert again["dev_accuracy"] == best["dev_accuracy"]


def test_lr_auto_sweeps_on_the_dev_split_and_trains_with_the_best(tmp_path, tiny_teacher, tiny_student, tiny_task_cfg):
    import distill
    from distill.stages.report import write_report

    f = write_recipe(
        tmp_path,
        "lr",
        tiny_task_cfg,
        teacher={"model": f"hf:{tiny_teacher}", "max_new_tokens": 24, "executor": "local", "dtype": "float32"},
        student={
            "model": f"hf:{tiny_student}",
            "epochs": 1,
            "lr": "auto",
            "lr_sweep": {"candidates": [1e-5, 3e-3], "steps": 3},
            "batch_size": 2,
            "micro_batch_size": 2,
            "max_length": 128,
            "eval_max_new_tokens": 8,
            "validation": {"dev_size": 2},
        },
    )
    distill.generate(f)
    metrics = distill.train(f).metrics
    sweep = metrics["lr_sweep"]
    assert [r["lr"] for r in sweep] == [1e-5, 3e-3] and all(r["steps"] == 3 for r in sweep)
    # 1e-5 barely moves a random tiny model in 3 steps; 3e-3 does: lower dev loss, and it is the one used.
    assert sweep[1]["dev_loss"] < sweep[0]["dev_loss"] and metrics["lr"] == 3e-3
    saved = json.loads((tmp_path / "runs" / "lr" / "train" / "distill_config.json").read_text())
    assert saved["stage_config"]["lr"] == 3e-3  # the resolved setting travels with the model
    md = write_report(tmp_path / "runs" / "lr", {"name": "lr"}, {}, {"train": metrics}, {})
    assert "Learning rate 0.003, chosen by dev loss after 3 steps per candidate (1e-05 → " in md
