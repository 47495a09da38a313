"""Benchmark suites: which streams, models and optimizer settings to run, and running them.

A *row* is the result of one run, keyed by ``(stream, model, setting, seed)``; rows are
plain dicts (JSON-ready) so that one optimizer can be re-run later and merged into an
existing results file without redoing the others.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from metaopt.continual.baselines import EWC, SI
from metaopt.continual.data import (
    DATASETS,
    N_CLASSES,
    check_dataset,
    check_dataset_name,
    dataset_classes,
    load_dataset,
)
from metaopt.continual.models import build_model
from metaopt.continual.runner import run_stream
from metaopt.continual.streams import (
    SCENARIOS,
    Task,
    n_outputs,
    permuted_stream,
    rotated_stream,
    split_stream,
    subsample,
    with_validation,
)

__all__ = [
    "OPTIMIZERS",
    "SUITES",
    "Budget",
    "Setting",
    "StreamSpec",
    "SuiteSpec",
    "build_stream",
    "check_stream",
    "learned_available",
    "make_optimizer",
    "n_runs",
    "optimizer_grid",
    "parse_stream",
    "row_key",
    "run_suite",
    "suite_from_preset",
]

logger = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam", "ewc", "si", "learned")
"""Optimizer names: plain SGD, Adam, EWC and SI (over Adam), the pretrained learned optimizer."""

KINDS = ("split", "permuted", "rotated")


@dataclass(frozen=True)
class StreamSpec:
    """A stream by name: ``<kind>-<dataset>[-<scenario>]``, e.g. ``split-mnist-domain``.

    Attributes:
        kind: ``"split"``, ``"permuted"`` or ``"rotated"``.
        dataset: one of :data:`metaopt.continual.data.DATASETS`, or a folder of IDX
            files in the data directory (see :func:`metaopt.continual.load_idx_dataset`).
        scenario: for split streams, ``"task"``, ``"domain"`` or ``"class"``.
        n_tasks: number of tasks.
    """

    kind: str
    dataset: str
    scenario: str | None = None
    n_tasks: int = 5

    def __post_init__(self) -> None:
        if self.n_tasks < 1:
            raise ValueError(f"stream {self.name!r}: n_tasks must be >= 1, got {self.n_tasks}")
        check_dataset_name(self.dataset)
        n_classes = N_CLASSES.get(self.dataset)
        if self.kind == "split" and n_classes is not None and n_classes % self.n_tasks:
            raise ValueError(
                f"stream {self.name!r}: {n_classes} classes cannot be split into "
                f"{self.n_tasks} equal tasks"
            )

    @property
    def name(self) -> str:
        """The canonical name, ``<kind>-<dataset>[-<scenario>]``."""
        parts = [self.kind, self.dataset] + ([self.scenario] if self.scenario else [])
        return "-".join(parts)


def parse_stream(name: str, n_tasks: int | None = None) -> StreamSpec:
    """Parse ``<kind>-<dataset>[-<scenario>]`` (split streams need a scenario).

    ``dataset`` is a name of :data:`metaopt.continual.data.DATASETS` or the folder of a
    dataset of IDX files in the data directory (``split-kmnist-domain`` reads
    ``<data dir>/kmnist/``; whether its files exist is checked when it is loaded, or by
    :func:`metaopt.continual.data.check_dataset`). ``n_tasks`` defaults to 5; split
    streams need it to divide the number of classes (of a folder's dataset: the labels
    found in its training file).
    """
    kind, _, rest = name.partition("-")
    scenario = None
    for candidate in SCENARIOS:  # one suffix only: a folder may be named "my-task"
        base = rest[: -len(candidate) - 1]
        # a scenario belongs to split streams; elsewhere "-task" is part of a folder's
        # name, unless what precedes it is a named dataset (then it is a mistake)
        if rest.endswith(f"-{candidate}") and (kind == "split" or base in DATASETS):
            rest, scenario = base, candidate
            break
    try:
        check_dataset_name(rest)
    except ValueError:
        rest = ""
    if kind not in KINDS or not rest:
        raise ValueError(
            f"unknown stream {name!r}: expected <kind>-<dataset>[-<scenario>] with kind in "
            f"{KINDS}, dataset in {DATASETS} or a folder of IDX files in the data directory, "
            f"scenario in {SCENARIOS}"
        )
    if (kind == "split") != (scenario is not None):
        raise ValueError(f"stream {name!r}: split streams (only) need a scenario {SCENARIOS}")
    return StreamSpec(kind, rest, scenario, 5 if n_tasks is None else n_tasks)


@dataclass(frozen=True)
class Budget:
    """Per-task training budget and data sizes.

    Attributes:
        n_train: training examples kept per task (``None``: all).
        n_val: validation examples held out from each task's training examples.
        n_test: test examples kept per task (``None``: all).
        epochs: passes over each task's training examples.
        steps: exact optimizer steps per task (overrides ``epochs``).
        batch_size: minibatch size.
    """

    n_train: int | None = 1000
    n_val: int = 100
    n_test: int | None = 500
    epochs: int = 1
    steps: int | None = None
    batch_size: int = 32

    def __post_init__(self) -> None:
        optional = ("n_train", "n_test", "steps")  # None: all examples / use epochs
        for name, value in dataclasses.asdict(self).items():
            if value is None and name in optional:
                continue
            if value is None or value < 1:
                allowed = ">= 1 or None" if name in optional else ">= 1"
                raise ValueError(f"budget: {name} must be {allowed}, got {value}")


def check_stream(spec: StreamSpec, data_dir: str | os.PathLike[str] | None = None) -> None:
    """Check, before any run, that ``spec``'s dataset files can be found and, for a split
    stream, that its classes divide into ``spec.n_tasks`` equal tasks (for a folder's
    dataset this reads its training labels).

    Raises:
        ValueError: the classes do not divide.
        metaopt.continual.data.DataFileError: a file is missing (the message says how to
            get it) or unreadable.
    """
    check_dataset(spec.dataset, data_dir)
    if spec.kind == "split":
        n_classes = dataset_classes(spec.dataset, data_dir)
        if n_classes % spec.n_tasks:
            raise ValueError(
                f"stream {spec.name!r}: the {n_classes} classes of {spec.dataset!r} cannot be "
                f"split into {spec.n_tasks} equal tasks (--n-tasks)"
            )


def build_stream(
    spec: StreamSpec, budget: Budget, seed: int, data_dir: str | None = None
) -> list[Task]:
    """Build a stream for one seed: load data, build tasks, subsample, hold out validation.

    Each task keeps ``n_train`` training examples (all but ``n_val`` if ``None``) and
    exactly ``n_val`` validation examples taken from its training data. Permutations,
    angles and subsamples depend on ``seed``; split class order is the standard sorted
    one (``0:1, 2:3, ...``).

    Raises:
        ValueError: a task has no test examples, or no more than ``n_val`` training
            examples.
    """
    x_train, y_train = load_dataset(spec.dataset, data_dir, "train")
    x_test, y_test = load_dataset(spec.dataset, data_dir, "test")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(
            f"dataset {spec.dataset!r}: training images {tuple(x_train.shape[1:])} and test "
            f"images {tuple(x_test.shape[1:])} differ in shape"
        )
    gen = torch.Generator().manual_seed(seed)
    name = spec.name
    if spec.kind == "split":
        stream = split_stream(
            x_train,
            y_train,
            x_test,
            y_test,
            n_tasks=spec.n_tasks,
            scenario=spec.scenario or "task",
            name=name,
        )
    else:
        # Subsample before transforming: permuting/rotating all 60,000 images is wasted work.
        n_keep_train = None if budget.n_train is None else budget.n_train + budget.n_val
        (only,) = subsample(
            [Task("all", x_train, y_train, x_test, y_test, int(y_train.max()) + 1, 0)],
            n_keep_train and n_keep_train * spec.n_tasks,
            budget.n_test and budget.n_test * spec.n_tasks,
            seed=gen,
        )
        builder = permuted_stream if spec.kind == "permuted" else rotated_stream
        stream = builder(
            only.x_train,
            only.y_train,
            only.x_test,
            only.y_test,
            n_tasks=spec.n_tasks,
            seed=gen,
            name=name,
        )
    n_keep = None if budget.n_train is None else budget.n_train + budget.n_val
    stream = subsample(stream, n_keep, budget.n_test, seed=gen)
    for task in stream:
        if len(task.y_test) == 0:  # e.g. a dataset folder whose test files lack a class
            raise ValueError(f"stream {name!r}: task {task.name!r} has no test examples")
    smallest = min(len(t.y_train) for t in stream)
    if budget.n_val >= smallest:
        raise ValueError(
            f"stream {name!r}: a task has {smallest} training examples, too few to hold out "
            f"{budget.n_val} for validation and keep some for training"
        )
    # exactly n_val per task: the smallest task gives the fraction, n_max caps the others
    return with_validation(stream, budget.n_val / smallest, n_max=budget.n_val, seed=gen)


@dataclass(frozen=True)
class Setting:
    """One optimizer with fixed hyper-parameters, e.g. ``Setting("adam", {"lr": 1e-3})``.

    ``checkpoint`` (learned optimizer only) is a shipped checkpoint name or a ``.pt`` path;
    a checkpoint other than ``"default"`` makes a separate family ``learned[<stem>]``.
    """

    optimizer: str
    hyper: dict[str, float] = field(default_factory=dict)
    checkpoint: str = "default"

    @property
    def family(self) -> str:
        """What the tables compare: the optimizer name, or ``learned[<checkpoint stem>]``."""
        if self.optimizer == "learned" and self.checkpoint != "default":
            return f"learned[{Path(self.checkpoint).stem}]"
        return self.optimizer

    @property
    def label(self) -> str:
        """Short unique label, e.g. ``"adam lr=0.001"`` or ``"learned"``."""
        items = " ".join(f"{k}={v:g}" for k, v in sorted(self.hyper.items()))
        return f"{self.family} {items}".strip()


def learned_available(checkpoint: str = "default") -> bool:
    """Whether :class:`metaopt.optim.LearnedOptimizer` and ``checkpoint`` (a shipped name or
    a ``.pt`` path) load; a missing or unreadable checkpoint is logged as a warning."""
    try:
        from metaopt.learned import load_pretrained
        from metaopt.optim import LearnedOptimizer  # noqa: F401

        load_pretrained(checkpoint)
    except ImportError as exc:
        logger.debug("learned optimizer unavailable: %s", exc)
        return False
    except (OSError, RuntimeError, ValueError) as exc:  # CheckpointError is a ValueError
        logger.warning("learned optimizer checkpoint %r unusable: %s", checkpoint, exc)
        return False
    return True


def make_optimizer(setting: Setting) -> Callable[..., torch.optim.Optimizer]:
    """An optimizer factory ``(params) -> optimizer`` for a setting.

    ``ewc`` and ``si`` run over Adam with ``lr`` and penalty ``strength``; ``learned`` is
    ``LearnedOptimizer.from_pretrained(setting.checkpoint)`` with its default
    hyper-parameters unless the setting gives some.
    """
    hyper = dict(setting.hyper)
    name = setting.optimizer
    if name == "sgd":
        return functools.partial(torch.optim.SGD, **hyper)
    if name == "adam":
        return functools.partial(torch.optim.Adam, **hyper)
    if name == "ewc":
        return functools.partial(EWC, **hyper)
    if name == "si":
        return functools.partial(SI, **hyper)
    if name == "learned":
        from metaopt.optim import LearnedOptimizer

        return functools.partial(LearnedOptimizer.from_pretrained, setting.checkpoint, **hyper)
    raise ValueError(f"unknown optimizer {name!r}; expected one of {OPTIMIZERS}")


def optimizer_grid(
    optimizers: Sequence[str],
    lrs: Sequence[float],
    ewc_strengths: Sequence[float],
    si_strengths: Sequence[float],
    regularizer_lr: float = 1e-3,
    learned_checkpoint: str = "default",
) -> list[Setting]:
    """All settings swept: SGD and Adam over ``lrs``, EWC / SI over their strengths (Adam
    at ``regularizer_lr``), the learned optimizer once at its defaults (from
    ``learned_checkpoint``)."""
    settings = []
    for name in optimizers:
        if name in ("sgd", "adam"):
            settings += [Setting(name, {"lr": lr}) for lr in lrs]
        elif name in ("ewc", "si"):
            strengths = ewc_strengths if name == "ewc" else si_strengths
            settings += [Setting(name, {"lr": regularizer_lr, "strength": s}) for s in strengths]
        elif name == "learned":
            settings.append(Setting("learned", checkpoint=learned_checkpoint))
        else:
            raise ValueError(f"unknown optimizer {name!r}; expected one of {OPTIMIZERS}")
    return settings


@dataclass(frozen=True)
class SuiteSpec:
    """A full benchmark: streams x models x optimizer settings x seeds under one budget."""

    streams: tuple[StreamSpec, ...]
    models: tuple[str, ...]
    settings: tuple[Setting, ...]
    seeds: tuple[int, ...]
    budget: Budget


_LRS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)

SUITES: dict[str, dict[str, Any]] = {
    "quick": {
        "streams": ("split-digits-domain", "split-digits-task"),
        "models": ("mlp",),
        "optimizers": ("sgd", "adam", "ewc", "si", "learned"),
        "lrs": (1e-1, 1e-2, 1e-3),
        "ewc_strengths": (1e2, 1e4),
        "si_strengths": (1e0, 1e2),
        "seeds": (0, 1),
        "budget": Budget(n_train=None, n_val=40, n_test=None, epochs=3, batch_size=32),
    },
    "paper": {
        "streams": (
            "split-mnist-domain",
            "split-mnist-task",
            "permuted-mnist",
            "split-fashion-mnist-domain",
        ),
        "models": ("mlp", "cnn", "transformer"),
        "optimizers": ("sgd", "adam", "ewc", "si", "learned"),
        "lrs": _LRS,
        "ewc_strengths": (1e2, 1e4, 1e6),
        "si_strengths": (1e0, 1e2, 1e4),
        "seeds": (0, 1, 2),
        "budget": Budget(n_train=1000, n_val=100, n_test=250, epochs=1, batch_size=32),
    },
}
"""Presets for ``metaopt bench --suite``; see docs/continual.md for their budgets."""


def row_key(row: dict[str, Any]) -> tuple[str, str, str, int]:
    """The identity of a result row: ``(stream, model, setting label, seed)``."""
    return (row["stream"], row["model"], row["setting"], int(row["seed"]))


def _round(values: torch.Tensor) -> list[list[float]]:
    """A vector or matrix as nested lists of floats rounded to 5 decimals (rows)."""
    return [[round(float(v), 5) for v in row] for row in values.reshape(-1, values.shape[-1])]


def run_suite(
    suite: SuiteSpec,
    data_dir: str | None = None,
    *,
    skip: set[tuple[str, str, str, int]] | frozenset = frozenset(),
    on_start: Callable[[str], None] | None = None,
    device: str | torch.device | None = None,
) -> Iterator[dict[str, Any]]:
    """Run every (stream, model, setting, seed) not in ``skip``; yield one row per run.

    Rows hold the test and validation accuracy matrices (``R``, ``b``, ``R_val``,
    ``b_val``; accuracies in ``[0, 1]``), their metrics, the wall time in seconds and the
    budget. ``on_start(description)`` is called before each run (progress display);
    ``device`` is where the models train (default CPU).
    """
    # Seed-major order: an interrupted suite still covers every stream and model.
    for seed in suite.seeds:
        for spec in suite.streams:
            todo = [
                (model, setting)
                for model in suite.models
                for setting in suite.settings
                if (spec.name, model, setting.label, seed) not in skip
            ]
            if not todo:
                continue
            stream = build_stream(spec, suite.budget, seed, data_dir)
            shape = tuple(stream[0].x_train.shape[1:])
            for model, setting in todo:
                if on_start is not None:
                    on_start(f"{spec.name} {model} {setting.label} seed={seed}")
                result = run_stream(
                    functools.partial(build_model, model, shape, n_outputs(stream)),
                    make_optimizer(setting),
                    stream,
                    epochs=suite.budget.epochs,
                    steps=suite.budget.steps,
                    batch_size=suite.budget.batch_size,
                    seed=seed,
                    device=device,
                    named_parameters=True,
                )
                yield {
                    "stream": spec.name,
                    "model": model,
                    "optimizer": setting.family,
                    "setting": setting.label,
                    "hyper": setting.hyper,
                    "seed": seed,
                    "test": result.metrics(),
                    "val": result.val_metrics(),
                    "R": _round(result.R),
                    "b": _round(result.b)[0],
                    "R_val": None if result.R_val is None else _round(result.R_val),
                    "b_val": None if result.b_val is None else _round(result.b_val)[0],
                    "train_loss": [round(v, 5) for v in result.train_loss],
                    "seconds": round(result.seconds, 3),
                    "n_tasks": len(stream),
                    "budget": asdict(suite.budget),
                }


def suite_from_preset(name: str, **overrides: Any) -> SuiteSpec:
    """A :class:`SuiteSpec` from a preset of :data:`SUITES` with optional overrides
    (``streams``, ``models``, ``optimizers``, ``lrs``, ``ewc_strengths``, ``si_strengths``,
    ``seeds``, ``budget``, ``n_tasks``, ``learned_checkpoint``).

    ``learned`` is dropped (with a warning) when unavailable and only the preset asks for
    it; when ``optimizers`` or ``learned_checkpoint`` ask for it, that is an error.

    Raises:
        ValueError: unknown suite or stream, an unusable learned optimizer that was asked
            for, a stream, model, setting or seed listed twice, or a setting whose optimizer
            rejects its hyper-parameters (a negative learning rate or strength...).
    """
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; expected one of {sorted(SUITES)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    cfg = {**SUITES[name], **given}
    optimizers = tuple(cfg["optimizers"])
    checkpoint = cfg.get("learned_checkpoint", "default")
    if "learned" in optimizers and not learned_available(checkpoint):
        if "optimizers" in given or "learned_checkpoint" in given:
            raise ValueError(
                f"learned optimizer checkpoint {checkpoint!r} is not usable (see the warning "
                "above); drop 'learned' from the optimizers or give a working checkpoint"
            )
        logger.warning(
            "learned optimizer not available (no metaopt.optim.LearnedOptimizer or no "
            "%r checkpoint): running without it",
            checkpoint,
        )
        optimizers = tuple(o for o in optimizers if o != "learned")
    suite = SuiteSpec(
        streams=tuple(parse_stream(s, cfg.get("n_tasks")) for s in cfg["streams"]),
        models=tuple(cfg["models"]),
        settings=tuple(
            optimizer_grid(
                optimizers,
                cfg["lrs"],
                cfg["ewc_strengths"],
                cfg["si_strengths"],
                learned_checkpoint=checkpoint,
            )
        ),
        seeds=tuple(cfg["seeds"]),
        budget=cfg["budget"],
    )
    for what, names in (
        ("streams", [s.name for s in suite.streams]),
        ("models", suite.models),
        ("settings", [s.label for s in suite.settings]),
        ("seeds", suite.seeds),
    ):
        twice = sorted({n for n in names if list(names).count(n) > 1}, key=str)
        if twice:
            raise ValueError(f"duplicate {what} {twice}: each would run twice, stored once")
    probe = [torch.nn.Parameter(torch.zeros(1))]
    for setting in suite.settings:  # a bad value fails here, not after other settings' runs
        if setting.optimizer != "learned":  # loaded by learned_available above
            try:
                make_optimizer(setting)(probe)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"setting {setting.label!r}: {exc}") from exc
    return suite


def n_runs(suite: SuiteSpec) -> int:
    """Number of runs in a suite."""
    return math.prod((len(suite.streams), len(suite.models), len(suite.settings), len(suite.seeds)))
