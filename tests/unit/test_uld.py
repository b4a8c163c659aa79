"""Cross-tokenizer logit KD (ULD, Boizard et al. 2024): the pure sorted-probability loss on
hand-computed cases, the index alignment of the teacher's top-k to the student's own tokens, and the
loss mixed with cross-entropy. Training through the pipeline is in tests/integration/test_uld_training.py."""

import math

import pytest
import torch
from tiny import build_model, build_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.config import KDSettings
from distill.core.answers import Task
from distill.students.data import build_examples, collate, pack_examples, tokenize_example, uld_example
from distill.students.kd import selected_kd_loss
from distill.students.losses import selected_cross_entropy, uld_loss
from distill.students.trainer import forward_loss

TRIGGER = "Let's think step by step."
RATIONALE = "First 12 + 7 = 19. Then 19 - 3 = 16."


def test_identical_distributions_give_zero():
    torch.manual_seed(0)
    logits = torch.randn(3, 7)
    full = torch.log_softmax(logits, -1)
    assert uld_loss(logits, full).item() == pytest.approx(0.0, abs=1e-6)
    # The teacher stored only its top-3 (in descending order, as the backend writes them).
    assert uld_loss(logits, full.topk(3, -1).values).item() == pytest.approx(0.0, abs=1e-6)
    assert uld_loss(logits, full.topk(3, -1).values, temperature=2.0).item() == pytest.approx(0.0, abs=1e-6)


def test_a_permuted_vocabulary_gives_zero():
    torch.manual_seed(1)
    teacher_logits = torch.randn(4, 9)
    student_logits = teacher_logits[:, torch.randperm(9)]  # the same distribution over other token ids
    stored = torch.log_softmax(teacher_logits, -1)[:, torch.randperm(9)]  # stored in any order
    assert uld_loss(student_logits, stored).item() == pytest.approx(0.0, abs=1e-6)
    # The student's vocabulary may also be larger: tokens it never uses change nothing.
    wider = torch.cat([student_logits, torch.full((4, 5), -1e4)], dim=-1)[:, torch.randperm(14)]
    assert uld_loss(wider, stored).item() == pytest.approx(0.0, abs=1e-6)


def test_hand_computed_values():
    # Student p = [.1, .3, .2, .4] → sorted [.4, .3, .2, .1]; teacher uniform: |.15| + |.05| + |.05| + |.15|.
    student = torch.log(torch.tensor([[1.0, 3.0, 2.0, 4.0]]))
    uniform = torch.log(torch.full((1, 4), 0.25))
    assert uld_loss(student, uniform).item() == pytest.approx(0.4, abs=1e-6)
    # Teacher stored top-2 log [.6, .2] → renormalised [3/4, 1/4]; student top-2 [4, 3] → [4/7, 3/7].
    # One position at 2·(3/4 − 4/7) = 5/14 and one identical one at 0: mean 5/28.
    two = torch.log(torch.tensor([[0.6, 0.2], [0.4, 0.3]]))
    students = torch.log(torch.tensor([[1.0, 3.0, 2.0, 4.0], [4.0, 3.0, 2.0, 1.0]]))
    assert uld_loss(students, two).item() == pytest.approx(5 / 28, abs=1e-6)
    # Temperature 2 takes square roots: student [2, √3]/(2 + √3), teacher [√3, 1]/(√3 + 1).
    expected = 2 * abs(2 / (2 + math.sqrt(3)) - math.sqrt(3) / (math.sqrt(3) + 1))
    assert uld_loss(students[:1], two[:1], temperature=2.0).item() == pytest.approx(expected, abs=1e-6)
    # A student vocabulary (2) smaller than the teacher's k (3) is padded with a zero probability.
    small = torch.log(torch.tensor([[1.0, 3.0]]))
    three = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    assert uld_loss(small, three).item() == pytest.approx(0.25 + 0.05 + 0.2, abs=1e-6)


def test_gradient_flows_to_the_student_logits():
    # p = [1/3, 2/3] vs teacher [3/4, 1/4]: L = (3/4 − p1) + (p0 − 1/4), dp1/dz1 = p0·p1 = 2/9,
    # so dL/dz = [4/9, −4/9]: raise the top token, lower the other.
    z = torch.tensor([[0.0, math.log(2.0)]], requires_grad=True)
    loss = uld_loss(z, torch.log(torch.tensor([[0.75, 0.25]])))
    assert loss.item() == pytest.approx(1 / 6, abs=1e-6)
    loss.backward()
    assert torch.allclose(z.grad, torch.tensor([[4 / 9, -4 / 9]]), atol=1e-6)


def test_selected_kd_loss_mixes_cross_entropy_and_uld_without_teacher_ids():
    torch.manual_seed(0)
    hidden, head = torch.randn(2, 5, 8), torch.nn.Linear(8, 11, bias=False)
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 6, 7, -100, -100]])
    kd_lps = torch.log_softmax(torch.randn(2, 5, 3), -1)
    kd_mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 0, 0, 0]], dtype=torch.bool)
    logits = head(hidden).float()
    rows = torch.stack([logits[0, 1], logits[0, 2], logits[1, 0]])  # position t predicts token t + 1
    lps = torch.stack([kd_lps[0, 2], kd_lps[0, 3], kd_lps[1, 1]])
    ce, _ = selected_cross_entropy(hidden, head, labels)
    parts: dict = {}
    got, n = selected_kd_loss(hidden, head, labels, None, kd_lps, kd_mask, "uld", 2.0, weight=0.25, parts=parts)
    expected = uld_loss(rows, lps, temperature=2.0)
    assert int(n) == 5 and torch.allclose(got, 0.75 * ce + 0.25 * expected)
    assert torch.allclose(parts["kd"], expected)


