"""On-policy distillation through the API and the CLI on real tiny models: the student's own samples
scored by the teacher, the divergence on those samples falls, a rerun pays for nothing, the scoring
budget stops a run cleanly and resumably, and a pair without a shared tokenizer trains with ULD."""

import json

import pytest
from tiny import write_recipe
from typer.testing import CliRunner

from distill.cli import app

pytestmark = pytest.mark.integration

STUDENT = {
    "epochs": 4,
    "lr": 3e-3,
    "batch_size": 4,
    "micro_batch_size": 2,
    "max_length": 128,
    "eval_max_new_tokens": 16,
    "save_every": 4,
    "precision": "fp32",  # the same arithmetic on every host (auto would take bf16 where the CPU has it)
}


def _recipe(root, tiny_task_cfg, tiny_teacher, student_dir, **student):
    root.mkdir(parents=True, exist_ok=True)
    return write_recipe(
        root,
        "on_policy",
        tiny_task_cfg,
        teacher={
            "model": f"hf:{tiny_teacher}",
            "max_new_tokens": 16,
            "batch_size": 6,
            "executor": "local",
            "dtype": "float32",
            "keep": "all",
        },
        student={"model": f"hf:{student_dir}", **STUDENT, **student},
    )


def _divergence(model_dir, recipe_path, questions, loss="jsd") -> float:
    """Mean per-token divergence (the on-policy loss) of a saved student on fresh samples of its own
    (seeds no training step used), scored by the teacher."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.config import load_recipe
    from distill.core.answers import Task
    from distill.stages.train import _on_policy
    from distill.students.data import collate
    from distill.students.trainer import forward_loss

    recipe = load_recipe(recipe_path)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    op = _on_policy(recipe, tok, recipe.student, Task(recipe.task.answer_type), 1)
    assert op.loss == loss
    total, n = 0.0, 0
    for k in range(3):
        examples = op.examples(model, questions, step=10_000 + k)
        parts: dict = {}
        with torch.no_grad():
            forward_loss(model, collate(examples, tok.pad_token_id), op.kd, parts)
        tokens = sum(len(e["kd_pos"]) for e in examples)
        total += parts["kd"].item() * tokens
        n += tokens
    return total / n


def test_on_policy_lowers_the_divergence_on_the_students_own_samples(
    tmp_path, tiny_task_cfg, tiny_teacher, tiny_student
):
    import distill
    from distill.core.problems import load_problems

    questions = [p["question"] for p in load_problems(tiny_task_cfg)[0]]
    on = _recipe(tmp_path / "on", tiny_task_cfg, tiny_teacher, tiny_student, on_policy={"lmbda": 1.0})
    off = _recipe(tmp_path / "off", tiny_task_cfg, tiny_teacher, tiny_student)
    distill.generate(on)
    distill.generate(off)
    res = distill.train(on)
    sft = distill.train(off)
    state = res.metrics["on_policy"]
    assert state["steps"] == res.metrics["steps"] == 12 and state["loss"] == "jsd"
    assert state["samples"] == state["scored"] == 48 and state["cached"] == 0 and state["teacher_tokens"] > 0
    log = json.loads(res.paths["loss"].read_text())
    assert all(e["on_policy"] and e["kd"] == e["loss"] for e in log)
    from distill.stages.report import training_lines

    line = next(x for x in training_lines(res.metrics, []) if x.startswith("On-policy"))
    assert line.startswith(
        "On-policy distillation (jsd): 12 of 12 steps trained on the student's own samples (48 sampled"
    )
    assert (
        f"48 scored by the teacher, 0 of them from the cache; the teacher read {state['teacher_tokens']:,} new" in line
    )
    untrained = _divergence(tiny_student, on, questions)
    trained = _divergence(res.paths["model"], on, questions)
    sft_only = _divergence(sft.paths["model"], on, questions)
    print(f"JSD on own samples: untrained {untrained:.4f}, SFT {sft_only:.4f}, on-policy {trained:.4f}")
    # the samples depend on the CPU's float kernels: 0.29 of untrained 0.50 (SFT 0.50) on a 2026-12-02 host
    assert trained < 0.7 * untrained and trained < 0.8 * sft_only

    # Run again from scratch: every score the first run paid for comes from the cache.
    again = distill.train(on, force=True)
    assert again.metrics["on_policy"]["cached"] == again.metrics["on_policy"]["scored"] == 48
    assert again.metrics["on_policy"]["teacher_tokens"] == 0


def test_scoring_budget_stops_cleanly_and_resumes(tmp_path, tiny_task_cfg, tiny_teacher, tiny_student):
    import distill

    path = _recipe(tmp_path, tiny_task_cfg, tiny_teacher, tiny_student, on_policy={"lmbda": 1.0, "max_tokens": 1500})
    distill.generate(path)
    res = CliRunner().invoke(app, ["train", str(path)])
    assert res.exit_code == 2, res.output
    last = res.output.strip().splitlines()[-1]
    assert last.startswith("error: on-policy scoring stopped at step ") and "(max_tokens 1,500)" in last
    assert "raise student.on_policy.max_tokens / max_cost and run again" in last
    assert not (tmp_path / "runs" / "on_policy" / "train" / "DONE.json").exists()
    stopped_at = int(last.split("stopped at step ")[1].split(":")[0])
    assert 4 <= stopped_at < 12
    res = CliRunner().invoke(app, ["train", str(path), "student.on_policy.max_tokens=0"])
    assert res.exit_code == 0, res.output
    assert "resuming from the checkpoint" in res.output
    metrics = json.loads((tmp_path / "runs" / "on_policy" / "train" / "metrics.json").read_text())
    state = metrics["on_policy"]
    # resumed from the last checkpoint (every 4 steps); the steps scored after it came from the cache
    checkpoint = 4 * (stopped_at // 4)
    assert metrics["steps"] == state["steps"] == 12 and state["scored"] == 48
    assert state["cached"] == 4 * (stopped_at - checkpoint)


def test_another_tokenizer_trains_with_uld_and_jsd_is_refused(tmp_path, tiny_task_cfg, tiny_teacher):
    from tiny import build_model

    import distill
    from distill.core.problems import load_problems

    student = build_model(tmp_path / "student300", "llama", seed=2, vocab_size=300)
    path = _recipe(tmp_path, tiny_task_cfg, tiny_teacher, student, on_policy={"lmbda": 1.0}, epochs=8)
    distill.generate(path)
    res = distill.train(path)
    assert res.metrics["on_policy"]["loss"] == "uld"
    questions = [p["question"] for p in load_problems(tiny_task_cfg)[0]]
    untrained, trained = (_divergence(m, path, questions, "uld") for m in (student, res.paths["model"]))
    print(f"ULD on own samples: untrained {untrained:.4f}, on-policy {trained:.4f}")
    assert trained < 0.8 * untrained
    res = CliRunner().invoke(app, ["train", str(path), "student.on_policy.loss=jsd"])
    assert res.exit_code == 2 and res.output.strip().splitlines()[-1].startswith(
        "error: student.on_policy.loss=jsd needs a shared tokenizer: teacher and student tokenizers differ"
    )
