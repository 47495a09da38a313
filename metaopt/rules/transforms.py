"""Composable gradient transformations (optax style), each a pure :class:`UpdateRule`.

Every hyper-parameter may be a Python number or a 0-d tensor; tensors that require
grad receive gradients through the updates (hyper-gradients).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import torch

from metaopt.rules.base import (
    Scalar,
    Schedule,
    State,
    UpdateRule,
    _check_state_keys,
    _scalar,
    bias_corrections,
    per_leaf,
)
from metaopt.tree import named_leaves, rebuild

__all__ = [
    "AdamState",
    "CountState",
    "RMSState",
    "TraceState",
    "add_decayed_weights",
    "clip_by_global_norm",
    "scale",
    "scale_by_adam",
    "scale_by_learning_rate",
    "scale_by_rms",
    "scale_by_schedule",
    "trace",
]


def _count_like(p: torch.Tensor) -> torch.Tensor:
    """A 0-d float32 step counter on ``p``'s device (float32 like ``torch.optim``'s ``step``)."""
    return torch.zeros((), dtype=torch.float32, device=p.device)


def _count_as(count: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``count`` in a dtype at least as precise as float32 and as ``like``."""
    return count.to(torch.promote_types(like.dtype, torch.float32))


def _on_real_views(update_leaf: Any) -> Any:
    """``update_leaf`` run on ``torch.view_as_real`` views of a complex gradient, state
    and parameter, with the complex tensors of its results viewed back as complex: each
    complex element counts as two real ones, as in ``torch.optim`` (``g * g`` of a complex
    ``g`` is no second moment)."""

    def as_real(x: Any) -> Any:
        return torch.view_as_real(x) if isinstance(x, torch.Tensor) and x.is_complex() else x

    def update(g: torch.Tensor, s: Any, p: torch.Tensor | None) -> tuple[torch.Tensor, Any]:
        if not g.is_complex():
            return update_leaf(g, s, p)
        u, new = update_leaf(as_real(g), type(s)(*map(as_real, s)), as_real(p))
        back = [
            torch.view_as_complex(n) if o.is_complex() else n for n, o in zip(new, s, strict=True)
        ]
        return torch.view_as_complex(u), type(s)(*back)

    return update


def _check_nonnegative(name: str, value: Any) -> Any:
    """``value`` as :func:`_scalar` gives it, after checking that a number is >= 0."""
    if isinstance(value, (int, float)) and not value >= 0:
        raise ValueError(f"invalid {name}: {value} (must be >= 0)")
    return _scalar(name, value)


class CountState(NamedTuple):
    """Leaf state of :func:`scale_by_schedule`: the number of updates done."""

    count: torch.Tensor


class TraceState(NamedTuple):
    """Leaf state of :func:`trace`: step count and momentum buffer (shape of the param)."""

    count: torch.Tensor
    momentum_buffer: torch.Tensor


class AdamState(NamedTuple):
    """Leaf state of :func:`scale_by_adam` (names as in ``torch.optim.Adam``).

    ``max_exp_avg_sq`` is an empty tensor unless ``amsgrad=True``.
    """

    step: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    max_exp_avg_sq: torch.Tensor


class RMSState(NamedTuple):
    """Leaf state of :func:`scale_by_rms`; ``grad_avg`` is empty unless ``centered``."""

    square_avg: torch.Tensor
    grad_avg: torch.Tensor


# plain tensor containers: a state saved with torch.save loads with torch.load's default
# weights_only=True
torch.serialization.add_safe_globals([CountState, TraceState, AdamState, RMSState])


def scale(step_size: Scalar) -> UpdateRule:
    """Multiply updates by ``step_size`` (stateless)."""
    step_size = _scalar("step_size", step_size)
    return per_leaf(lambda p: (), lambda g, s, p: (g * step_size, s), "scale")


def scale_by_schedule(schedule: Schedule) -> UpdateRule:
    """Multiply updates by ``schedule(count)``, ``count`` = updates done so far (from 0)."""
    if not callable(schedule):
        raise TypeError(f"scale_by_schedule expects a callable, got {type(schedule).__name__}")

    def update_leaf(g, s, p):
        factor = schedule(s.count)
        if isinstance(factor, torch.Tensor) and factor.numel() != 1:
            raise ValueError(
                "a schedule must return a number or a one-element tensor, got shape "
                f"{tuple(factor.shape)}"
            )
        if isinstance(factor, torch.Tensor) and factor.ndim:
            factor = factor.reshape(())
        return g * factor, CountState(s.count + 1)

    return per_leaf(lambda p: CountState(_count_like(p)), update_leaf, "scale_by_schedule")


def scale_by_learning_rate(learning_rate: Scalar | Schedule) -> UpdateRule:
    """Multiply updates by ``-learning_rate`` (a number, a 0-d tensor or a schedule)."""
    if callable(learning_rate):
        schedule = learning_rate
        return scale_by_schedule(lambda count: -schedule(count))
    learning_rate = _check_nonnegative("learning rate", learning_rate)
    # negated inside the update, so a tensor learning rate changed in place takes effect
    return per_leaf(lambda p: (), lambda g, s, p: (g * -learning_rate, s), "scale_by_lr")


def add_decayed_weights(weight_decay: Scalar = 0.0) -> UpdateRule:
    """Add ``weight_decay * param`` to the updates (needs ``params`` in ``update``)."""
    weight_decay = _check_nonnegative("weight_decay", weight_decay)

    def update_leaf(g, s, p):
        if p is None:
            raise ValueError(
                "add_decayed_weights needs the parameter of every gradient: call "
                "update(grads, state, params) with params in the gradients' structure "
                "(the same keys); no parameter was found for one of them"
            )
        return g + weight_decay * p, s

    return per_leaf(lambda p: (), update_leaf, "add_decayed_weights")


