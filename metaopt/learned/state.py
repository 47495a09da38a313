"""The learned rule's per-parameter leaf state and its memory budget.

Per element the rule keeps Adam's two moments in the parameter's dtype plus two
continual-learning buffers in ``aux_dtype`` (bfloat16 by default): the *anchor* (the
parameter's value at the start of the current task) and the *importance* accumulated over
earlier tasks. For float32 parameters that is 4 + 4 + 2 + 2 = 12 bytes, 1.5x Adam's 8.
Everything else (step counters, loss statistics, the static descriptor) is per tensor.
With ``factored=True`` the second moment of every matrix is kept as row and column
averages (Adafactor), which brings float32 tensors down to 8 bytes, Adam's size.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from metaopt.learned.features import static_descriptor

__all__ = [
    "LOSS_STATS",
    "LearnedState",
    "factored_shape",
    "init_leaf",
    "is_factored",
    "second_moment",
]

LOSS_STATS = ("fast_loss", "slow_loss", "task_start_loss", "n_losses")
"""Fields of :attr:`LearnedState.loss_stats`."""


class LearnedState(NamedTuple):
    """Leaf state of :func:`metaopt.learned.learned_rule` for one parameter.

    Attributes:
        step: 0-d float32, updates done (Adam's bias correction uses it).
        task_step: 0-d float32, updates done in the current task.
        task_index: 0-d float32, task boundaries seen (0 in the first task).
        exp_avg: Adam's first moment, shape and dtype of the parameter.
        exp_avg_sq: Adam's second moment, shape and dtype of the parameter; with
            ``factored=True`` and ``ndim >= 2``: ``[rows + cols]`` row and column means.
        anchor: the parameter at the start of the task, ``aux_dtype``.
        importance: importance accumulated over earlier tasks, ``aux_dtype``.
        loss_stats: ``[4]`` float32, see :data:`LOSS_STATS`.
        descriptor: ``[N_STATIC_FEATURES]`` float32 static shape descriptor.
        pending: ``[0]``; ``[1]`` after :func:`metaopt.learned.new_task` was called
            without parameters: the next ``update`` snapshots the anchor and folds the
            importance (it has the parameter values). Its value is 1 if the closed task
            updated the parameter, else 0 (then no importance is added).
    """

    step: torch.Tensor
    task_step: torch.Tensor
    task_index: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    anchor: torch.Tensor
    importance: torch.Tensor
    loss_stats: torch.Tensor
    descriptor: torch.Tensor
    pending: torch.Tensor


# a plain tensor container: a state saved with torch.save loads with torch.load's default
# weights_only=True
torch.serialization.add_safe_globals([LearnedState])


def _zero_second_moment(p: torch.Tensor, factored: bool) -> torch.Tensor:
    shape = factored_shape(p.shape) if factored else None
    if shape is None:
        return torch.zeros_like(p)
    return p.new_zeros(sum(shape))


def factored_shape(shape: torch.Size) -> tuple[int, int] | None:
    """``(rows, cols)`` of a tensor whose second moment may be factored (``ndim >= 2``:
    ``rows`` = first dimension, ``cols`` = the product of the others), else ``None``."""
    if len(shape) < 2:
        return None
    rows = shape[0]
    return rows, math.prod(shape) // max(rows, 1)


def is_factored(leaf: LearnedState) -> bool:
    """Whether ``leaf`` keeps Adafactor-style row and column second moments."""
    return leaf.exp_avg_sq.shape != leaf.exp_avg.shape


def second_moment(leaf: LearnedState) -> torch.Tensor:
    """The second moment ``v`` in the parameter's shape (rebuilt from the row and column
    factors when factored: ``v_ij = r_i c_j / mean(r)``)."""
    if not is_factored(leaf):
        return leaf.exp_avg_sq
    rows, _ = factored_shape(leaf.exp_avg.shape)
    row, col = leaf.exp_avg_sq[:rows], leaf.exp_avg_sq[rows:]
    full = torch.outer(row, col) / row.mean().clamp_min(1e-30)
    return full.reshape(leaf.exp_avg.shape)


def init_leaf(
    name: str,
    param: torch.Tensor,
    depth: float,
    aux_dtype: torch.dtype | None,
    factored: bool = False,
) -> LearnedState:
    """A fresh leaf state: Adam's zero moments, anchor = the parameter, zero importance.

    Args:
        name: the parameter's key (kind detection, see :func:`static_descriptor`).
        param: the parameter (any floating dtype, any shape).
        depth: position of the parameter in its model, in [0, 1].
        aux_dtype: dtype of the anchor and importance buffers; ``None`` = the parameter's.
        factored: keep the second moment of a tensor with ``ndim >= 2`` as row and
            column averages (``[rows + cols]``, see :func:`second_moment`).
    """
    if not param.is_floating_point():
        raise TypeError(f"learned_rule: parameter {name!r} is {param.dtype}, not floating point")
    aux = aux_dtype or param.dtype
    device = param.device
    counter = torch.zeros((), dtype=torch.float32, device=device)
    p = param.detach()
    return LearnedState(
        step=counter,
        task_step=counter.clone(),
        task_index=counter.clone(),
        exp_avg=torch.zeros_like(p),
        exp_avg_sq=_zero_second_moment(p, factored),
        anchor=p.to(aux, copy=True),
        importance=torch.zeros_like(p, dtype=aux),
        loss_stats=torch.zeros(len(LOSS_STATS), dtype=torch.float32, device=device),
        descriptor=static_descriptor(name, param.shape, depth).to(device),
        pending=torch.zeros(0, dtype=torch.float32, device=device),
    )
