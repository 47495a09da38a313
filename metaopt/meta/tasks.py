"""Task families for meta-training: random short continual sequences from TRAINING images.

A :class:`TaskFamily` draws :class:`~metaopt.meta.objective.ContinualProblem` samples:
a dataset (scikit-learn digits, MNIST), a model (MLP, CNN, transformer), a stream kind
(split with a random class subset and label map, permuted, rotated), a sequence length,
a step budget per task and a batch size, each at random from the family's ranges.

Only training images are ever used: digits' fixed ``"train"`` split and MNIST's 60,000
training images (and the training file of any other dataset of IDX files named in
``datasets``, see :func:`metaopt.continual.data.load_idx_dataset`). The shipped rule never
saw Fashion-MNIST, so results on it are out-of-distribution. Each pool is partitioned once
(fixed seed) into a meta-training part (80%) and a meta-validation part (20%): validation
sequences use images the meta-training never saw.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from metaopt.continual.data import (
    N_CLASSES,
    check_dataset_name,
    load_digits_tensors,
    load_idx_dataset,
)
from metaopt.continual.models import build_model
from metaopt.continual.streams import Task, n_outputs, stream_from_tensors
from metaopt.meta.objective import ContinualProblem

__all__ = [
    "DATASETS",
    "HELD_OUT_DATASETS",
    "KINDS",
    "MODELS",
    "SMALL_MODELS",
    "FamilyConfig",
    "TaskFamily",
]

logger = logging.getLogger(__name__)

DATASETS = ("digits", "mnist")
"""The built-in pools (any folder of IDX files in the data directory works too)."""
HELD_OUT_DATASETS = ("fashion-mnist",)
"""Never meta-trained on: results on them stay out-of-distribution."""
MODELS = ("mlp", "cnn", "transformer")
KINDS = ("split", "permuted", "rotated")

_MNIST_SIDE = 28

SMALL_MODELS: dict[str, dict[str, Any]] = {
    "mlp": {"hidden": (32,)},
    "cnn": {"channels": (4, 8)},
    "transformer": {"dim": 16, "depth": 1, "heads": 2},
}
"""The family's default model sizes (keyword arguments of
:func:`metaopt.continual.models.build_model`); the paper suite's models are larger (MLP
400-400, CNN 16-32 channels, transformer width 64, 2 layers, 4 heads)."""


@dataclass
class FamilyConfig:
    """Ranges the family samples from (inclusive integer ranges as ``(low, high)``).

    Attributes:
        datasets, models, kinds: choices (see :data:`MODELS`, :data:`KINDS`); datasets are
            those of :data:`DATASETS` or folders of IDX files in the data directory (their
            training files only), never one of :data:`HELD_OUT_DATASETS`.
        n_tasks: tasks per sequence (with split streams, 2 classes each: at most 5 for
            digits and MNIST).
        steps_per_task: inner steps per task.
        batch_size: inner batch sizes to choose from.
        examples: training images drawn per sequence (before the held-out split).
        mnist_size: MNIST images are average-pooled to this side (14: 2x2 pooling; 28:
            none; at most 28 with MNIST); a folder's images whose longer side exceeds it
            are pooled to it as well, keeping their aspect ratio (smaller ones are kept).
        meta_batch_size: held-out examples per task for the meta-loss.
        speed_weight: weight of the learning-speed term.
        earlier_weight: weight of each earlier task relative to the current one.
        model_sizes: keyword arguments of each model (small by default).
    """

    datasets: tuple[str, ...] = ("digits",)
    models: tuple[str, ...] = MODELS
    kinds: tuple[str, ...] = KINDS
    n_tasks: tuple[int, int] = (2, 3)
    steps_per_task: tuple[int, int] = (10, 20)
    batch_size: tuple[int, ...] = (16, 32)
    examples: int = 600
    mnist_size: int = 14
    meta_batch_size: int = 64
    speed_weight: float = 0.25
    earlier_weight: float = 1.0
    model_sizes: dict[str, dict[str, Any]] = field(
        default_factory=lambda: copy.deepcopy(SMALL_MODELS)
    )

    def __post_init__(self) -> None:
        for name in ("models", "kinds", "datasets"):
            if isinstance(getattr(self, name), str):  # its letters were taken as names
                raise ValueError(
                    f"{name} must be a tuple of names, got the string {getattr(self, name)!r}"
                )
        for name, chosen, allowed in (
            ("models", self.models, MODELS),
            ("kinds", self.kinds, KINDS),
        ):
            bad = [c for c in chosen if c not in allowed]
            if not chosen or bad:
                raise ValueError(f"{name} must be a non-empty subset of {allowed}, got {chosen}")
        if not self.datasets:
            raise ValueError("datasets must not be empty")
        for dataset in self.datasets:
            check_dataset_name(dataset)
            if dataset in HELD_OUT_DATASETS:
                raise ValueError(
                    f"datasets: {dataset!r} is held out of meta-training (metaopt's "
                    "out-of-distribution benchmark); use digits, mnist or a folder of IDX files"
                )
        for name in ("n_tasks", "steps_per_task"):
            low, high = getattr(self, name)
            if not 1 <= low <= high:
                raise ValueError(f"{name} must be (low, high) with 1 <= low <= high")
        built_in = set(self.datasets) & set(DATASETS)
        n_classes = min((N_CLASSES[d] for d in built_in), default=0)
        if built_in and "split" in self.kinds and self.n_tasks[1] > n_classes // 2:
            raise ValueError(  # the first sequence that long failed, hours into a run
                f"split sequences take 2 of the {n_classes} classes of {sorted(built_in)} per "
                f"task: n_tasks must be at most {n_classes // 2} with kinds including "
                f"'split', got {self.n_tasks}"
            )  # (a folder's classes are counted when TaskFamily loads it)
        if self.examples < 20:
            raise ValueError(f"examples must be >= 20, got {self.examples}")
        if self.meta_batch_size < 1:
            raise ValueError(f"meta_batch_size must be >= 1, got {self.meta_batch_size}")
        if self.mnist_size < 1 or ("mnist" in self.datasets and self.mnist_size > _MNIST_SIDE):
            raise ValueError(  # pooling MNIST to a larger side upsampled it
                f"mnist_size must be in [1, {_MNIST_SIDE}] (MNIST's images are "
                f"{_MNIST_SIDE}x{_MNIST_SIDE}, average-pooled to it), got {self.mnist_size}"
            )
        if not self.batch_size or min(self.batch_size) < 1:
            raise ValueError(f"batch_size must be a non-empty tuple of sizes >= 1, got "
                             f"{self.batch_size}")
        if not all(
            math.isfinite(w) and w >= 0 for w in (self.speed_weight, self.earlier_weight)
        ):  # an infinite weight made every meta-loss NaN
            raise ValueError(
                f"speed_weight and earlier_weight must be finite and >= 0, got "
                f"{self.speed_weight} and {self.earlier_weight}"
            )
        missing = [m for m in self.models if m not in self.model_sizes]
        if missing:
            raise ValueError(  # a KeyError when a sequence first drew that model
                f"model_sizes has no entry for {missing} (every model in models needs one; "
                f"metaopt.meta.tasks.SMALL_MODELS holds the defaults)"
            )
        for model, kwargs in self.model_sizes.items():
            for key, value in kwargs.items():
                sizes = value if isinstance(value, (tuple, list)) else (value,)
                if any(isinstance(v, int) and v < 1 for v in sizes):
                    raise ValueError(f"model_sizes[{model!r}][{key!r}] must be >= 1, got {value}")
        transformer = self.model_sizes.get("transformer", {})
        if transformer.get("dim", 1) % transformer.get("heads", 1):
            raise ValueError(  # nn.MultiheadAttention's assertion, when first drawn
                f"model_sizes['transformer']: dim {transformer['dim']} must be a multiple of "
                f"heads {transformer['heads']}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (for checkpoint metadata)."""
        return asdict(self)


