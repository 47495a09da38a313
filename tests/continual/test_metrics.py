"""Continual-learning metrics against hand-computed values."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from metaopt.continual.metrics import acc, bwt, forgetting, fwt, learning_accuracy, summarize

R = torch.tensor([[0.9, 0.1, 0.2], [0.6, 0.8, 0.3], [0.5, 0.7, 0.95]])
B = torch.tensor([0.1, 0.05, 0.2])


def test_hand_computed_matrix() -> None:
    assert acc(R) == pytest.approx((0.5 + 0.7 + 0.95) / 3)
    assert bwt(R) == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)
    assert fwt(R, B) == pytest.approx(((0.1 - 0.05) + (0.3 - 0.2)) / 2)
    # forgetting: task 0 best 0.9 (after task 0) -> 0.5; task 1 best 0.8 -> 0.7
    assert forgetting(R) == pytest.approx((0.4 + 0.1) / 2)
    assert learning_accuracy(R) == pytest.approx((0.9 + 0.8 + 0.95) / 3)
    assert summarize(R, B) == pytest.approx(
        {"acc": 0.716667, "bwt": -0.25, "fwt": 0.075, "forgetting": 0.25, "learning_acc": 0.883333},
        abs=1e-6,
    )


def test_forgetting_uses_best_earlier_accuracy_not_diagonal() -> None:
    # task 0 improves after task 1 (0.7 -> 0.9), then drops to 0.6: forgetting 0.3, BWT -0.1
    R2 = torch.tensor([[0.7, 0.0, 0.0], [0.9, 0.8, 0.0], [0.6, 0.8, 0.9]])
    assert forgetting(R2) == pytest.approx((0.3 + 0.0) / 2)
    assert bwt(R2) == pytest.approx((-0.1 + 0.0) / 2)


def test_single_task_and_bad_shapes() -> None:
    one = torch.tensor([[0.8]])
    assert (acc(one), bwt(one), fwt(one, torch.tensor([0.1])), forgetting(one)) == (
        pytest.approx(0.8),
        0.0,
        0.0,
        0.0,
    )
    with pytest.raises(ValueError, match="square"):
        acc(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="b must have shape"):
        fwt(R, torch.zeros(2))


@given(st.integers(2, 6), st.integers(0, 10_000))
def test_forgetting_bounds_minus_bwt(T: int, seed: int) -> None:
    """max_l R[l, j] >= R[j, j], hence forgetting >= -BWT, with equality when no task
    improves after it was trained."""
    R_rand = torch.rand(T, T, generator=torch.Generator().manual_seed(seed))
    assert forgetting(R_rand) >= -bwt(R_rand) - 1e-6
    decaying = torch.tril(torch.ones(T, T)) * torch.linspace(1.0, 0.5, T)[:, None]
    assert forgetting(decaying) == pytest.approx(-bwt(decaying))
