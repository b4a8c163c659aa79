import math

import torch

from students.losses import completion_cross_entropy, selected_cross_entropy


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
