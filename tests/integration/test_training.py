"""Training the student: loss goes down, deterministic, gradient accumulation, crash-resume, multitask."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.config import StudentConfig
from distill.students.data import tokenize_example
from distill.students.trainer import train

pytestmark = pytest.mark.integration


def _examples(tok):
    return [tokenize_example(tok, f"Q: {i} + 1 =", f" Therefore, the answer is {i + 1}.", 64) for i in range(12)]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_lowers_loss_and_is_deterministic(tiny_student, precision):
    tok = AutoTokenizer.from_pretrained(tiny_student)
    cfg = StudentConfig(model="x", epochs=4, lr=3e-3, batch_size=4, micro_batch_size=2, seed=1, precision=precision)
    weights = []
    for _ in range(2):
        model = AutoModelForCausalLM.from_pretrained(tiny_student)
        result = train(model, _examples(tok), cfg, tok.pad_token_id)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert result.steps == 12
    assert result.losses[-1]["loss"] < 0.7 * result.losses[0]["loss"]
    assert torch.equal(weights[0], weights[1])


def test_gradient_accumulation_matches_full_batch(tiny_student):
    tok = AutoTokenizer.from_pretrained(tiny_student)
    finals = []
    for micro in (4, 1):
        model = AutoModelForCausalLM.from_pretrained(tiny_student)
        cfg = StudentConfig(
            model="x", epochs=1, lr=1e-3, batch_size=4, micro_batch_size=micro, seed=0, precision="fp32"
        )
        finals.append(train(model, _examples(tok), cfg, tok.pad_token_id).losses)
    for a, b in zip(*finals):
        assert abs(a["loss"] - b["loss"]) < 1e-4


def test_resume_after_a_crash_reaches_the_uninterrupted_weights(tiny_student, tmp_path):
    from distill.students.trainer import TrainingInterrupted

    tok = AutoTokenizer.from_pretrained(tiny_student)
    cfg = StudentConfig(
        model="x", epochs=3, lr=3e-3, batch_size=4, micro_batch_size=2, seed=5, save_every=2, precision="fp32"
    )
    straight = AutoModelForCausalLM.from_pretrained(tiny_student)
    ref = train(straight, _examples(tok), cfg, tok.pad_token_id)
    ckpt = tmp_path / "ckpt"
    crashed = AutoModelForCausalLM.from_pretrained(tiny_student)
    with pytest.raises(TrainingInterrupted):
        train(crashed, _examples(tok), cfg, tok.pad_token_id, checkpoint_dir=ckpt, stop_after=5)  # mid-epoch 2
    resumed = AutoModelForCausalLM.from_pretrained(tiny_student)  # a fresh process: weights from disk only
    result = train(resumed, _examples(tok), cfg, tok.pad_token_id, checkpoint_dir=ckpt)
    assert result.steps == ref.steps == 9
    assert [x["loss"] for x in result.losses] == [x["loss"] for x in ref.losses]
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_multitask_examples_and_alpha_weighting(tiny_student):
    from distill.core.answers import Task
    from distill.students.data import build_examples, prompt_template
    from distill.students.losses import multitask_loss
    from distill.students.trainer import forward_loss

    tok = AutoTokenizer.from_pretrained(tiny_student)
    rows = [
        {"question": f"{i} + 1 =", "rationale": f"{i} plus one.", "gold": str(i + 1), "pred": str(i + 1)}
        for i in range(4)
    ]
    ex = build_examples(tok, rows, "multitask", Task("number"), 64)
    assert [e["task"] for e in ex] == ["label", "rationale"] * 4
    assert "[label] 0 + 1 =" in tok.decode(ex[0]["input_ids"]) and "[explain] 0 + 1 =" in tok.decode(ex[1]["input_ids"])
    assert "[label] " in prompt_template(tok, "multitask") and "[label]" not in prompt_template(tok)

    # One optimizer step on the whole set equals alpha * label loss + (1 - alpha) * rationale loss.
    cfg = StudentConfig(
        model="x",
        format="multitask",
        alpha=0.3,
        epochs=1,
        lr=1e-9,
        batch_size=8,
        micro_batch_size=8,
        precision="fp32",
        warmup_ratio=0.0,
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_student)
    from distill.students.data import collate

    with torch.no_grad():
        per_task = {
            t: forward_loss(model, collate([e for e in ex if e["task"] == t], tok.pad_token_id))[0]
            for t in ("label", "rationale")
        }
    expected = multitask_loss(per_task["label"], per_task["rationale"], 0.3).item()
    result = train(model, ex, cfg, tok.pad_token_id)
    assert abs(result.losses[0]["loss"] - expected) < 1e-5
