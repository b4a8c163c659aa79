"""Trainer pieces on their own: the LR schedule, length-grouped batches, prompt masking. Training
runs are in tests/integration/test_training.py."""

from transformers import AutoTokenizer

from distill.students.data import length_grouped_batches, tokenize_example
from distill.students.trainer import lr_at


def test_lr_schedule_shapes():
    assert lr_at(0, 100, 10, "cosine") == 0.1
    assert lr_at(9, 100, 10, "cosine") == 1.0
    assert abs(lr_at(10, 100, 10, "cosine") - 1.0) < 1e-9
    assert abs(lr_at(55, 100, 10, "linear") - 0.5) < 1e-9
    assert lr_at(99, 100, 0, "constant") == 1.0


def test_length_grouped_batches_cover_every_index_once():
    lengths = [5, 50, 7, 49, 6, 48, 8, 47, 9]
    batches = length_grouped_batches(lengths, 2, seed=3)
    assert sorted(i for b in batches for i in b) == list(range(9))
    assert batches == length_grouped_batches(lengths, 2, seed=3)


def test_prompt_tokens_are_masked(tiny_student):
    tok = AutoTokenizer.from_pretrained(tiny_student)
    ex = tokenize_example(tok, "Q: 1 + 2 =", " 3", 64)
    n_prompt = len(tok("Q: 1 + 2 =", add_special_tokens=False).input_ids)
    assert ex["labels"][:n_prompt] == [-100] * n_prompt
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:] and ex["input_ids"][-1] == tok.eos_token_id
