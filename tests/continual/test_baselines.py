"""EWC and SI: penalties zero at the anchor and positive away from it, gradients, importance."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metaopt.continual.baselines import EWC, SI
from metaopt.continual.runner import TaskContext
from metaopt.continual.streams import Task


def _train(opt: torch.optim.Optimizer, model: nn.Module, x: torch.Tensor, y: torch.Tensor, n: int):
    for _ in range(n):

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(32, 4)
    y = torch.randint(0, 3, (32,))
    return model, x, y


@pytest.mark.parametrize("cls", [EWC, SI])
def test_penalty_zero_at_anchor_positive_away(cls) -> None:
    model, x, y = _setup()
    opt = cls(model.parameters(), lr=0.05, strength=10.0)
    assert opt.penalty().item() == 0.0  # no importance yet
    _train(opt, model, x, y, 20)
    if cls is EWC:
        task = Task("t", x, y, x, y, 3, 0)
        opt.end_task(TaskContext(model, task, nn.functional.cross_entropy))
    opt.new_task()
    assert opt.penalty().item() == 0.0  # anchored at the current values
    assert all((opt.state[p]["importance"] >= 0).all() for p in model.parameters())
    assert sum(opt.state[p]["importance"].sum() for p in model.parameters()) > 0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    assert opt.penalty().item() > 0


@pytest.mark.parametrize("cls", [EWC, SI])
def test_added_gradient_is_the_penalty_gradient(cls) -> None:
    model, x, y = _setup(1)
    opt = cls(model.parameters(), base=torch.optim.SGD, lr=0.1, strength=3.0)
    _train(opt, model, x, y, 10)
    opt.new_task()
    _train(opt, model, x[:8], (y[:8] + 1) % 3, 5)  # move away from the anchor
    params = list(model.parameters())
    expected = torch.autograd.grad(opt.penalty(), params)
    opt.zero_grad()
    for p in params:
        p.grad = torch.zeros_like(p)
    before = [p.detach().clone() for p in params]
    opt.step()  # SGD: p <- p - lr * (0 + penalty gradient)
    for p, b, g in zip(params, before, expected, strict=True):
        assert torch.allclose(b - p.detach(), 0.1 * g, atol=1e-6)


def test_si_path_integral_matches_loss_decrease_on_quadratic() -> None:
    """For small SGD steps on L = 0.5 * a * w^2, the path integral -sum g dw ~ L0 - L1."""
    w = nn.Parameter(torch.tensor([2.0, -1.0]))
    a = torch.tensor([1.0, 3.0])
    opt = SI([w], base=torch.optim.SGD, lr=1e-3, strength=1.0)
    for _ in range(200):
        opt.zero_grad()
        (0.5 * a * w**2).sum().backward()
        opt.step()
    w0 = torch.tensor([2.0, -1.0])
    decrease = 0.5 * a * (w0**2 - w.detach() ** 2)
    assert torch.allclose(opt.state[w]["path"], decrease, rtol=2e-2)
    opt.new_task()
    delta = w.detach() - w0
    assert torch.allclose(opt.state[w]["importance"], decrease / (delta**2 + 0.1), rtol=2e-2)
    assert torch.equal(opt.state[w]["path"], torch.zeros(2))


def test_ewc_fallback_without_end_task_and_state_dict() -> None:
    model, x, y = _setup(2)
    opt = EWC(model.parameters(), lr=0.01, strength=1.0)
    _train(opt, model, x, y, 4)
    grad_sq = [opt.state[p]["grad_sq"].clone() / 4 for p in model.parameters()]
    opt.new_task()
    for p, g in zip(model.parameters(), grad_sq, strict=True):
        assert torch.allclose(opt.state[p]["importance"], g)
    state = opt.state_dict()
    clone = EWC(model.parameters(), lr=0.01, strength=1.0)
    clone.load_state_dict(state)
    assert clone.penalty().item() == pytest.approx(opt.penalty().item())
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="strength"):
            SI(model.parameters(), strength=bad)
        with pytest.raises(ValueError, match="strength"):
            EWC(model.parameters(), strength=bad)
    with pytest.raises(ValueError, match="gamma"):
        EWC(model.parameters(), gamma=float("nan"))
    with pytest.raises(ValueError, match="xi"):
        SI(model.parameters(), xi=float("inf"))


@pytest.mark.parametrize("cls", [EWC, SI])
def test_stronger_penalty_stays_closer_to_the_anchor(cls) -> None:
    """Training a conflicting second task drifts less from the first task's solution as the
    strength grows (strength 0 is the base optimizer)."""
    drift = []
    for strength in (0.0, 1e2, 1e4):
        model, x, y = _setup(3)
        opt = cls(model.parameters(), lr=0.02, strength=strength)
        _train(opt, model, x, y, 30)
        if cls is EWC:
            opt.end_task(TaskContext(model, Task("a", x, y, x, y, 3, 0), None))
        opt.new_task()
        anchor = [p.detach().clone() for p in model.parameters()]
        _train(opt, model, x, (y + 1) % 3, 30)
        drift.append(
            sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=True))
        )
    assert drift[0] > drift[1] > drift[2]
