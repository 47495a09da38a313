"""Ready-made optimizers built from the transforms, matching ``torch.optim`` numerically."""

from __future__ import annotations

from metaopt.rules.base import Scalar, Schedule, UpdateRule, chain
from metaopt.rules.transforms import (
    add_decayed_weights,
    scale_by_adam,
    scale_by_learning_rate,
    scale_by_rms,
    trace,
)

__all__ = ["adam", "adamw", "rmsprop", "sgd"]


def _weight_decay(weight_decay: Scalar) -> list[UpdateRule]:
    """Coupled L2 weight decay, omitted when it is the number 0."""
    if isinstance(weight_decay, (int, float)) and weight_decay == 0:
        return []
    return [add_decayed_weights(weight_decay)]


def sgd(
    lr: Scalar | Schedule = 1e-3,
    momentum: Scalar = 0.0,
    dampening: Scalar = 0.0,
    weight_decay: Scalar = 0.0,
    nesterov: bool = False,
) -> UpdateRule:
    """Stochastic gradient descent, equal to ``torch.optim.SGD`` with the same arguments.

    Update per element: ``-lr * d`` where ``d = g + weight_decay * p`` passed through
    SGD momentum (see :func:`metaopt.rules.trace`) when ``momentum != 0``.
    """
    if nesterov and isinstance(momentum, (int, float)) and momentum <= 0:
        raise ValueError("Nesterov momentum requires a momentum > 0")
    use_momentum = not (isinstance(momentum, (int, float)) and momentum == 0)
    parts = _weight_decay(weight_decay)
    if use_momentum:
        parts.append(trace(momentum, dampening, nesterov))
    return chain(*parts, scale_by_learning_rate(lr))


def adam(
    lr: Scalar | Schedule = 1e-3,
    betas: tuple[Scalar, Scalar] = (0.9, 0.999),
    eps: Scalar = 1e-8,
    weight_decay: Scalar = 0.0,
    amsgrad: bool = False,
    eps_root: Scalar = 0.0,
) -> UpdateRule:
    """Adam, equal to ``torch.optim.Adam`` (L2 weight decay added to the gradient).

    ``eps_root`` (default 0, as torch) adds a constant inside the square root for
    finite second derivatives; see :func:`metaopt.rules.scale_by_adam`.
    """
    b1, b2 = betas
    return chain(
        *_weight_decay(weight_decay),
        scale_by_adam(b1, b2, eps, eps_root, amsgrad),
        scale_by_learning_rate(lr),
    )


def adamw(
    lr: Scalar | Schedule = 1e-3,
    betas: tuple[Scalar, Scalar] = (0.9, 0.999),
    eps: Scalar = 1e-8,
    weight_decay: Scalar = 1e-2,
    amsgrad: bool = False,
    eps_root: Scalar = 0.0,
) -> UpdateRule:
    """AdamW (decoupled weight decay), equal to ``torch.optim.AdamW``.

    Update: ``-lr * (adam_direction + weight_decay * p)``.
    """
    b1, b2 = betas
    return chain(
        scale_by_adam(b1, b2, eps, eps_root, amsgrad),
        *_weight_decay(weight_decay),
        scale_by_learning_rate(lr),
    )


def rmsprop(
    lr: Scalar | Schedule = 1e-2,
    alpha: Scalar = 0.99,
    eps: Scalar = 1e-8,
    weight_decay: Scalar = 0.0,
    momentum: Scalar = 0.0,
    centered: bool = False,
    eps_root: Scalar = 0.0,
) -> UpdateRule:
    """RMSprop, equal to ``torch.optim.RMSprop`` with the same arguments."""
    parts = [*_weight_decay(weight_decay), scale_by_rms(alpha, eps, centered, eps_root)]
    if not (isinstance(momentum, (int, float)) and momentum == 0):
        parts.append(trace(momentum))
    return chain(*parts, scale_by_learning_rate(lr))
