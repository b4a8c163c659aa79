"""Cross-tokenizer logit KD through the Python API: a tiny teacher (400-token BPE) stores its top-k,
a student with another tokenizer (300-token BPE) trains on its own tokens with ULD, and the shared-
tokenizer losses still refuse that pair with one clear error."""

import json

import pytest
from tiny import write_recipe
from typer.testing import CliRunner

from distill.cli import app

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def other_tokenizer_student(tmp_path_factory):
    """A tiny random llama whose tokenizer has other merges (and ids) than the teacher's."""
    from tiny import build_model

    return build_model(tmp_path_factory.mktemp("student300"), "llama", seed=2, vocab_size=300)


@pytest.fixture(scope="module")
def uld_recipe(tmp_path_factory, tiny_teacher, other_tokenizer_student, tiny_task_cfg):
    root = tmp_path_factory.mktemp("uld")
    f = write_recipe(
        root,
        "uld",
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
            "model": f"hf:{other_tokenizer_student}",
            "format": "kd",
            "kd": {"loss": "uld", "weight": 0.5},
            "epochs": 4,
            "lr": 3e-3,
            "batch_size": 4,
            "micro_batch_size": 2,
            "max_length": 128,
            "eval_max_new_tokens": 8,
        },
    )
    return f


def _train_set_uld(model_dir, tokenizer, examples) -> float:
    """The ULD term alone over all training examples, as the trainer computes it."""
    import torch
    from transformers import AutoModelForCausalLM

    from distill.config import KDSettings
    from distill.students.data import collate
    from distill.students.trainer import forward_loss

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    parts: dict = {}
    with torch.no_grad():
        forward_loss(model, collate(examples, tokenizer.pad_token_id), KDSettings(loss="uld", weight=1.0), parts)
    return parts["kd"].item()


def test_uld_trains_a_student_with_another_tokenizer(uld_recipe, tiny_teacher, other_tokenizer_student):
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    import distill
    from distill.core.answers import Task
    from distill.students.data import build_examples

    teacher_tok = AutoTokenizer.from_pretrained(tiny_teacher)
    student_tok = AutoTokenizer.from_pretrained(other_tokenizer_student)
    assert (len(teacher_tok), len(student_tok)) == (392, 300)

    gen = distill.generate(uld_recipe)
    rows = pq.read_table(gen.paths["train"]).to_pylist()
    assert len(rows) == 12 and all(len(r["teacher_topk_logprobs"][0]) == 5 for r in rows)

    res = distill.train(uld_recipe)
    assert res.metrics["examples"] == 12 and res.metrics["steps"] == 12
    log = json.loads(res.paths["loss"].read_text())
    kd = [entry["kd"] for entry in log]
    print("ULD per step:", [round(x, 4) for x in kd])
    # The tiny teacher is near one-hot; a near-uniform untrained student's renormalised top-5 is
    # ~0.2 each, so the L1 starts just under 2·(1 − 0.2) = 1.6.
    assert 1.0 < kd[0] < 1.6
    assert sum(kd[-3:]) / 3 < 0.9 * sum(kd[:3]) / 3

    # The same term over the whole training set, untrained student vs trained one.
    examples = build_examples(student_tok, rows, "kd", Task("number"), 128, kd_loss="uld")
    assert sum(len(e["kd_pos"]) for e in examples) > 0 and all("kd_ids" not in e for e in examples)
    before = _train_set_uld(other_tokenizer_student, student_tok, examples)
    after = _train_set_uld(res.paths["model"], student_tok, examples)
    # Cross-entropy alone on the student's tokens does not bring the student's distributions closer.
    ce_only = distill.train(uld_recipe, ["student.kd.weight=0.0"])
    assert "kd" not in json.loads(ce_only.paths["loss"].read_text())[0]
    alone = _train_set_uld(ce_only.paths["model"], student_tok, examples)
    print(f"ULD over the training set: untrained {before:.4f}, ULD-trained {after:.4f}, CE-only {alone:.4f}")
    assert before > 0.5 and after < 0.9 * before and after < 0.75 * alone


def test_shared_tokenizer_kd_still_refuses_the_pair(uld_recipe, tiny_teacher, other_tokenizer_student):
    from transformers import AutoTokenizer

    import distill

    distill.generate(uld_recipe)  # reused when already there
    res = CliRunner().invoke(app, ["train", str(uld_recipe), "student.kd.loss=forward_kl"])
    assert res.exit_code == 2
    n_teacher = len(AutoTokenizer.from_pretrained(tiny_teacher))
    n_student = len(AutoTokenizer.from_pretrained(other_tokenizer_student))
    assert res.output.splitlines()[-1] == (
        f"error: logit KD needs a shared tokenizer: teacher and student tokenizers differ ({n_teacher} vs "
        f"{n_student} tokens) — pick a student from the teacher's model family, or student.format=rationale"
    )
    assert sum(ln.startswith("error:") for ln in res.output.splitlines()) == 1