def trace(momentum: Scalar = 0.9, dampening: Scalar = 0.0, nesterov: bool = False) -> UpdateRule:
    """Momentum exactly as ``torch.optim.SGD``.

    ``buf = g`` on the first step, then ``buf = momentum * buf + (1 - dampening) * g``;
    the output is ``g + momentum * buf`` with Nesterov and ``buf`` otherwise.
    """
    momentum = _check_nonnegative("momentum", momentum)
    dampening = _scalar("dampening", dampening)
    if nesterov and isinstance(dampening, (int, float)) and dampening != 0:
        raise ValueError("Nesterov momentum requires zero dampening")
    zero_dampening = isinstance(dampening, (int, float)) and dampening == 0

    def init_leaf(p):
        return TraceState(_count_like(p), torch.zeros_like(p))

    def update_leaf(g, s, p):
        if zero_dampening:  # buffer starts at 0, so the first step already gives buf = g
            buf = momentum * s.momentum_buffer + g
        else:
            buf = torch.where(
                s.count == 0, g, momentum * s.momentum_buffer + (1 - dampening) * g
            )
        out = g + momentum * buf if nesterov else buf
        return out, TraceState(s.count + 1, buf)

    return per_leaf(init_leaf, update_leaf, "trace")


def scale_by_adam(
    b1: Scalar = 0.9,
    b2: Scalar = 0.999,
    eps: Scalar = 1e-8,
    eps_root: Scalar = 0.0,
    amsgrad: bool = False,
) -> UpdateRule:
    """Adam's direction ``m_hat / (sqrt(v_hat + eps_root) + eps)``, as ``torch.optim.Adam``.

    ``eps_root > 0`` keeps the derivative of the square root finite when ``v_hat = 0``
    (needed for meta-gradients through many steps); with ``eps_root = 0`` the result
    equals ``torch.optim.Adam``'s step before the learning rate.
    """
    for name, value in (("beta1", b1), ("beta2", b2)):
        if isinstance(value, (int, float)) and not 0.0 <= value < 1.0:
            raise ValueError(f"invalid {name}: {value} (must be in [0, 1))")
    b1, b2 = _scalar("beta1", b1), _scalar("beta2", b2)
    eps = _check_nonnegative("eps", eps)
    eps_root = _check_nonnegative("eps_root", eps_root)

    def init_leaf(p):
        max_sq = torch.zeros_like(p) if amsgrad else p.new_zeros(0)
        return AdamState(_count_like(p), torch.zeros_like(p), torch.zeros_like(p), max_sq)

    def update_leaf(g, s, p):
        step = s.step + 1
        t = _count_as(step, g)
        m = b1 * s.exp_avg + (1 - b1) * g
        v = b2 * s.exp_avg_sq + (1 - b2) * (g * g)
        second = v
        max_sq = s.max_exp_avg_sq
        if amsgrad:
            max_sq = torch.maximum(max_sq, v)
            second = max_sq
        bc1, bc2 = bias_corrections(b1, b2, t)
        m_hat = m / bc1.to(g.dtype)
        v_hat = second / bc2.to(g.dtype)
        direction = m_hat / (torch.sqrt(v_hat + eps_root) + eps)
        return direction, AdamState(step, m, v, max_sq)

    return per_leaf(init_leaf, _on_real_views(update_leaf), "scale_by_adam")


def scale_by_rms(
    alpha: Scalar = 0.99, eps: Scalar = 1e-8, centered: bool = False, eps_root: Scalar = 0.0
) -> UpdateRule:
    """RMSprop's scaling ``g / (sqrt(E[g^2] - centered * E[g]^2 + eps_root) + eps)``."""
    alpha = _check_nonnegative("alpha", alpha)
    eps = _check_nonnegative("eps", eps)
    eps_root = _check_nonnegative("eps_root", eps_root)

    def init_leaf(p):
        return RMSState(torch.zeros_like(p), torch.zeros_like(p) if centered else p.new_zeros(0))

    def update_leaf(g, s, p):
        sq = alpha * s.square_avg + (1 - alpha) * (g * g)
        ga = s.grad_avg
        var = sq
        if centered:
            ga = alpha * ga + (1 - alpha) * g
            var = sq - ga * ga
        return g / (torch.sqrt(var + eps_root) + eps), RMSState(sq, ga)

    return per_leaf(init_leaf, _on_real_views(update_leaf), "scale_by_rms")


def clip_by_global_norm(max_norm: Scalar) -> UpdateRule:
    """Rescale all updates together so their global norm is at most ``max_norm``.

    Same formula as :func:`torch.nn.utils.clip_grad_norm_`:
    ``g * min(1, max_norm / (norm + 1e-6))``. Stateless. ``None`` gradients stay ``None``
    and do not count in the norm; an empty tree is returned as it is.
    """
    max_norm = _check_nonnegative("max_norm", max_norm)

    def init(params: Any) -> State:
        return {key: () for key, _ in named_leaves(params)}

    def update(grads: Any, state: State, params: Any | None = None) -> tuple[Any, State]:
        items = named_leaves(grads)
        _check_state_keys([k for k, _ in items], state, "clip_by_global_norm")
        present = [g for _, g in items if g is not None]
        if not present:
            return grads, state
        dtype = functools.reduce(torch.promote_types, (g.dtype for g in present), torch.float32)
        norms = torch.stack([torch.linalg.vector_norm(g).to(dtype) for g in present])
        total = torch.linalg.vector_norm(norms)
        factor = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        clipped = [None if g is None else g * factor.to(g.dtype) for _, g in items]
        return rebuild(grads, clipped), state

    return UpdateRule(init, update)
