"""Ready-made optimizers built from the transforms, matching ``torch.optim`` numerically."""

from __future__ import annotations

from typing import Any

from metaopt.rules.base import Scalar, Schedule, State, UpdateRule, chain, identity
from metaopt.rules.transforms import (
    add_decayed_weights,
    scale_by_adam,
    scale_by_learning_rate,
    scale_by_rms,
    trace,
)
from metaopt.tree import named_leaves

__all__ = ["adam", "adamw", "rmsprop", "sgd"]


def _is_zero(value: Scalar) -> bool:
    return isinstance(value, (int, float)) and value == 0


def _decayed(rule: UpdateRule, weight_decay: Scalar, *, after: bool = False) -> UpdateRule:
    """``rule`` applied to ``g + weight_decay * p`` (coupled L2 weight decay), or with
    ``after=True`` ``rule``'s output plus ``weight_decay * p`` (decoupled, AdamW); just
    ``rule`` when ``weight_decay`` is the number 0.

    The result keeps ``rule``'s state layout whatever ``weight_decay`` is, so a
    ``FunctionalOptimizer`` whose ``group["weight_decay"]`` changes between steps (to or
    from 0 included) keeps the state, as ``torch.optim`` does. (A stateless
    :func:`add_decayed_weights` of its own in the chain would shift the other rules'
    places in the chain's state tuple, i.e. the state's layout and its
    ``optimizer.state`` keys.)
    """
    if _is_zero(weight_decay):
        return rule
    decay = add_decayed_weights(weight_decay)

    def update(grads: Any, state: State, params: Any | None = None) -> tuple[Any, State]:
        stateless = {key: () for key, _ in named_leaves(grads)}
        if after:
            updates, new_state = rule.update(grads, state, params)
            return decay.update(updates, stateless, params)[0], new_state
        return rule.update(decay.update(grads, stateless, params)[0], state, params)

    return UpdateRule(rule.init, update)


def sgd(
    lr: Scalar | Schedule = 1e-3,
    momentum: Scalar = 0.0,
    dampening: Scalar = 0.0,
    weight_decay: Scalar = 0.0,
    nesterov: bool = False,
) -> UpdateRule:
    """Stochastic gradient descent, equal to ``torch.optim.SGD`` with the same arguments.

    Update per element: ``-lr * d`` where ``d = g + weight_decay * p`` passed through
    SGD momentum (see :func:`metaopt.rules.trace`) when ``momentum != 0``. The state's
    layout does not depend on ``weight_decay`` (see :func:`adam`).
    """
    if nesterov and isinstance(momentum, (int, float)) and momentum <= 0:
        raise ValueError("Nesterov momentum requires a momentum > 0")
    # momentum 0: a stateless slot where the momentum would be, so a momentum changed
    # between steps keeps its buffer (unused while 0), as torch.optim.SGD does
    direction = identity() if _is_zero(momentum) else trace(momentum, dampening, nesterov)
    return chain(_decayed(direction, weight_decay), scale_by_learning_rate(lr))


def _pair(betas: tuple[Scalar, Scalar]) -> tuple[Scalar, Scalar]:
    """``betas`` as ``(b1, b2)``; anything but two values is a ``ValueError`` that says so."""
    try:
        b1, b2 = betas
    except (TypeError, ValueError):
        raise ValueError(f"betas must be two values (b1, b2), got {betas!r}") from None
    return b1, b2


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

    The weight decay is applied inside the Adam transform's slot of the chain, so the
    leaf state is ``(AdamState, ())`` whatever ``weight_decay`` is (0 or not): a
    ``weight_decay`` changed between steps keeps the moments, as in ``torch.optim.Adam``.
    """
    b1, b2 = _pair(betas)
    return chain(
        _decayed(scale_by_adam(b1, b2, eps, eps_root, amsgrad), weight_decay),
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

    Update: ``-lr * (adam_direction + weight_decay * p)``. The state's layout does not
    depend on ``weight_decay`` (see :func:`adam`).
    """
    b1, b2 = _pair(betas)
    return chain(
        _decayed(scale_by_adam(b1, b2, eps, eps_root, amsgrad), weight_decay, after=True),
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
    """RMSprop, equal to ``torch.optim.RMSprop`` with the same arguments. The state's
    layout does not depend on ``weight_decay`` (see :func:`adam`)."""
    parts = [_decayed(scale_by_rms(alpha, eps, centered, eps_root), weight_decay)]
    if not _is_zero(momentum):
        parts.append(trace(momentum))
    return chain(*parts, scale_by_learning_rate(lr))
