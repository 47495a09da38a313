"""Continual-learning metrics on an accuracy matrix (paper formulas, 0-based indices).

``R[i, j]`` is the test accuracy on task ``j`` after training on tasks ``0..i``;
``b[j]`` the accuracy on task ``j`` of the model at initialisation. Both in ``[0, 1]``.

- ACC = mean_j R[T-1, j]  (Lopez-Paz & Ranzato, 2017)
- BWT = mean_{j<T-1} (R[T-1, j] - R[j, j])
- FWT = mean_{j>=1} (R[j-1, j] - b[j])
- forgetting = mean_{j<T-1} max_{l<T-1} R[l, j] - R[T-1, j]  (Chaudhry et al., 2018)
- learning accuracy = mean_j R[j, j]  (how well each task was learned when trained)
"""

from __future__ import annotations

import torch

__all__ = ["acc", "bwt", "forgetting", "fwt", "learning_accuracy", "summarize"]


def _square(R: torch.Tensor) -> int:
    if R.ndim != 2 or R.shape[0] != R.shape[1]:
        raise ValueError(f"R must be a square [T, T] matrix, got shape {tuple(R.shape)}")
    return R.shape[0]


def acc(R: torch.Tensor) -> float:
    """Average accuracy over all tasks after the last task."""
    _square(R)
    return R[-1].mean().item()


def bwt(R: torch.Tensor) -> float:
    """Backward transfer (negative = forgetting); 0 for a single task."""
    T = _square(R)
    if T < 2:
        return 0.0
    return (R[-1, :-1] - torch.diagonal(R)[:-1]).mean().item()


def fwt(R: torch.Tensor, b: torch.Tensor) -> float:
    """Forward transfer against the accuracy at initialisation ``b [T]``; 0 for one task."""
    T = _square(R)
    if b.shape != (T,):
        raise ValueError(f"b must have shape ({T},), got {tuple(b.shape)}")
    if T < 2:
        return 0.0
    return (torch.diagonal(R, offset=1) - b[1:]).mean().item()


def forgetting(R: torch.Tensor) -> float:
    """Average forgetting: best earlier accuracy minus final accuracy; 0 for one task."""
    T = _square(R)
    if T < 2:
        return 0.0
    return (R[:-1, :-1].max(dim=0).values - R[-1, :-1]).mean().item()


def learning_accuracy(R: torch.Tensor) -> float:
    """Mean diagonal of ``R``: accuracy of each task right after training on it."""
    _square(R)
    return torch.diagonal(R).mean().item()


def summarize(R: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """All metrics as ``{"acc", "bwt", "fwt", "forgetting", "learning_acc"}``."""
    return {
        "acc": acc(R),
        "bwt": bwt(R),
        "fwt": fwt(R, b),
        "forgetting": forgetting(R),
        "learning_acc": learning_accuracy(R),
    }
