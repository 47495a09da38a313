"""LearnedOptimizer and FunctionalOptimizer in realistic training code, with the shipped
``default`` checkpoint: gradient and loss scales, schedules, param groups, long runs,
many tasks, precision and a plain single-task comparison with ``torch.optim.Adam``."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from metaopt import LearnedOptimizer
from metaopt.learned import load_pretrained


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: thread hand-off would dominate
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def default_net():
    """The shipped ``default`` checkpoint, loaded once (each optimizer gets a copy)."""
    return load_pretrained("default")


def _mlp(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).to(dtype)


def _batch(seed: int = 1, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 8, generator=g, dtype=dtype), torch.randint(0, 4, (32,), generator=g)


def _moves(model: nn.Module, start: nn.Module) -> torch.Tensor:
    """All parameters' changes since ``start``, flattened, in float64."""
    pairs = zip(model.parameters(), start.parameters(), strict=True)
    return torch.cat([(p - q).detach().flatten().double() for p, q in pairs])


def _train_scaled(net: nn.Module, scale: float, steps: int = 6) -> torch.Tensor:
    """Parameter changes after ``steps`` steps on ``scale`` x the loss, across a task
    boundary (the importance terms are then active too)."""
    model = _mlp()
    start = copy.deepcopy(model)
    opt = LearnedOptimizer(model.parameters(), lr=1e-3, net=copy.deepcopy(net))
    x, y = _batch()
    for step in range(steps):
        if step == steps // 2:
            opt.new_task()
        opt.zero_grad()
        (scale * nn.functional.cross_entropy(model(x), y)).backward()
        opt.step()
    return _moves(model, start)


@pytest.mark.parametrize("scale", [1e8, 1e11, 1e14])  # e.g. summed squared errors in dollars
def test_scaling_the_loss_up_does_not_change_the_updates(default_net, scale):
    """Adam's step does not depend on the scale of the loss (up to eps), and the learned
    rule's features are documented as ratios that no constant factor changes. Bound:
    bfloat16 anchor and importance round differently at different scales, which moves
    the updates by about 2e-4 (relative) even at scales such as 100; features clamped at
    large gradients (and a correlation whose denominator overflowed) moved them by 5e-3
    (x 1e8) to 0.13 (x 1e11)."""
    reference = _train_scaled(default_net, 1.0)
    scaled = _train_scaled(default_net, scale)
    assert torch.isfinite(scaled).all()
    deviation = float((scaled - reference).abs().max() / reference.abs().max())
    assert deviation < 1e-3, f"loss x {scale:g}: updates differ by {deviation:.2e} (relative)"
