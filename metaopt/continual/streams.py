"""Continual-learning streams: lists of :class:`Task`, each with a train and a test split.

Builders work on any image tensors ``x [N, C, H, W]`` and integer labels ``y [N]`` (MNIST,
digits, or a user's own data), so meta-training can sample tasks from them too. Every
random choice (class order, permutations, angles, subsamples) comes from a seed or a
``torch.Generator`` argument, so a stream is reproducible.

Scenarios (van de Ven & Tolias, 2019) for split streams:

- ``"task"``: task-incremental; each task is scored on its own block of logits
  (a head per task), labels are local ``0..k-1``.
- ``"domain"``: domain-incremental; one shared head of ``k`` logits, labels local.
- ``"class"``: class-incremental; one head over all classes seen in the stream,
  labels global (index of the class in the stream's class order).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

__all__ = [
    "SCENARIOS",
    "Task",
    "n_outputs",
    "permuted_stream",
    "rotated_stream",
    "split_stream",
    "stream_from_tensors",
    "subsample",
    "with_validation",
]

logger = logging.getLogger(__name__)

SCENARIOS = ("task", "domain", "class")

Seed = int | torch.Generator


@dataclass(frozen=True)
class Task:
    """One task of a stream.

    Attributes:
        name: human-readable name, e.g. ``"split-mnist/0:1"``.
        x_train: float ``[N, C, H, W]``.
        y_train: int64 ``[N]`` in ``[0, n_classes)``.
        x_test: float ``[M, C, H, W]``.
        y_test: int64 ``[M]``.
        n_classes: number of logits this task is scored on.
        task_id: position in the stream (0-based).
        logit_offset: the task uses logits ``[logit_offset, logit_offset + n_classes)``
            of the model output (a head per task in task-incremental streams).
        classes: the original dataset labels in this task (for split streams).
        x_val: optional validation images held out from the training data.
        y_val: optional validation labels.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int
    task_id: int
    logit_offset: int = 0
    classes: tuple[int, ...] = ()
    x_val: torch.Tensor | None = None
    y_val: torch.Tensor | None = None

    def logits(self, output: torch.Tensor) -> torch.Tensor:
        """The slice of a model output ``[B, n_outputs]`` this task is scored on.

        Raises:
            ValueError: the output has fewer than ``logit_offset + n_classes`` columns
                (the model was built for fewer outputs than :func:`n_outputs` of the stream).
        """
        end = self.logit_offset + self.n_classes
        if output.ndim < 2 or output.shape[1] < end:
            raise ValueError(
                f"task {self.name!r} is scored on logits [{self.logit_offset}, {end}) but the "
                f"model output has shape {tuple(output.shape)}: build the model with at "
                f"least {end} outputs (streams.n_outputs(stream))"
            )
        return output[:, self.logit_offset : end]


def _generator(seed: Seed) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        return seed
    return torch.Generator().manual_seed(int(seed))


def _check_xy(x: torch.Tensor, y: torch.Tensor, what: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"{what}: x must be [N, C, H, W], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(
            f"{what}: x must be a float tensor, got {x.dtype} (raw images: x.float() / 255)"
        )
    if y.ndim != 1 or len(y) != len(x):
        raise ValueError(f"{what}: y must be [N] with N = {len(x)}, got {tuple(y.shape)}")
    if not _integer_labels(y):
        raise ValueError(f"{what}: y must hold integer labels, got {y.dtype}")
    if len(y) and int(y.min()) < 0:
        # a lookup table indexed with -1 wraps to its last entry: -1 became another class
        raise ValueError(f"{what}: labels must be >= 0, got {int(y.min())}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{what}: x holds NaN or infinite values")


def _integer_labels(y: torch.Tensor) -> bool:
    """Whether ``y``'s dtype holds class labels (an integer type; not float, complex or
    bool)."""
    return not (y.is_floating_point() or y.is_complex() or y.dtype == torch.bool)


def n_outputs(stream: Sequence[Task]) -> int:
    """Number of model outputs a stream needs (the widest logit block end)."""
    return max(t.logit_offset + t.n_classes for t in stream)


