"""Pure task-boundary and loss-observation functions on states of the learned rule.

They accept the state of :func:`metaopt.learned.learned_rule` and of any composition
(``chain(clip_by_global_norm(1.0), learned_rule(net))``): every
:class:`~metaopt.learned.state.LearnedState` found in the state is rewritten, everything
else is returned unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch.utils import _pytree as pytree

from metaopt.learned.state import LearnedState, second_moment
from metaopt.tree import named_leaves

__all__ = [
    "IMPORTANCE_CAP",
    "IMPORTANCE_KINDS",
    "fold_task",
    "learned_leaves",
    "map_learned",
    "new_task",
    "observe_loss",
]

Importance = Literal["path", "weight_grad", "fisher"]
IMPORTANCE_KINDS: tuple[str, ...] = ("path", "weight_grad", "fisher")
"""How a finished task's importance is scored per element (RMS gradient ``r = sqrt(v)``):
``"path"`` = ``|w - anchor| * r`` (work done along the task's path, SI-like),
``"weight_grad"`` = ``|w| * r`` (Vettoruzzo's gradient x weight), ``"fisher"`` = ``v``
(EWC-like squared gradients)."""


def check_importance(kind: str) -> None:
    """Raise ``ValueError`` unless ``kind`` is one of :data:`IMPORTANCE_KINDS`."""
    if kind not in IMPORTANCE_KINDS:
        raise ValueError(f"importance must be one of {IMPORTANCE_KINDS}, got {kind!r}")


def _is_learned(x: Any) -> bool:
    return isinstance(x, LearnedState)


def learned_leaves(leaf_state: Any) -> list[LearnedState]:
    """The :class:`LearnedState` objects inside one parameter's leaf state."""
    return [x for x in pytree.tree_leaves(leaf_state, is_leaf=_is_learned) if _is_learned(x)]


def map_learned(state: Any, fn: Callable[[str, LearnedState], LearnedState]) -> Any:
    """Apply ``fn(key, leaf_state)`` to every :class:`LearnedState` in a rule state.

    Raises:
        ValueError: ``state`` holds no learned-rule state.
    """
    if not isinstance(state, dict):
        raise TypeError(f"a rule state is a dict {{key: leaf_state}}, got {type(state).__name__}")
    found = False

    def visit(key: str, leaf: Any) -> Any:
        nonlocal found
        if _is_learned(leaf):
            found = True
            return fn(key, leaf)
        return leaf

    out = {
        # the learned rule's own state holds a LearnedState per key: no tree to walk
        key: visit(key, leaf_state)
        if type(leaf_state) is LearnedState
        else pytree.tree_map(lambda x, k=key: visit(k, x), leaf_state, is_leaf=_is_learned)
        for key, leaf_state in state.items()
    }
    if state and not found:
        raise ValueError("the state holds no learned-rule state (LearnedState)")
    return out


def fold_task(leaf: LearnedState, param: torch.Tensor, importance: str = "path") -> LearnedState:
    """Snapshot the anchor to ``param`` and add the finished task's importance score.

    A parameter the finished task never updated (frozen, without gradients, or a second
    boundary right after the first) scores 0: Adam's second moment still holds an earlier
    task's gradients, and adding their ``"fisher"`` or ``"weight_grad"`` score again at
    every boundary counted them twice. ``"path"`` scores 0 there anyway.

    Args:
        leaf: the parameter's leaf state.
        param: the parameter's current value (same shape).
        importance: one of :data:`IMPORTANCE_KINDS`.
    """
    check_importance(importance)
    if param.shape != leaf.anchor.shape:
        raise ValueError(
            f"new_task: parameter shape {tuple(param.shape)} != state shape "
            f"{tuple(leaf.anchor.shape)}"
        )
    # a square that overflowed (v = inf, gradients beyond ~1e19 in float32) counts as the
    # largest finite value: inf made the score inf, or NaN where the drift was 0, and the
    # importance then NaN'ed every parameter in the next task
    v = second_moment(leaf).clamp_max(torch.finfo(leaf.exp_avg_sq.dtype).max)
    root_v = v.clamp_min(1e-30).sqrt()  # finite derivative where v == 0 (meta-gradients)
    if importance == "path":
        score = (param - leaf.anchor).abs() * root_v
    elif importance == "weight_grad":
        score = param.abs() * root_v
    else:
        score = v
    score = score * _updated_in_task(leaf).to(score.dtype)
    aux = leaf.anchor.dtype
    return leaf._replace(
        anchor=param.to(aux, copy=True),
        importance=(leaf.importance + score).clamp_max(_importance_cap(aux)).to(aux),
        pending=leaf.pending.new_zeros(0),
    )


IMPORTANCE_CAP = 1e30
"""Largest accumulated importance (or the aux dtype's largest value, if smaller). The
rule averages importances over samples and tokens in float32; capped here, those sums
cannot overflow (importances near float32's largest value, from gradients beyond ~1e19,
made the averages inf and the next task's parameters NaN). Ordinary importances are
many orders of magnitude smaller."""


def _importance_cap(dtype: torch.dtype) -> float:
    return min(IMPORTANCE_CAP, torch.finfo(dtype).max)


def _updated_in_task(leaf: LearnedState) -> torch.Tensor:
    """0-d: 1 if the task being folded updated the parameter, else 0. With a pending
    boundary (``new_task(state)`` without params, which resets ``task_step`` at once) the
    flag was kept in ``pending``."""
    if leaf.pending.numel():
        return leaf.pending[0]
    return (leaf.task_step > 0).to(leaf.pending.dtype)


def _advance(leaf: LearnedState) -> LearnedState:
    stats = leaf.loss_stats.clone()
    stats[3] = 0.0
    return leaf._replace(
        task_step=torch.zeros_like(leaf.task_step),
        task_index=leaf.task_index + 1,
        loss_stats=stats,
    )


def new_task(state: Any, params: Any | None = None, *, importance: str | None = None) -> Any:
    """Mark a task boundary (pure): returns a new state, ``state`` is unchanged.

    Every learned leaf state gets its task index incremented, its in-task counters and
    loss statistics reset, its anchor snapshotted to the current parameter value and the
    finished task's importance folded into the accumulated importance. Without
    ``params`` the last two happen at the next ``update`` (which receives the parameters;
    they have not changed since), so ``new_task(state)`` needs nothing but the state.

    Args:
        state: the state of ``learned_rule`` or of a chain containing it.
        params: the current parameters (same tree as given to ``update``), optional.
        importance: importance score of the finished task, see :data:`IMPORTANCE_KINDS`
            (default ``"path"``). Only with ``params``: without them the next ``update``
            scores the task with the rule's own ``importance`` option.

    Raises:
        ValueError: ``importance`` given without ``params`` (it would be ignored).
    """
    if params is None:
        if importance is not None:
            raise ValueError(
                "new_task: importance is only used with params; without them the next "
                "update folds the task with the rule's importance option "
                "(learned_rule(..., importance=...))"
            )
        # pending holds whether the task being closed updated the parameter (two
        # boundaries before the next update fold as one: either task may have)
        return map_learned(
            state,
            lambda key, leaf: _advance(leaf)._replace(pending=_updated_in_task(leaf).reshape(1)),
        )
    importance = "path" if importance is None else importance
    check_importance(importance)
    param_of = dict(named_leaves(params))
    missing = set(state) - set(param_of)
    if missing:
        raise ValueError(f"new_task: params lack the state's keys {sorted(missing)}")
    return map_learned(
        state, lambda key, leaf: _advance(fold_task(leaf, param_of[key], importance))
    )


def observe_loss(state: Any, loss: torch.Tensor | float) -> Any:
    """Record a training loss for the task token (pure).

    Keeps a fast (rate 0.1) and a slow (rate 0.01) running average of the loss and the
    first loss of the task in every learned leaf state. A non-finite loss is ignored (the
    statistics stay as they are), so it cannot reach the rule's network.

    Args:
        state: the state of ``learned_rule`` or of a chain containing it.
        loss: a scalar (a Python number or a one-element tensor).
    """
    loss_t = torch.as_tensor(loss)
    if loss_t.numel() != 1:
        raise ValueError(f"observe_loss expects a scalar loss, got shape {tuple(loss_t.shape)}")
    loss_t = loss_t.reshape(())
    leaves: list[LearnedState] = []

    def collect(key: str, leaf: LearnedState) -> LearnedState:
        leaves.append(leaf)
        return leaf

    map_learned(state, collect)  # also checks that `state` holds learned leaves
    # one update over all leaves' statistics per device and dtype (the same formulas per
    # element), not a dozen small operations per parameter tensor
    by_kind: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, leaf in enumerate(leaves):
        by_kind.setdefault((leaf.loss_stats.device, leaf.loss_stats.dtype), []).append(i)
    new_stats: list[torch.Tensor | None] = [None] * len(leaves)
    for indices in by_kind.values():
        rows = _observed(torch.stack([leaves[i].loss_stats for i in indices]), loss_t)
        for i, row in zip(indices, rows.unbind(0), strict=True):
            new_stats[i] = row
    rows_in_order = iter(new_stats)
    return map_learned(state, lambda key, leaf: leaf._replace(loss_stats=next(rows_in_order)))


def _observed(stats: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """``[n, 4]`` loss statistics (fast, slow, start, count per row) after observing the
    0-d ``loss``; unchanged where the loss is not finite."""
    fast, slow, start, count = stats.unbind(1)
    value = loss.to(stats)
    w_fast = torch.clamp(1.0 / (count + 1.0), min=0.1)
    w_slow = torch.clamp(1.0 / (count + 1.0), min=0.01)
    new = torch.stack(
        [
            fast + w_fast * (value - fast),
            slow + w_slow * (value - slow),
            torch.where(count == 0, value, start),
            count + 1.0,
        ],
        dim=1,
    )
    return torch.where(torch.isfinite(value), new, stats)
