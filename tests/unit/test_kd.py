"""Logit KD: the teacher's top-k log-probabilities recorded at generation, stored in the rows, and
trained on with the pure top-k losses when teacher and student share a tokenizer. Training a KD
student through the CLI is in tests/integration/test_kd_training.py."""

import hashlib
import json

import torch

from distill.students.kd import selected_kd_loss
from distill.students.losses import selected_cross_entropy, topk_forward_kl, topk_generalized_jsd
from distill.teachers.backends.base import Decoding, GenerationRequest


def test_selected_kd_loss_mixes_cross_entropy_and_the_pure_top_k_losses():
    torch.manual_seed(0)
    hidden, head = torch.randn(2, 5, 8), torch.nn.Linear(8, 11, bias=False)
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 6, 7, -100, -100]])
    kd_ids = torch.randint(0, 11, (2, 5, 3))
    kd_lps = torch.log_softmax(torch.randn(2, 5, 3), -1)
    kd_mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 0, 0, 0]], dtype=torch.bool)
    # Positions predicting a KD token: (0, 1)->2, (0, 2)->3, (1, 0)->1.
    logits = head(hidden).float()
    rows = torch.stack([logits[0, 1], logits[0, 2], logits[1, 0]])
    ids = torch.stack([kd_ids[0, 2], kd_ids[0, 3], kd_ids[1, 1]])
    lps = torch.stack([kd_lps[0, 2], kd_lps[0, 3], kd_lps[1, 1]])
    ce, n = selected_cross_entropy(hidden, head, labels)
    kl = topk_forward_kl(rows, ids, lps, temperature=2.0)
    got, m = selected_kd_loss(hidden, head, labels, kd_ids, kd_lps, kd_mask, "forward_kl", 2.0, weight=0.25)
    assert int(m) == int(n) == 5 and torch.allclose(got, 0.75 * ce + 0.25 * kl)
    jsd = topk_generalized_jsd(rows, ids, lps, beta=0.3)
    got, _ = selected_kd_loss(hidden, head, labels, kd_ids, kd_lps, kd_mask, "jsd", 1.0, beta=0.3, weight=1.0)
    assert torch.allclose(got, jsd)
    got, _ = selected_kd_loss(hidden, head, labels, kd_ids, kd_lps, kd_mask, weight=0.0)
    assert torch.allclose(got, ce)


def test_cache_keys_without_logprobs_are_unchanged():
    old = json.dumps(
        ["m", "p", {"max_new_tokens": 256, "temperature": 0.0, "top_p": 1.0, "stop": []}, 0], sort_keys=True
    )
    assert GenerationRequest("p").key("m") == hashlib.sha256(old.encode()).hexdigest()
    assert GenerationRequest("p", Decoding(logprobs=5)).key("m") != GenerationRequest("p").key("m")


def test_backend_top_k_equals_teacher_forced_log_probs(tiny_teacher):
    from distill.teachers.backends.transformers import TransformersBackend

    backend = TransformersBackend(tiny_teacher, dtype="float32", batch_size=2)
    prompts = [
        backend.chat_prompt([{"role": "user", "content": q}], "Let's think step by step.")
        for q in ("3 + 4 =", "12 + 7 - 3 =")
    ]
    out = backend.generate([GenerationRequest(p, Decoding(max_new_tokens=10, logprobs=4)) for p in prompts])
    for prompt, c in zip(prompts, out):
        assert len(c.token_ids) == c.tokens_out > 0 and len(c.topk_ids) == c.tokens_out
        assert all(len(x) == 4 for x in c.topk_ids) and c.topk_ids[0][0] == c.token_ids[0]
        assert [x[0] for x in c.topk_ids] == c.token_ids  # greedy: the generated token is the top-1
        ids = backend.tokenizer(prompt, add_special_tokens=False).input_ids
        with torch.no_grad():
            logits = backend.model(torch.tensor([ids + c.token_ids])).logits[0]
        lp = torch.log_softmax(logits[len(ids) - 1 : len(ids) - 1 + c.tokens_out].float(), -1)
        values, top = lp.topk(4, -1)
        assert top.tolist() == c.topk_ids
        assert torch.allclose(values, torch.tensor(c.topk_logprobs), atol=1e-4)
    plain = backend.generate([GenerationRequest(prompts[0], Decoding(max_new_tokens=10))])[0]
    assert plain.token_ids is None and plain.text == out[0].text
