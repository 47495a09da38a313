"""Adversarial contract tests of ``metaopt.continual``: what a user running it on their own
data and machines relies on (hand-computed values, bad input, resumed and merged runs)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from metaopt.continual.baselines import EWC, SI
from metaopt.continual.runner import TaskContext
from metaopt.continual.streams import Task

# --------------------------------------------------------------------------- baselines


def _quadratic_steps(opt: torch.optim.Optimizer, w: torch.Tensor, target: torch.Tensor, n: int):
    """``n`` steps on ``sum (w - target)^2`` through the optimizer's closure."""
    for _ in range(n):

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = ((w - target) ** 2).sum()
            loss.backward()
            return loss

        opt.step(closure)


@pytest.mark.parametrize("cls", [EWC, SI])
def test_state_dict_roundtrip_keeps_the_penalty_active(cls: type) -> None:
    """A regulariser restored from ``state_dict`` (resuming a run) must take the same steps
    as the original: the penalty of the consolidated tasks is still applied."""
    w = nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    opt = cls([w], base=torch.optim.SGD, lr=0.1, strength=5.0)
    _quadratic_steps(opt, w, torch.tensor([3.0, 0.0, -1.0]), 5)
    opt.new_task()  # fallback importance (EWC) / path integral (SI), anchor here
    assert opt.penalty().item() == 0.0
    state = copy.deepcopy(opt.state_dict())

    # also a state dict written before the task counters were saved with it
    legacy = {k: v for k, v in copy.deepcopy(state).items() if k != "counters"}
    copies = [nn.Parameter(w.detach().clone()) for _ in range(2)]
    restored = []
    for w_copy, saved in zip(copies, (state, legacy), strict=True):
        restored.append(cls([w_copy], base=torch.optim.SGD, lr=0.1, strength=5.0))
        restored[-1].load_state_dict(saved)
    second = torch.tensor([-4.0, 4.0, 2.0])
    _quadratic_steps(opt, w, second, 3)
    for w_copy, other in zip(copies, restored, strict=True):
        _quadratic_steps(other, w_copy, second, 3)
        assert torch.allclose(w_copy, w), "the restored optimizer no longer applies the penalty"


@pytest.mark.parametrize("cls", [EWC, SI])
def test_parameter_groups_are_accepted_with_their_own_options(cls: type) -> None:
    """The docstrings promise "parameters or groups": a frozen group (lr 0) stays put."""
    a = nn.Parameter(torch.ones(2))
    b = nn.Parameter(torch.ones(2))
    opt = cls([{"params": [a]}, {"params": [b], "lr": 0.0}], base=torch.optim.SGD, lr=0.5)
    _quadratic_steps(opt, a, torch.zeros(2), 1)
    assert torch.allclose(a.detach(), torch.zeros(2))  # 1 - 0.5 * 2 * 1
    ((b - 3.0) ** 2).sum().backward()
    opt.step()
    assert torch.equal(b.detach(), torch.ones(2))
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.0]


def _ewc_task(x: torch.Tensor) -> Task:
    return Task("t", x, torch.zeros(len(x), dtype=torch.long), x, x[:, 0, 0, 0].long(), 2, 0)


def test_ewc_fisher_and_online_accumulation_by_hand() -> None:
    """At zero weights a 2-class linear model predicts (1/2, 1/2), so whatever label is
    sampled, d log p / d bias = +-1/2 and d log p / d w = +-x/2: the Fisher is 1/4 for
    the biases and mean(x^2)/4 for the weights, and online EWC keeps gamma * F_1 + F_2."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(1, 2))
    nn.init.zeros_(model[1].weight)
    nn.init.zeros_(model[1].bias)
    weight, bias = model[1].weight, model[1].bias
    opt = EWC(model.parameters(), base=torch.optim.SGD, lr=0.0, strength=4.0, gamma=0.5)
    x1 = torch.tensor([1.0, 2.0, 3.0]).reshape(3, 1, 1, 1)
    x2 = torch.tensor([2.0, 4.0]).reshape(2, 1, 1, 1)
    loss = nn.functional.cross_entropy
    opt.end_task(TaskContext(model, _ewc_task(x1), loss))
    opt.new_task()
    f1_w = torch.full((2, 1), (1 + 4 + 9) / 3 / 4)
    assert torch.allclose(opt.state[weight]["importance"], f1_w)
    assert torch.allclose(opt.state[bias]["importance"], torch.full((2,), 0.25))
    opt.end_task(TaskContext(model, _ewc_task(x2), loss))
    opt.new_task()
    f2_w = torch.full((2, 1), (4 + 16) / 2 / 4)
    assert torch.allclose(opt.state[weight]["importance"], 0.5 * f1_w + f2_w)
    assert torch.allclose(opt.state[bias]["importance"], torch.full((2,), 0.5 * 0.25 + 0.25))
    with torch.no_grad():
        weight.add_(torch.tensor([[1.0], [-2.0]]))
    expected = 0.5 * 4.0 * ((0.5 * f1_w + f2_w) * torch.tensor([[1.0], [4.0]])).sum()
    assert opt.penalty().item() == pytest.approx(expected.item())
