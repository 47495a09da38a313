"""Learning-rate schedules: pure functions of the step count (a 0-d tensor from 0).

Use them wherever a rule takes a learning rate (``adam(lr=cosine_decay(1e-3, 1000))``);
they are tensor expressions, so ``torch.compile`` does not recompile as the count grows.
For :class:`metaopt.FunctionalOptimizer` use ``torch.optim.lr_scheduler`` instead.
"""

from __future__ import annotations

import math

import torch

from metaopt.rules.base import Schedule

__all__ = ["constant", "cosine_decay", "linear_warmup", "step_decay"]


def _check(steps: int, name: str) -> None:
    if not isinstance(steps, int) or steps <= 0:
        raise ValueError(f"{name} must be a positive int, got {steps!r}")


def constant(value: float) -> Schedule:
    """``value`` at every step."""
    return lambda count: torch.full_like(count, value, dtype=torch.float32)


def linear_warmup(peak: float, warmup_steps: int, start: float = 0.0) -> Schedule:
    """From ``start`` to ``peak`` linearly over ``warmup_steps`` steps, then ``peak``."""
    _check(warmup_steps, "warmup_steps")

    def schedule(count: torch.Tensor) -> torch.Tensor:
        frac = torch.clamp(count.float() / warmup_steps, max=1.0)
        return start + (peak - start) * frac

    return schedule


def cosine_decay(init: float, decay_steps: int, final: float = 0.0) -> Schedule:
    """``final + (init - final) * (1 + cos(pi * t / decay_steps)) / 2``, then ``final``.

    Same values as ``torch.optim.lr_scheduler.CosineAnnealingLR`` with
    ``T_max=decay_steps, eta_min=final`` for ``t <= decay_steps``.
    """
    _check(decay_steps, "decay_steps")

    def schedule(count: torch.Tensor) -> torch.Tensor:
        frac = torch.clamp(count.float() / decay_steps, max=1.0)
        return final + (init - final) * 0.5 * (1 + torch.cos(math.pi * frac))

    return schedule


def step_decay(init: float, step_size: int, gamma: float = 0.1) -> Schedule:
    """``init * gamma ** (t // step_size)``, as ``torch.optim.lr_scheduler.StepLR``."""
    _check(step_size, "step_size")
    return lambda count: init * gamma ** torch.div(count.float(), step_size, rounding_mode="floor")
