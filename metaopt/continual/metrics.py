"""Continual-learning metrics on an accuracy matrix (paper formulas, 0-based indices).

``R[i, j]`` is the test accuracy on task ``j`` after training on tasks ``0..i``;
``b[j]`` the accuracy on task ``j`` of the model at initialisation. Both in ``[0, 1]``
(checked, as are finiteness and shapes; tensors or nested lists).

- ACC = mean_j R[T-1, j]  (Lopez-Paz & Ranzato, 2017)
- BWT = mean_{j<T-1} (R[T-1, j] - R[j, j])
- FWT = mean_{j>=1} (R[j-1, j] - b[j])
- forgetting = mean_{j<T-1} max_{l<T-1} R[l, j] - R[T-1, j]  (Chaudhry et al., 2018)
- learning accuracy = mean_j R[j, j]  (how well each task was learned when trained)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["acc", "bwt", "forgetting", "fwt", "learning_accuracy", "summarize"]

Matrix = torch.Tensor | Sequence[Sequence[float]]
Vector = torch.Tensor | Sequence[float]


def _accuracies(values: Matrix | Vector, name: str) -> torch.Tensor:
    """``values`` as a float64 tensor, checked to hold accuracies: finite, in ``[0, 1]``."""
    t = torch.as_tensor(values, dtype=torch.float64)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} must be finite (a NaN is a missing evaluation), got {t}")
    if t.numel() and (t.min() < 0 or t.max() > 1):
        raise ValueError(f"{name} must hold accuracies in [0, 1] (not percentages), got {t}")
    return t


def _square(R: Matrix) -> torch.Tensor:
    """``R`` checked (a non-empty square matrix of accuracies) as a float64 tensor."""
    R = _accuracies(R, "R")
    if R.ndim != 2 or R.shape[0] != R.shape[1]:
        raise ValueError(f"R must be a square [T, T] matrix, got shape {tuple(R.shape)}")
    if R.shape[0] == 0:
        raise ValueError("R must cover at least one task, got shape (0, 0)")
    return R


def acc(R: Matrix) -> float:
    """Average accuracy over all tasks after the last task."""
    return _square(R)[-1].mean().item()


def bwt(R: Matrix) -> float:
    """Backward transfer (negative = forgetting); 0 for a single task."""
    R = _square(R)
    if len(R) < 2:
        return 0.0
    return (R[-1, :-1] - torch.diagonal(R)[:-1]).mean().item()


def fwt(R: Matrix, b: Vector) -> float:
    """Forward transfer against the accuracy at initialisation ``b [T]``; 0 for one task."""
    R = _square(R)
    b = _accuracies(b, "b")
    T = len(R)
    if b.shape != (T,):
        raise ValueError(f"b must have shape ({T},), got {tuple(b.shape)}")
    if T < 2:
        return 0.0
    return (torch.diagonal(R, offset=1) - b[1:]).mean().item()


def forgetting(R: Matrix) -> float:
    """Average forgetting: best earlier accuracy minus final accuracy; 0 for one task."""
    R = _square(R)
    if len(R) < 2:
        return 0.0
    return (R[:-1, :-1].max(dim=0).values - R[-1, :-1]).mean().item()


def learning_accuracy(R: Matrix) -> float:
    """Mean diagonal of ``R``: accuracy of each task right after training on it."""
    return torch.diagonal(_square(R)).mean().item()


def summarize(R: Matrix, b: Vector) -> dict[str, float]:
    """All metrics as ``{"acc", "bwt", "fwt", "forgetting", "learning_acc"}``.

    ``R`` and ``b`` may be tensors or nested lists (as stored in ``results.json``).

    Raises:
        ValueError: ``R`` is not a non-empty square matrix, ``b`` not of length ``T``, or
            an entry is not finite or outside ``[0, 1]``.
    """
    return {
        "acc": acc(R),
        "bwt": bwt(R),
        "fwt": fwt(R, b),
        "forgetting": forgetting(R),
        "learning_acc": learning_accuracy(R),
    }
