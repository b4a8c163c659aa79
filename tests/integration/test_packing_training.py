"""Training with packing: several examples per row, the loss goes down and only real tokens count."""

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.config import StudentConfig
from distill.students.data import tokenize_example
from distill.students.trainer import train

pytestmark = pytest.mark.integration


def _examples(tok):
    return [
        tokenize_example(tok, f"Q: {i} +{' 1' * extra} =", f" Therefore, the answer is {i + extra}.", 96)
        for i, extra in enumerate([0, 6, 1, 9, 3, 12])
    ]


def test_training_with_packing_lowers_loss_and_counts_real_tokens(tiny_student):
    tok = AutoTokenizer.from_pretrained(tiny_student)
    model = AutoModelForCausalLM.from_pretrained(tiny_student)
    examples = _examples(tok)
    cfg = StudentConfig(model="x", epochs=4, lr=3e-3, batch_size=6, micro_batch_size=6, max_length=64, packing=True)
    result = train(model, examples, cfg, tok.pad_token_id)
    assert result.losses[-1]["loss"] < result.losses[0]["loss"]
    assert result.tokens == 4 * sum(len(e["input_ids"]) for e in examples)