def _row(teacher_tokens: int) -> dict:
    # Distinct, recognisable log-probabilities per teacher token j: [-j, -j - 1, -j - 2] / 10.
    return {
        "question": "12 + 7 - 3 =",
        "rationale": f" {RATIONALE}\n",
        "gold": "16",
        "pred": "16",
        "teacher_token_ids": list(range(teacher_tokens)),
        "teacher_topk_ids": [[j, j + 1, j + 2] for j in range(teacher_tokens)],
        "teacher_topk_logprobs": [[-j / 10, -(j + 1) / 10, -(j + 2) / 10] for j in range(teacher_tokens)],
    }


@pytest.fixture(scope="module")
def two_tokenizers(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("t400")), build_tokenizer(tmp_path_factory.mktemp("t300"), 300)


def test_uld_example_aligns_teacher_tokens_to_the_students_own_by_index(two_tokenizers):
    big, small = two_tokenizers
    n_big = len(big(" " + RATIONALE, add_special_tokens=False).input_ids)
    n_small = len(small(" " + RATIONALE, add_special_tokens=False).input_ids)
    assert (n_big, n_small) == (14, 20)  # the same text, two tokenizations
    task = Task("number")
    prompt = "Question: 12 + 7 - 3 =\nAnswer: "
    target = f"{TRIGGER} {RATIONALE}\nTherefore, the answer is 16."
    for student, n_student, n_teacher in ((small, n_small, n_big), (big, n_big, n_small)):
        ex = uld_example(student, prompt, _row(n_teacher), task, 256, TRIGGER)
        plain = tokenize_example(student, prompt, target, 256)  # format rationale: the student's own tokens
        assert ex["input_ids"] == plain["input_ids"] and ex["labels"] == plain["labels"]
        start = len(student(prompt + TRIGGER, add_special_tokens=False).input_ids)
        n = min(n_student, n_teacher)  # truncated to the shorter of the two
        assert ex["kd_pos"] == list(range(start, start + n)) and "kd_ids" not in ex
        assert ex["kd_logprobs"] == _row(n_teacher)["teacher_topk_logprobs"][:n]
        if n == n_student:
            assert student.decode(ex["input_ids"][start : start + n]) == " " + RATIONALE
    # max_length cuts the aligned positions with the tokens.
    start = len(small(prompt + TRIGGER, add_special_tokens=False).input_ids)
    cut = uld_example(small, prompt, _row(n_big), task, start + 4, TRIGGER)
    assert cut["kd_pos"] == list(range(start, start + 4)) and len(cut["kd_logprobs"]) == 4


def test_build_examples_picks_uld_and_skips_rows_without_teacher_tokens(two_tokenizers):
    _, small = two_tokenizers
    rows = [_row(16), {**_row(16), "teacher_token_ids": None, "teacher_topk_logprobs": None}]
    uld = build_examples(small, rows, "kd", Task("number"), 256, TRIGGER, kd_loss="uld")
    kd = build_examples(small, rows, "kd", Task("number"), 256, TRIGGER)
    assert len(uld) == len(kd) == 1 and uld[0]["task"] == "kd"
    assert "kd_ids" not in uld[0] and len(uld[0]["kd_pos"]) == 16
    assert kd[0]["kd_ids"][0] == [0, 1, 2]  # the shared-tokenizer example is unchanged: teacher tokens
    batch = collate(uld, small.pad_token_id)
    assert "kd_ids" not in batch and batch["kd_logprobs"].shape == (1, len(uld[0]["input_ids"]), 3)
    assert batch["kd_mask"].sum().item() == 16


def test_packed_uld_loss_equals_unpacked(tmp_path):
    folder = build_model(tmp_path / "s300", "llama", seed=3, vocab_size=300)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert len(tok) == 300
    rows = [
        {**_row(n), "question": f"{i} + {i} =", "rationale": f"{i} + {i} = {2 * i}.", "pred": str(2 * i)}
        for i, n in enumerate([3, 9, 5, 12])
    ]
    examples = build_examples(tok, rows, "kd", Task("number"), 128, TRIGGER, kd_loss="uld")
    packed = collate(pack_examples(examples, 128), tok.pad_token_id)
    plain = collate(examples, tok.pad_token_id)
    assert packed["input_ids"].shape[0] < len(examples) and "kd_ids" not in packed
    kd = KDSettings(loss="uld", weight=0.5)
    with torch.no_grad():
        loss_p, n_p = forward_loss(model, packed, kd)
        loss_u, n_u = forward_loss(model, plain, kd)
    assert int(n_p) == int(n_u) and torch.allclose(loss_p, loss_u, atol=1e-6)
