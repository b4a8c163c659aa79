"""Packing: several examples per row with no attention across them gives the unpacked logits and loss.
Training with packing is in tests/integration/test_packing_training.py."""

import random

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.config import KDSettings
from distill.students.data import collate, pack_examples, tokenize_example
from distill.students.trainer import forward_loss


def _examples(tok, with_kd=False):
    rng = random.Random(0)
    out = []
    for i, extra in enumerate([0, 6, 1, 9, 3, 12]):
        ex = tokenize_example(tok, f"Q: {i} +{' 1' * extra} =", f" Therefore, the answer is {i + extra}.", 96)
        if with_kd:  # teacher top-3 at every target position but the last
            pos = [p for p, y in enumerate(ex["labels"]) if y != -100][:-1]
            ex["kd_pos"] = pos
            ex["kd_ids"] = [[rng.randrange(len(tok)) for _ in range(3)] for _ in pos]
            ex["kd_logprobs"] = [sorted((-rng.random() * 3 for _ in range(3)), reverse=True) for _ in pos]
        out.append(ex)
    return out


def test_pack_examples_fills_rows_and_restarts_positions(tiny_student):
    tok = AutoTokenizer.from_pretrained(tiny_student)
    examples = _examples(tok)
    rows = pack_examples(examples, 48)
    assert len(rows) < len(examples) and all(len(r["input_ids"]) <= 48 for r in rows)
    assert sum(len(r["input_ids"]) for r in rows) == sum(len(e["input_ids"]) for e in examples)
    segments = []
    for r in rows:
        starts = [i for i, p in enumerate(r["position_ids"]) if p == 0] + [len(r["input_ids"])]
        segments += [r["input_ids"][a:b] for a, b in zip(starts, starts[1:])]
        assert all(r["labels"][s] == -100 for s in starts[:-1])
    assert sorted(segments) == sorted(e["input_ids"] for e in examples)


def test_packed_logits_and_losses_equal_unpacked(tiny_student):
    tok = AutoTokenizer.from_pretrained(tiny_student)
    model = AutoModelForCausalLM.from_pretrained(tiny_student).eval()
    examples = _examples(tok, with_kd=True)
    packed = collate(pack_examples(examples, 48), tok.pad_token_id)
    assert "attention_mask" not in packed and packed["input_ids"].shape[0] < len(examples)
    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
        rows = pack_examples(examples, 48)
        for r, row in enumerate(rows):
            starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
            for a, b in zip(starts, starts[1:]):
                alone = model(input_ids=torch.tensor([row["input_ids"][a:b]])).logits[0]
                assert torch.allclose(logits[r, a:b], alone, atol=1e-5)
        plain = collate(examples, tok.pad_token_id)
        for kd in (None, KDSettings(loss="jsd", beta=0.3, temperature=2.0, weight=0.5)):
            loss_p, n_p = forward_loss(model, packed, kd)
            loss_u, n_u = forward_loss(model, plain, kd)
            assert int(n_p) == int(n_u) and torch.allclose(loss_p, loss_u, atol=1e-6)
    assert packed["n_tokens"] == int(plain["attention_mask"].sum())
