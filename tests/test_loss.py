"""Reranker losses and group metrics against hand computations (rows group-major, positive first)."""
import math

import pytest
import torch

from megarank.training.loss import LOSSES, group_metrics, listwise_loss, pointwise_loss

# Two groups of 3 passages: [positive, negative, negative].
SCORES = [[2.0, 1.0, 0.5], [-1.0, 0.25, 3.0]]


def _flat(rows, column=True):
    t = torch.tensor(rows, dtype=torch.float32).reshape(-1)
    return t.unsqueeze(1) if column else t  # the model returns [G*n, 1]


def _listwise_by_hand(rows):
    losses = [-(row[0] - math.log(sum(math.exp(s) for s in row))) for row in rows]
    return sum(losses) / len(losses)


def _bce(logit, label):
    p = 1.0 / (1.0 + math.exp(-logit))
    return -(label * math.log(p) + (1 - label) * math.log(1 - p))


@pytest.mark.parametrize("column", [True, False], ids=["[G*n,1]", "[G*n]"])
def test_listwise_loss_is_softmax_cross_entropy_with_the_positive_as_target(column):
    loss = listwise_loss(_flat(SCORES, column), group_size=3)
    assert loss.item() == pytest.approx(_listwise_by_hand(SCORES), rel=1e-6)
    # the first group by hand, digit by digit: -log(e^2 / (e^2 + e^1 + e^0.5))
    assert listwise_loss(_flat(SCORES[:1]), 3).item() == pytest.approx(0.4643688, abs=1e-6)


def test_listwise_gradient_is_softmax_minus_target_over_groups():
    scores = _flat(SCORES).requires_grad_(True)
    listwise_loss(scores, 3).backward()
    expected = torch.softmax(torch.tensor(SCORES), dim=1)
    expected[:, 0] -= 1.0
    torch.testing.assert_close(scores.grad.reshape(2, 3), expected / 2, rtol=1e-6, atol=1e-7)


def test_listwise_loss_of_equal_scores_is_log_group_size_and_does_not_depend_on_a_shift():
    assert listwise_loss(torch.zeros(10, 1), 5).item() == pytest.approx(math.log(5), rel=1e-6)
    shifted = [[s + 100.0 for s in row] for row in SCORES]
    assert listwise_loss(_flat(shifted), 3).item() == pytest.approx(_listwise_by_hand(SCORES), rel=1e-5)


def test_pointwise_loss_is_bce_with_label_one_for_the_positive_only():
    loss = pointwise_loss(_flat(SCORES), group_size=3)
    by_hand = [_bce(s, 1.0 if i == 0 else 0.0) for row in SCORES for i, s in enumerate(row)]
    assert loss.item() == pytest.approx(sum(by_hand) / len(by_hand), rel=1e-6)
    assert LOSSES["pointwise"] is pointwise_loss and LOSSES["listwise"] is listwise_loss


def test_rows_not_divisible_by_the_group_size_are_rejected():
    with pytest.raises(RuntimeError):
        listwise_loss(torch.zeros(7, 1), 3)


def test_group_metrics_accuracy_and_mrr_count_ties_against_the_positive():
    rows = [
        [3.0, 1.0, 2.0, 0.0],  # positive first: rank 1
        [1.0, 2.0, 0.0, 0.5],  # one negative above: rank 2
        [1.0, 1.0, 0.0, 0.0],  # tied with one negative: counts against -> rank 2
        [0.0, 0.0, 0.0, 0.0],  # tied with all three: rank 4
        [0.0, 1.0, 2.0, 3.0],  # last: rank 4
    ]
    m = group_metrics(_flat(rows), group_size=4)
    ranks = [1, 2, 2, 4, 4]
    assert m["acc"].item() == pytest.approx(1 / 5)
    assert m["mrr"].item() == pytest.approx(sum(1 / r for r in ranks) / 5, rel=1e-6)


def test_group_metrics_need_no_grad_and_accept_a_flat_vector():
    scores = _flat(SCORES, column=False).requires_grad_(True)
    m = group_metrics(scores, 3)
    assert not m["acc"].requires_grad and not m["mrr"].requires_grad
    # group 1: positive first (rank 1); group 2: positive last (rank 3)
    assert m["acc"].item() == pytest.approx(0.5)
    assert m["mrr"].item() == pytest.approx((1 + 1 / 3) / 2)