MAX_DRAWS = 100
"""Draws of a sequence's examples before :meth:`TaskFamily.sample` gives up on leaving
no task without training or held-out examples."""


def _load_pool(name: str, data_dir: str | None, mnist_size: int):
    """The training images of ``name``, those larger than ``mnist_size`` average-pooled
    to it (the longer side; the aspect ratio kept)."""
    if name == "digits":
        return load_digits_tensors(split="train")
    x, y = load_idx_dataset(name, data_dir, split="train")
    height, width = x.shape[-2:]
    if max(height, width) > mnist_size:
        size = (
            max(1, round(height * mnist_size / max(height, width))),
            max(1, round(width * mnist_size / max(height, width))),
        )
        x = F.adaptive_avg_pool2d(x, size)
    return x, y


def _choice(options, gen: torch.Generator):
    return options[int(torch.randint(len(options), (1,), generator=gen))]


def _randint(low: int, high: int, gen: torch.Generator) -> int:
    return int(torch.randint(low, high + 1, (1,), generator=gen))


class TaskFamily:
    """Random continual task sequences for meta-training or meta-validation.

    Args:
        config: the ranges (:class:`FamilyConfig`).
        part: ``"train"`` or ``"val"``: which part of each image pool to draw from.
        data_dir: the data directory (default ``$METAOPT_DATA_DIR``); only read if the
            config includes a dataset other than ``"digits"``.

    Raises:
        ValueError: a split sequence could need more classes than a dataset has
            (``2 * n_tasks`` high).
    """

    def __init__(
        self, config: FamilyConfig | None = None, part: str = "train", data_dir: str | None = None
    ) -> None:
        if part not in ("train", "val"):
            raise ValueError(f"part must be 'train' or 'val', got {part!r}")
        self.config = config or FamilyConfig()
        self.part = part
        self.pools: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.classes: dict[str, torch.Tensor] = {}
        for name in self.config.datasets:
            x, y = _load_pool(name, data_dir, self.config.mnist_size)
            self.classes[name] = torch.unique(y)
            most = 2 * self.config.n_tasks[1]
            if "split" in self.config.kinds and most > len(self.classes[name]):
                raise ValueError(
                    f"dataset {name!r} has {len(self.classes[name])} classes: too few for "
                    f"split sequences of up to {self.config.n_tasks[1]} tasks of 2 classes"
                )
            order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
            cut = int(0.8 * len(y))
            index = order[:cut] if part == "train" else order[cut:]
            self.pools[name] = (x[index], y[index])
            logger.info("task family %s/%s: %d images", name, part, len(index))
            self._check_models_fit(name, tuple(x.shape[1:]))

    def _check_models_fit(self, dataset: str, image_shape: tuple[int, ...]) -> None:
        """Build each model of the family once for ``dataset``'s images, so that sizes
        that do not fit them (a CNN deeper than the images allow, a transformer width
        that its heads do not divide) fail here, not when a sequence first draws them."""
        for model_name in self.config.models:
            try:
                with torch.random.fork_rng(devices=[]):  # leaves the caller's draws as they were
                    build_model(model_name, image_shape, 2, **self.config.model_sizes[model_name])
            except (ValueError, AssertionError, RuntimeError) as error:
                raise ValueError(
                    f"model_sizes[{model_name!r}] = {self.config.model_sizes[model_name]} "
                    f"does not fit {dataset!r} ({'x'.join(map(str, image_shape))} images): "
                    f"{error}"
                ) from error

    def _draw_stream(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        kind: str,
        seed: int,
        options: dict[str, Any],
        gen: torch.Generator,
    ) -> list[Task]:
        """A stream of ``config.examples`` images drawn from ``(x, y)`` whose every task
        has training and held-out examples: a split sequence's draw can leave a task
        without either (its held-out loss, a mean over nothing, made the meta-loss NaN),
        and is then drawn again, up to :data:`MAX_DRAWS` times."""
        problem = ""
        for _ in range(MAX_DRAWS):
            index = torch.randperm(len(y), generator=gen)[: self.config.examples]
            try:
                stream = stream_from_tensors(
                    x[index], y[index], kind=kind, test_fraction=0.25, seed=seed, **options
                )
            except ValueError as error:  # a task without training examples
                problem = str(error)
                continue
            empty = [task.name for task in stream if not len(task.y_test)]
            if not empty:
                return stream
            problem = f"tasks {empty} have no held-out examples"
        raise ValueError(
            f"{MAX_DRAWS} draws of {self.config.examples} examples for a {kind} sequence "
            f"of {options['n_tasks']} tasks all left a task empty ({problem}): raise "
            "examples or lower n_tasks"
        )

    def sample(self, gen: torch.Generator) -> ContinualProblem:
        """One random task sequence; all randomness comes from ``gen``."""
        cfg = self.config
        dataset = _choice(cfg.datasets, gen)
        model_name = _choice(cfg.models, gen)
        kind = _choice(cfg.kinds, gen)
        n_tasks = _randint(*cfg.n_tasks, gen)
        steps = [_randint(*cfg.steps_per_task, gen) for _ in range(n_tasks)]
        batch_size = _choice(cfg.batch_size, gen)
        seed = int(torch.randint(2**31 - 1, (1,), generator=gen))
        x, y = self.pools[dataset]
        options: dict[str, Any] = {"n_tasks": n_tasks}
        if kind == "split":
            pool_classes = self.classes[dataset]
            classes = pool_classes[torch.randperm(len(pool_classes), generator=gen)[: 2 * n_tasks]]
            keep = torch.isin(y, classes)
            x, y = x[keep], y[keep]
            options.update(scenario="domain", classes=classes.tolist())
        stream = self._draw_stream(x, y, kind, seed, options, gen)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_model(
                model_name, tuple(x.shape[1:]), n_outputs(stream), **cfg.model_sizes[model_name]
            )
        problem = ContinualProblem(
            model,
            stream,
            steps,
            batch_size,
            meta_batch_size=cfg.meta_batch_size,
            speed_weight=cfg.speed_weight,
            earlier_weight=cfg.earlier_weight,
            seed=seed,
        )
        problem.description = f"{dataset}/{kind}/{model_name}/T{n_tasks}/K{sum(steps)}"
        return problem