def _select_classes(
    x: torch.Tensor,
    y: torch.Tensor,
    classes: tuple[int, ...],
    lookup: torch.Tensor,
    shift: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The examples of ``classes``, labelled ``lookup[y] - shift``."""
    mask = torch.isin(y, torch.tensor(classes))
    return x[mask], lookup[y[mask]] - shift


def split_stream(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    *,
    n_tasks: int = 5,
    scenario: str = "task",
    classes: Sequence[int] | None = None,
    shuffle_classes: bool = False,
    seed: Seed = 0,
    name: str = "split",
) -> list[Task]:
    """Split a labelled dataset into tasks of disjoint classes.

    Args:
        x_train: training images ``[N, C, H, W]``.
        y_train: training labels ``[N]`` (int64).
        x_test: test images ``[M, C, H, W]``.
        y_test: test labels ``[M]`` (int64).
        n_tasks: number of tasks; the classes are divided evenly (must divide).
        scenario: ``"task"``, ``"domain"`` or ``"class"`` (see module docstring).
        classes: the classes to use, in order (default: all labels in ``y_train``,
            sorted). A subset gives a smaller stream. A task without training examples
            is an error, a class without any a warning.
        shuffle_classes: permute the class order with ``seed`` before splitting.
        seed: int or generator for the class shuffle.
        name: prefix of the task names.

    Returns:
        ``n_tasks`` tasks; task ``t`` holds classes ``order[t*k:(t+1)*k]``.
    """
    _check_xy(x_train, y_train, "train")
    _check_xy(x_test, y_test, "test")
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; expected one of {SCENARIOS}")
    present = set(torch.unique(y_train).tolist())
    order = [int(c) for c in classes] if classes is not None else sorted(present)
    if len(set(order)) != len(order):
        raise ValueError(f"classes must be distinct, got {order}")
    if n_tasks < 1 or len(order) % n_tasks:
        raise ValueError(f"{len(order)} classes cannot be split into {n_tasks} equal tasks")
    if shuffle_classes:
        perm = torch.randperm(len(order), generator=_generator(seed)).tolist()
        order = [order[i] for i in perm]
    k = len(order) // n_tasks
    groups = [order[t * k : (t + 1) * k] for t in range(n_tasks)]
    for t, group in enumerate(groups):
        if not present.intersection(group):
            raise ValueError(f"task {t} (classes {group}) has no training examples")
    missing = [c for c in order if c not in present]
    if missing:
        logger.warning("split stream %r: classes %s have no training examples", name, missing)
    lookup = torch.full((int(max(order)) + 1,), -1, dtype=torch.long)
    lookup[torch.tensor(order)] = torch.arange(len(order))
    tasks = []
    for t, group in enumerate(groups):
        task_classes = tuple(group)
        shift = 0 if scenario == "class" else t * k
        xtr, ytr = _select_classes(x_train, y_train, task_classes, lookup, shift)
        xte, yte = _select_classes(x_test, y_test, task_classes, lookup, shift)
        tasks.append(
            Task(
                name=f"{name}/{':'.join(map(str, task_classes))}",
                x_train=xtr,
                y_train=ytr,
                x_test=xte,
                y_test=yte,
                n_classes=len(order) if scenario == "class" else k,
                task_id=t,
                logit_offset=t * k if scenario == "task" else 0,
                classes=task_classes,
            )
        )
    return tasks


def permuted_stream(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    *,
    n_tasks: int = 10,
    seed: Seed = 0,
    identity_first: bool = True,
    name: str = "permuted",
) -> list[Task]:
    """Tasks that share labels and differ by a fixed random permutation of the pixels.

    Args:
        x_train: training images ``[N, C, H, W]``.
        y_train: training labels ``[N]`` (int64).
        x_test: test images ``[M, C, H, W]``.
        y_test: test labels ``[M]`` (int64).
        n_tasks: number of tasks.
        seed: int or generator for the permutations.
        identity_first: task 0 uses the unpermuted images (the usual convention).
        name: prefix of the task names.

    Returns:
        ``n_tasks`` domain-incremental tasks over all labels; ``task.classes`` is empty.
    """
    _check_xy(x_train, y_train, "train")
    _check_xy(x_test, y_test, "test")
    if n_tasks < 1:
        raise ValueError(f"n_tasks must be >= 1, got {n_tasks}")
    gen = _generator(seed)
    n_pixels = math.prod(x_train.shape[1:])
    n_classes = int(max(y_train.max(), y_test.max())) + 1
    tasks = []
    for t in range(n_tasks):
        perm = torch.randperm(n_pixels, generator=gen)
        if t == 0 and identity_first:
            perm = torch.arange(n_pixels)
        tasks.append(
            Task(
                f"{name}/{t}",
                _permute(x_train, perm),
                y_train,
                _permute(x_test, perm),
                y_test,
                n_classes,
                t,
            )
        )
    return tasks


def _permute(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Images ``x [N, C, H, W]`` with their flattened pixels reordered by ``perm``."""
    return x.reshape(len(x), -1)[:, perm].reshape(x.shape)


def _rotate(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """Images ``x [N, C, H, W]`` rotated counter-clockwise about their centre (bilinear,
    zeros outside). ``affine_grid`` works in coordinates normalised to [-1, 1] per axis,
    so the rotation is conjugated by the aspect ratio to stay a rotation in pixels."""
    theta = math.radians(degrees)
    cos, sin = math.cos(theta), math.sin(theta)
    aspect = x.shape[-2] / x.shape[-1]  # H / W
    affine = torch.tensor([[cos, -sin * aspect, 0.0], [sin / aspect, cos, 0.0]], dtype=x.dtype)
    grid = F.affine_grid(affine.expand(len(x), 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


def rotated_stream(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    *,
    n_tasks: int = 5,
    angles: Sequence[float] | None = None,
    max_angle: float = 180.0,
    seed: Seed = 0,
    name: str = "rotated",
) -> list[Task]:
    """Tasks that share labels and differ by a fixed rotation of the images.

    Args:
        x_train: training images ``[N, C, H, W]``.
        y_train: training labels ``[N]`` (int64).
        x_test: test images ``[M, C, H, W]``.
        y_test: test labels ``[M]`` (int64).
        n_tasks: number of tasks (ignored when ``angles`` is given).
        angles: rotation of each task in degrees; default: task 0 at 0 degrees, the
            others drawn uniformly from ``[0, max_angle)`` with ``seed``.
        max_angle: upper bound of the drawn angles, degrees.
        seed: int or generator for the angles.
        name: prefix of the task names.
    """
    _check_xy(x_train, y_train, "train")
    _check_xy(x_test, y_test, "test")
    if angles is None:
        if n_tasks < 1:
            raise ValueError(f"n_tasks must be >= 1, got {n_tasks}")
        drawn = torch.rand(n_tasks, generator=_generator(seed)) * max_angle
        angles = [0.0, *drawn[1:].tolist()]
    elif not angles:
        raise ValueError("angles must hold at least one angle (one per task)")
    n_classes = int(max(y_train.max(), y_test.max())) + 1
    return [
        Task(
            f"{name}/{angle:.0f}deg",
            _rotate(x_train, angle),
            y_train,
            _rotate(x_test, angle),
            y_test,
            n_classes,
            t,
        )
        for t, angle in enumerate(angles)
    ]


def stream_from_tensors(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    kind: str = "split",
    x_test: torch.Tensor | None = None,
    y_test: torch.Tensor | None = None,
    test_fraction: float = 0.2,
    seed: Seed = 0,
    **options: object,
) -> list[Task]:
    """A stream from a user's own tensors.

    Args:
        x: images ``[N, C, H, W]`` (any float range; a flat ``[N, D]`` is viewed as
            ``[N, 1, 1, D]``).
        y: integer labels ``[N]``.
        kind: ``"split"``, ``"permuted"`` or ``"rotated"``.
        x_test: test inputs shaped like ``x``; if ``x_test`` and ``y_test`` are omitted,
            ``test_fraction`` of ``(x, y)`` is held out at random (seeded).
        y_test: test labels ``[M]``.
        test_fraction: fraction held out as test set when none is given.
        seed: int or generator for the hold-out and the stream's own randomness.
        **options: passed to the builder (``n_tasks``, ``scenario``, ``classes``...).
    """
    builders = {"split": split_stream, "permuted": permuted_stream, "rotated": rotated_stream}
    if kind not in builders:
        raise ValueError(f"unknown stream kind {kind!r}; expected one of {sorted(builders)}")
    if (x_test is None) != (y_test is None):
        raise ValueError("pass both x_test and y_test, or neither (to hold out a test set)")
    for name, labels in (("y", y), ("y_test", y_test)):
        # checked before the int64 cast below, which would truncate 2.7 to class 2
        if labels is not None and not _integer_labels(labels):
            raise ValueError(f"{name} must hold integer labels, got {labels.dtype}")
    for name, images, labels in (("", x, y), ("_test", x_test, y_test)):
        if labels is not None and len(images) != len(labels):
            # the held-out split below is drawn over the labels: extra images were dropped
            raise ValueError(
                f"x{name} has {len(images)} examples, y{name} {len(labels)}: they must match"
            )
    if x.ndim == 2:
        x = x[:, None, None, :]
    gen = _generator(seed)
    if x_test is None or y_test is None:  # neither given (checked above)
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        order = torch.randperm(len(y), generator=gen)
        n_test = max(1, round(test_fraction * len(y)))
        x, y, x_test, y_test = (
            x[order[n_test:]],
            y[order[n_test:]],
            x[order[:n_test]],
            y[order[:n_test]],
        )
    elif x_test.ndim == 2:
        x_test = x_test[:, None, None, :]
    return builders[kind](x, y.long(), x_test, y_test.long(), seed=gen, **options)


def _take(x: torch.Tensor, y: torch.Tensor, n: int | None, gen: torch.Generator):
    if n is None or n >= len(y):
        return x, y
    index = torch.randperm(len(y), generator=gen)[:n]
    return x[index], y[index]


def subsample(
    stream: Sequence[Task],
    n_train: int | None = None,
    n_test: int | None = None,
    *,
    seed: Seed = 0,
) -> list[Task]:
    """Keep at most ``n_train`` training and ``n_test`` test examples per task (seeded).

    ``None`` keeps all; a size below 1 raises ``ValueError``.
    """
    for what, n in (("n_train", n_train), ("n_test", n_test)):
        if n is not None and n < 1:
            raise ValueError(f"{what} must be >= 1 (or None for all), got {n}")
    gen = _generator(seed)
    out = []
    for task in stream:
        xtr, ytr = _take(task.x_train, task.y_train, n_train, gen)
        xte, yte = _take(task.x_test, task.y_test, n_test, gen)
        out.append(replace(task, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte))
    return out


def with_validation(
    stream: Sequence[Task], fraction: float = 0.1, *, n_max: int | None = None, seed: Seed = 0
) -> list[Task]:
    """Hold out a validation split from each task's *training* data (never the test set).

    Args:
        stream: the tasks.
        fraction: share of each task's training examples moved to ``x_val``/``y_val``
            (at least one).
        n_max: cap on the validation size per task.
        seed: int or generator for the hold-out.

    Raises:
        ValueError: ``fraction`` not in ``(0, 1)``, or a task would keep no training example.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    gen = _generator(seed)
    out = []
    for task in stream:
        n_val = max(1, round(fraction * len(task.y_train)))
        if n_max is not None:
            n_val = min(n_val, n_max)
        if n_val >= len(task.y_train):
            raise ValueError(
                f"task {task.name!r} has {len(task.y_train)} training examples: holding out "
                f"{n_val} for validation would leave none for training"
            )
        order = torch.randperm(len(task.y_train), generator=gen)
        val, train = order[:n_val], order[n_val:]
        out.append(
            replace(
                task,
                x_train=task.x_train[train],
                y_train=task.y_train[train],
                x_val=task.x_train[val],
                y_val=task.y_train[val],
            )
        )
    return out
