import math

import torch

from distill.students.losses import completion_cross_entropy, selected_cross_entropy


def test_completion_ce_hand_computed():
    # vocab 2, one sequence of 3 tokens; only the last target counts (prompt is masked).
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [5.0, 5.0]]])
    labels = torch.tensor([[-100, -100, 0]])
    loss, n = completion_cross_entropy(logits, labels)
    # position 1 predicts token 0 with p = 3/4
    assert n.item() == 1
    assert abs(loss.item() - (-math.log(0.75))) < 1e-6


def test_completion_ce_averages_over_target_tokens_only():
    logits = torch.zeros(2, 4, 5)
    labels = torch.tensor([[-100, 1, 2, -100], [-100, -100, -100, 3]])
    loss, n = completion_cross_entropy(logits, labels)
    assert n.item() == 3
    assert abs(loss.item() - math.log(5)) < 1e-6


def test_selected_cross_entropy_equals_full_logits():
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 8)
    head = torch.nn.Linear(8, 11, bias=False)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, 3, 4]])
    full, n_full = completion_cross_entropy(head(hidden), labels)
    sel, n_sel = selected_cross_entropy(hidden, head, labels)
    assert n_full.item() == n_sel.item() == 6
    assert torch.allclose(full, sel, atol=1e-6)


def test_multitask_weights_hand_computed():
    from distill.students.losses import multitask_loss

    assert abs(multitask_loss(torch.tensor(2.0), torch.tensor(4.0), 0.25).item() - 3.5) < 1e-6


def test_topk_forward_kl_hand_computed():
    from distill.students.losses import topk_forward_kl

    # Teacher puts 0.75/0.25 on tokens 0/1; student logits give p(0)=p(1)=1/2 on that support.
    student = torch.tensor([[0.0, 0.0, 5.0]])
    ids = torch.tensor([[0, 1]])
    logp = torch.tensor([[math.log(0.75), math.log(0.25)]])
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert abs(topk_forward_kl(student, ids, logp).item() - expected) < 1e-6
    # T = 2: both sides are tempered and the result scaled by T².
    pt = torch.softmax(torch.log(torch.tensor([0.75, 0.25])) / 2, 0)
    expected2 = 4 * float((pt * (pt.log() - math.log(0.5))).sum())
    assert abs(topk_forward_kl(student, ids, logp, temperature=2.0).item() - expected2) < 1e-5


def test_generalized_jsd_hand_computed_and_limits():
    from distill.students.losses import topk_forward_kl, topk_generalized_jsd

    student = torch.tensor([[math.log(0.5), math.log(0.5)]])
    ids = torch.tensor([[0, 1]])
    logp = torch.tensor([[math.log(0.9), math.log(0.1)]])
    p, q = torch.tensor([0.9, 0.1]), torch.tensor([0.5, 0.5])
    m = 0.5 * p + 0.5 * q
    expected = 0.5 * float((p * (p / m).log()).sum()) + 0.5 * float((q * (q / m).log()).sum())
    assert abs(topk_generalized_jsd(student, ids, logp, beta=0.5).item() - expected) < 1e-6
    assert (
        abs(topk_generalized_jsd(student, ids, logp, beta=0.0).item() - topk_forward_kl(student, ids, logp).item())
        < 1e-6
    )
    reverse = float((q * (q / p).log()).sum())
    assert abs(topk_generalized_jsd(student, ids, logp, beta=1.0).item() - reverse) < 1e-6
    assert topk_generalized_jsd(logp.clone(), ids, logp, beta=0.5).item() < 1e-6  # identical → 0
