"""The meta-trainer: meta-train the learned rule on random continual task sequences.

Each meta-step draws ``tasks_per_step`` sequences from a :class:`TaskFamily`, estimates
the meta-gradient of the continual meta-objective (:mod:`metaopt.meta.objective`) with the
chosen estimator (truncated unrolling by default, or ES / PES), averages it (across
``torch.distributed`` ranks too), clips its global norm and takes an Adam step on the
:class:`~metaopt.learned.LearnedRuleNet` parameters. Every ``val_every`` steps the rule is
evaluated on fixed held-out sequences (images the meta-training never draws); the best
validation state is kept.

Checkpoints (``<out>/checkpoint.pt``) hold everything needed to continue exactly: step,
net weights, meta-optimiser state, RNG states (task sampler, torch), history and
best state. They are written atomically (temporary file + ``os.replace``), so a run
killed at any moment (even ``kill -9``) resumes from the last complete checkpoint and
continues as if never interrupted.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from metaopt._files import load_failure, replace_atomically
from metaopt.learned import LearnedRuleNet, learned_rule, load_pretrained, save_checkpoint
from metaopt.meta.compiled import CompiledContinualSteps
from metaopt.meta.distributed import DistributedContext, all_reduce_mean, shard
from metaopt.meta.es import ES, PES
from metaopt.meta.objective import ContinualProblem, evaluate_rule
from metaopt.meta.problem import MetaGradient, check_count
from metaopt.meta.tasks import FamilyConfig, TaskFamily
from metaopt.meta.unroll import Unrolled
from metaopt.rules import UpdateRule, adam
from metaopt.tree import Params

__all__ = ["CHECKPOINT_FORMAT", "MetaTrainer", "TrainConfig", "check_out_dir", "plot_history"]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "metaopt.meta.trainer/1"
ESTIMATORS = ("unrolled", "es", "pes")
_PAYLOAD_TYPES: dict[str, type] = {
    "step": int,
    "config": dict,
    "net": dict,
    "meta_optimizer": dict,
    "rng": dict,
    "history": list,
    "best": dict,
    "baseline": dict,
}


@dataclass
class TrainConfig:
    """Meta-training settings (all plain data, stored in checkpoints).

    Attributes:
        steps: meta-steps to reach.
        tasks_per_step: task sequences per meta-gradient (split across ranks).
        meta_lr: Adam learning rate of the meta-optimiser.
        clip: global-norm clip of the meta-gradient.
        inner_lr: the learned rule's ``lr`` in the inner loops (its default at use).
        estimator: ``"unrolled"``, ``"es"`` or ``"pes"``.
        truncation: unroll / PES window in inner steps (``None``: whole sequence).
        sigma, es_pairs: ES / PES perturbation scale and antithetic pairs.
        val_every: validate every this many meta-steps (and at step 0 and the end).
        val_tasks: number of fixed held-out validation sequences.
        ckpt_every: checkpoint every this many meta-steps (and at the end).
        seed: seeds the task sampler, the ES noise and the net initialisation.
        net: keyword arguments of :class:`LearnedRuleNet`.
        rule_options: extra keyword arguments of :func:`metaopt.learned.learned_rule`
            (plain data: ``aux_dtype`` by name, e.g. ``"float32"``). They are recorded in
            the exported rule's metadata (``train_config``) but not applied by
            ``LearnedOptimizer.from_pretrained``: pass the same options to it.
        family: the task family ranges (:class:`FamilyConfig` as a dict).
        init: start from this learned checkpoint instead of the Adam-identity
            initialisation: a shipped name (e.g. ``"default"``) or a ``.pt`` path (see
            :func:`metaopt.learned.load_pretrained`); its network must have the
            configuration ``net`` describes. ``None``: a fresh net seeded by ``seed``.
    """

    steps: int = 200
    tasks_per_step: int = 2
    meta_lr: float = 1e-3
    clip: float = 1.0
    inner_lr: float = 1e-3
    estimator: str = "unrolled"
    truncation: int | None = 20
    sigma: float = 0.01
    es_pairs: int = 4
    val_every: int = 20
    val_tasks: int = 8
    ckpt_every: int = 10
    seed: int = 0
    net: dict[str, Any] = field(default_factory=dict)
    rule_options: dict[str, Any] = field(default_factory=dict)
    family: dict[str, Any] = field(default_factory=lambda: FamilyConfig().to_dict())
    init: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.family, FamilyConfig):  # the form its docs name, as plain data
            self.family = self.family.to_dict()
        if not isinstance(self.family, dict):
            raise ValueError(
                "family must be a FamilyConfig or a dict of its fields, got "
                f"{type(self.family).__name__}"
            )
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        for name in ("steps", "tasks_per_step", "val_every", "val_tasks", "ckpt_every"):
            check_count(name, getattr(self, name))  # 1.5 steps ran 2
        if not self.clip > 0:
            raise ValueError(f"clip must be > 0, got {self.clip}")
        for name in ("meta_lr", "inner_lr", "sigma"):
            value = getattr(self, name)
            if not 0 < value < math.inf:
                raise ValueError(f"{name} must be finite and > 0, got {value}")
        if self.truncation is not None:
            check_count("truncation", self.truncation)
        check_count("es_pairs", self.es_pairs)
        # checked now, not when the first checkpoint is written after the first meta-steps
        try:
            json.dumps(asdict(self), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(
                "TrainConfig must hold plain data (numbers, strings, lists, dicts) that "
                f"its checkpoints can store: {exc}"
            ) from exc
        known = set(inspect.signature(learned_rule).parameters) - _SET_BY_THE_TRAINER
        unknown = set(self.rule_options) - known
        if unknown:
            raise ValueError(
                f"rule_options {sorted(unknown)} are no options of learned_rule "
                f"({sorted(known)})"
            )
        _family_config(self.family)  # the family's own checks, before any data is read
        self._check_rule()

    def _check_rule(self) -> None:
        """Build the learned rule these settings describe once (on the meta device, no
        random draws), so bad ``net`` or ``rule_options`` values (an unknown
        ``aux_dtype`` name, ``topk_fraction=5``) fail now, not after the data loads."""
        options = self.learned_rule_options()
        try:
            with torch.device("meta"):
                net = LearnedRuleNet(**self.net)
        except TypeError as exc:
            raise ValueError(f"net: {exc}") from exc
        try:
            learned_rule(net, self.inner_lr, **options)
        except ValueError as exc:
            raise ValueError(f"rule_options: {exc}") from exc

    def learned_rule_options(self) -> dict[str, Any]:
        """``rule_options`` as :func:`~metaopt.learned.learned_rule` takes them: an
        ``aux_dtype`` given by name (``"float32"``, plain data for the checkpoints) as the
        ``torch.dtype``."""
        options = dict(self.rule_options)
        if isinstance(options.get("aux_dtype"), str):
            dtype = getattr(torch, options["aux_dtype"], None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"rule_options: no torch dtype {options['aux_dtype']!r}")
            options["aux_dtype"] = dtype
        return options

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (tuples become lists)."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys are rejected."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {sorted(unknown)}")
        return cls(**data)


_SET_BY_THE_TRAINER = frozenset(
    {"net", "lr", "meta_params", "depth", "inplace_state", "workspace", "importance_free"}
)
"""Arguments of :func:`~metaopt.learned.learned_rule` that the trainer gives itself, so
no ``rule_options``."""


def _family_config(data: dict[str, Any]) -> FamilyConfig:
    """The :class:`FamilyConfig` of a config's plain-data ``family`` (``ValueError`` for
    unknown fields or values it refuses)."""
    unknown = set(data) - {f.name for f in fields(FamilyConfig)}
    if unknown:
        raise ValueError(f"family: unknown FamilyConfig fields {sorted(unknown)}")
    tuples = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    if "model_sizes" in tuples:
        tuples["model_sizes"] = {
            name: {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()}
            for name, kw in tuples["model_sizes"].items()
        }
    return FamilyConfig(**tuples)


def _comparable(config: TrainConfig) -> dict[str, Any]:
    """``config`` as plain data with every default filled in (the family's too) and
    without ``steps``, so a checkpoint written before a field existed compares equal
    when the field has its default."""
    data = config.to_dict()
    data["family"] = json.loads(json.dumps(_family_config(data["family"]).to_dict()))
    data.pop("steps")
    return data


def _load_init(net: LearnedRuleNet, name: str) -> None:
    """Copy the weights of the learned checkpoint ``name`` into ``net`` (same config)."""
    start = load_pretrained(name)
    if start.config != net.config:
        differs = sorted(k for k in net.config if start.config.get(k) != net.config[k])
        raise ValueError(
            f"init checkpoint {name!r} has another network configuration than "
            f"TrainConfig.net (differs in {differs})"
        )
    net.load_state_dict(start.state_dict())


def check_out_dir(path: Path) -> None:
    """Raise ``ValueError`` unless ``path`` is, or can be made, a writable directory: the
    nearest existing ancestor (or ``path`` itself) must be a writable directory, so that
    the first checkpoint does not fail after the training it was meant to keep."""
    for existing in (path, *path.absolute().parents):
        if existing.exists():
            if not existing.is_dir():
                raise ValueError(f"output folder {path}: {existing} is not a directory")
            try:  # a file made there, not os.access: that says yes to root, /proc included
                tempfile.TemporaryFile(dir=existing).close()
            except OSError as exc:
                raise ValueError(
                    f"output folder {path}: {existing} is not writable ({exc})"
                ) from None
            return


class MetaTrainer:
    """Meta-trains a :class:`LearnedRuleNet` (Python API of ``metaopt meta-train``).

    Args:
        config: the settings.
        out_dir: where ``checkpoint.pt``, ``history.json`` and ``curves.png`` go.
        ctx: distributed context (default: single process).
        data_dir: MNIST folder (only read when the family uses MNIST).
        progress: show a tqdm progress bar (main rank only).
        compile: run the unrolled estimator's inner steps through ``torch.compile``
            (:class:`~metaopt.meta.compiled.CompiledContinualSteps`): the same
            meta-gradients up to float rounding, faster per meta-step once each shape
            signature (dataset x model x batch size of the family) has compiled, which
            takes minutes each on a CPU (see ``docs/meta.md``). Unrolled estimator only.
        device: where the net, the inner models and their data live (``"cuda"``...);
            task sequences are drawn on the CPU and then moved, so a run draws the same
            sequences on any device. Not part of the configuration: a run may resume on
            another device. Default: the CPU.

    Example:
        >>> trainer = MetaTrainer(TrainConfig(steps=100), "runs/a")
        >>> trainer.resume()            # no-op when there is no checkpoint yet
        >>> trainer.train()
        >>> trainer.export("default.pt", {"description": "..."})
    """

    def __init__(
        self,
        config: TrainConfig,
        out_dir: str | Path,
        ctx: DistributedContext | None = None,
        data_dir: str | None = None,
        progress: bool = True,
        compile: bool = False,
        device: str | torch.device | None = None,
    ) -> None:
        self.device = torch.device("cpu" if device is None else device)
        if self.device.type == "meta":
            raise ValueError("device 'meta' holds no values to train on")
        try:  # an unavailable device fails here, before any work
            torch.empty(0, device=self.device)
        except (RuntimeError, AssertionError) as exc:  # AssertionError: torch without CUDA
            raise ValueError(f"device {str(self.device)!r} is not available: {exc}") from None
        if compile and config.estimator != "unrolled":
            raise ValueError(
                f"compile=True needs the unrolled estimator, got estimator={config.estimator!r}"
            )
        self.out_dir = Path(out_dir)
        check_out_dir(self.out_dir)
        self.config = config
        self.compile = compile
        self.ctx = ctx or DistributedContext()
        self.progress = progress
        family_config = _family_config(config.family)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.net = LearnedRuleNet(**config.net)
        if config.init is not None:  # a bad checkpoint fails before any data is loaded
            _load_init(self.net, config.init)
        self.net.to(self.device)
        self.family = TaskFamily(family_config, "train", data_dir)
        self.val_family = TaskFamily(family_config, "val", data_dir)
        self.meta_optimizer = torch.optim.Adam(self.net.parameters(), lr=config.meta_lr)
        self.sampler = torch.Generator().manual_seed(config.seed)
        self.noise = torch.Generator()  # reseeded per task sample (see meta_gradient)
        self.estimator = self._make_estimator()
        val_gen = torch.Generator().manual_seed(10_000 + config.seed)
        self.val_problems = [
            self.val_family.sample(val_gen).to(self.device) for _ in range(config.val_tasks)
        ]
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {}
        self.baseline: dict[str, float] = {}

    # ------------------------------------------------------------------ pieces
    def rule_fn(self, meta_params: Params):
        """The learned rule with ``meta_params`` in place of the net's parameters."""
        options = self.config.learned_rule_options()
        return learned_rule(self.net, self.config.inner_lr, meta_params=meta_params, **options)

    def _make_estimator(self) -> Callable[[Params, ContinualProblem], MetaGradient]:
        cfg = self.config
        if cfg.estimator == "unrolled":
            steps = CompiledContinualSteps(self.rule_fn) if self.compile else None
            return Unrolled(self.rule_fn, cfg.truncation, step_fn=steps)
        if cfg.estimator == "es":
            return ES(self.rule_fn, cfg.sigma, cfg.es_pairs, self.noise)
        return PES(self.rule_fn, cfg.truncation, cfg.sigma, cfg.es_pairs, self.noise)

    def meta_params(self) -> Params:
        """The current meta-parameters ``{name: tensor}`` (the net's parameters)."""
        return dict(self.net.named_parameters())

    def meta_gradient(
        self, problems: list[ContinualProblem], noise_seeds: list[int] | None = None
    ) -> tuple[torch.Tensor, Params]:
        """Mean meta-loss and meta-gradient over ``problems`` (this rank computes its
        share; the result is the all-reduced mean over every rank).

        ``noise_seeds[i]`` seeds the ES/PES noise of problem ``i``, so the result does not
        depend on how the problems are split across ranks.

        A problem whose meta-loss or meta-gradient is not finite (an unrolled trajectory
        that overflowed) is left out of the mean instead of spoiling it (logged); when
        every problem is left out, the result is NaN.
        """
        loss, grads, _ = self._meta_gradient(problems, noise_seeds)
        return loss, grads

    def _meta_gradient(
        self, problems: list[ContinualProblem], noise_seeds: list[int] | None
    ) -> tuple[torch.Tensor, Params, int]:
        """:meth:`meta_gradient` and the number of problems left out (all ranks)."""
        mp = self.meta_params()
        sums = {k: torch.zeros_like(v) for k, v in mp.items()}
        loss_sum = torch.zeros((), dtype=torch.float64)
        seeds = noise_seeds or list(range(len(problems)))
        used = torch.zeros((), dtype=torch.float64)
        for problem, seed in shard(list(zip(problems, seeds, strict=True)), self.ctx):
            self.noise.manual_seed(seed)
            result = self.estimator(mp, problem)
            loss = float(result.loss)
            finite = math.isfinite(loss) and all(
                bool(torch.isfinite(g).all()) for g in result.grads.values()
            )
            if finite:
                for k, g in result.grads.items():
                    sums[k] += g
                loss_sum += loss
                used += 1
        if self.ctx.world_size > 1:
            dist.all_reduce(used, op=dist.ReduceOp.SUM)
        dropped = len(problems) - int(used)
        if dropped:
            logger.warning(
                "meta-step %d: %d of %d sequences had a non-finite meta-gradient; left out",
                self.step + 1,
                dropped,
                len(problems),
            )
        if dropped == len(problems):  # nothing to average
            nan = {k: torch.full_like(v, math.nan) for k, v in sums.items()}
            return torch.tensor(math.nan), nan, dropped
        grads, loss = all_reduce_mean(sums, loss_sum, int(used), self.ctx)
        return loss, grads, dropped

    def train_step(self) -> dict[str, float]:
        """One meta-step; returns its record (meta-loss, gradient norm, skipped: no update
        because no sequence had a finite meta-gradient, dropped: sequences left out)."""
        problems = [
            self.family.sample(self.sampler).to(self.device)
            for _ in range(self.config.tasks_per_step)
        ]
        seeds = torch.randint(2**62, (len(problems),), generator=self.sampler).tolist()
        loss, grads, dropped = self._meta_gradient(problems, seeds)
        finite = all(bool(torch.isfinite(g).all()) for g in grads.values())
        record = {
            "step": self.step + 1,
            "meta_loss": float(loss),
            "skipped": not finite,
            "dropped": dropped,
        }
        if finite:
            for name, p in self.net.named_parameters():
                p.grad = grads[name].to(p.dtype)
            norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.config.clip)
            self.meta_optimizer.step()
            self.meta_optimizer.zero_grad(set_to_none=True)
            record["grad_norm"] = float(norm)
        else:
            logger.warning("meta-step %d: non-finite meta-gradient, update skipped", self.step + 1)
        self.step += 1
        return record

    def validate(self, rule=None) -> dict[str, float]:
        """Mean ``evaluate_rule`` metrics over the validation sequences (all ranks)."""
        options = self.config.learned_rule_options()
        rule = rule or learned_rule(self.net, self.config.inner_lr, **options)
        keys = ("meta_loss", "acc", "bwt_loss")
        sums = {k: torch.zeros(1, dtype=torch.float64) for k in keys}
        with torch.no_grad():
            for problem in shard(self.val_problems, self.ctx):
                metrics = evaluate_rule(rule, problem)
                for k in keys:
                    sums[k] += metrics[k]
        means, _ = all_reduce_mean(sums, torch.zeros(()), len(self.val_problems), self.ctx)
        return {k: float(v) for k, v in means.items()}

    # ------------------------------------------------------------------ loop
    def train(self, steps: int | None = None) -> dict[str, Any]:
        """Meta-train until ``steps`` (default ``config.steps``) meta-steps are done.

        Ctrl-C (SIGINT) in a single-process run finishes the current meta-step, writes a
        checkpoint and then raises ``KeyboardInterrupt``, so no finished step is lost; a
        second Ctrl-C stops at once. (Distributed runs keep the default handling: ranks
        would stop at different steps.)

        Returns:
            The best validation record (``{"step", "meta_loss", "acc", ...}``).

        Raises:
            TypeError: ``steps`` is not an integer.
            ValueError: ``steps < 1``.
        """
        target = self.config.steps if steps is None else check_count("steps", steps)
        if not self.baseline:
            self.baseline = {"adam": self.validate(self._adam())}
        if not self.history:
            self._record_validation()
        bar = tqdm(
            total=target,
            initial=self.step,
            desc="meta-train",
            disable=not (self.progress and self.ctx.is_main),
        )
        with _deferred_interrupt(self.ctx.world_size == 1) as interrupted:
            while self.step < target:
                start = time.perf_counter()
                record = self.train_step()  # ends with the loss on the host: synchronised
                seconds = time.perf_counter() - start  # logged only: histories stay equal
                self.history.append(record)
                bar.update(1)
                bar.set_postfix(meta_loss=f"{record['meta_loss']:.4f}")
                logger.debug(
                    "meta-step %d: meta-loss %.5f, %.2f s",
                    record["step"],
                    record["meta_loss"],
                    seconds,
                )
                if self.step % self.config.val_every == 0 or self.step == target:
                    self._record_validation()
                stop = interrupted()  # read once: a Ctrl-C from here on waits for the next step
                if self.step % self.config.ckpt_every == 0 or self.step == target or stop:
                    self.save()
                if stop:
                    bar.close()
                    logger.warning(
                        "interrupted: checkpoint of meta-step %d written to %s; the same "
                        "command resumes from it",
                        self.step,
                        self.checkpoint_path,
                    )
                    raise KeyboardInterrupt
        bar.close()
        return self.best

    def fingerprint(self) -> dict[str, Any]:
        """Plain data that the processes of one distributed run share: the meta-step
        reached, the configuration and a checksum of the net (see
        :func:`metaopt.meta.distributed.check_ranks_agree`)."""
        return {
            "step": self.step,
            "config": self.config.to_dict(),
            "net": [float(v.double().sum()) for v in self.net.state_dict().values()],
        }

    def _adam(self) -> UpdateRule:
        """The baseline: Adam with the inner lr and the ``betas`` and ``eps`` of
        ``rule_options`` (the rule the learned one equals at its identity initialisation)."""
        options = self.config.rule_options
        same = {k: options[k] for k in ("betas", "eps") if k in options}
        return adam(self.config.inner_lr, **same)

    def _record_validation(self) -> None:
        val = self.validate()
        record = {"step": self.step, **{f"val_{k}": v for k, v in val.items()}}
        self.history.append(record)
        logger.info(
            "step %d: validation meta-loss %.4f, acc %.3f (Adam: %.4f, %.3f)",
            self.step,
            val["meta_loss"],
            val["acc"],
            self.baseline["adam"]["meta_loss"],
            self.baseline["adam"]["acc"],
        )
        if not self.best or val["meta_loss"] < self.best["meta_loss"]:
            state = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
            self.best = {"step": self.step, **val, "state": state}

    def heldout_comparison(self, n_sequences: int, seed: int = 777) -> dict[str, dict[str, float]]:
        """Best-validation rule vs Adam (same lr) on ``n_sequences`` FRESH sequences drawn
        from the validation images with another seed (not the ones used to pick the best
        state), so the comparison carries no selection bias.

        Returns:
            ``{"learned": metrics, "adam": metrics}`` with mean ``evaluate_rule`` metrics
            and ``"win_rate"`` (fraction of sequences where the learned rule's meta-loss
            is lower) in the learned entry.
        """
        if n_sequences < 1:
            raise ValueError(f"n_sequences must be >= 1, got {n_sequences}")
        net = LearnedRuleNet(**self.config.net).to(self.device)
        net.load_state_dict(self.best.get("state") or self.net.state_dict())
        rules = {
            "learned": learned_rule(
                net, self.config.inner_lr, **self.config.learned_rule_options()
            ),
            "adam": self._adam(),
        }
        gen = torch.Generator().manual_seed(seed)
        problems = [self.val_family.sample(gen).to(self.device) for _ in range(n_sequences)]
        results: dict[str, list[dict[str, float]]] = {name: [] for name in rules}
        with torch.no_grad():
            for problem in problems:
                for name, rule in rules.items():
                    results[name].append(evaluate_rule(rule, problem))
        out = {
            name: {k: sum(r[k] for r in rs) / len(rs) for k in rs[0]}
            for name, rs in results.items()
        }
        wins = sum(
            a["meta_loss"] < b["meta_loss"]
            for a, b in zip(results["learned"], results["adam"], strict=True)
        )
        out["learned"]["win_rate"] = wins / n_sequences
        return out

    # ------------------------------------------------------------------ persistence
    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / "checkpoint.pt"

    def save(self) -> Path | None:
        """Write the checkpoint, ``history.json`` and ``curves.png`` atomically (main rank)."""
        if not self.ctx.is_main:
            return None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        payload = {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "config": self.config.to_dict(),
            "net": self.net.state_dict(),
            "meta_optimizer": self.meta_optimizer.state_dict(),
            "rng": {
                "sampler": self.sampler.get_state(),
                "torch": torch.get_rng_state(),
            },
            "history": self.history,
            "best": self.best,
            "baseline": self.baseline,
        }
        with replace_atomically(self.checkpoint_path) as handle:
            torch.save(payload, handle)
        with replace_atomically(self.out_dir / "history.json", "w") as handle:
            json.dump({"baseline": self.baseline, "history": self.history}, handle, indent=1)
        plot_history(self.history, self.baseline, self.out_dir / "curves.png")
        return self.checkpoint_path

    def resume(self, path: str | Path | None = None) -> bool:
        """Load ``path``, or ``<out>/checkpoint.pt`` if it exists (``path=None``).

        Returns:
            True when a checkpoint was loaded.

        Raises:
            ValueError: the file cannot be read (cut short, not a checkpoint), is not a
                meta-trainer checkpoint, lacks an entry or holds states that do not fit,
                or was written with another configuration. Everything is checked before
                anything is loaded, so the trainer is unchanged then.
        """
        if path is None:
            path = self.checkpoint_path
            if not path.is_file():
                return False
        elif not Path(path).is_file():
            raise FileNotFoundError(f"no checkpoint at {path}")
        path = Path(path)
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises RuntimeError, EOFError, OSError, KeyError...
            raise ValueError(
                f"{path} is not a readable checkpoint (cut short or corrupt?): "
                f"{load_failure(exc)}"
            ) from exc
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint")
        self._check_payload(path, payload)
        try:
            saved = _comparable(TrainConfig.from_dict(dict(payload["config"])))
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"{path} holds a configuration this version cannot read: {exc}"
            ) from exc
        mine = _comparable(self.config)
        if saved != mine:
            diff = sorted(k for k in mine if saved.get(k) != mine[k])
            raise ValueError(f"{path} was written with another configuration (differs in {diff})")
        self._check_states(path, payload)
        self.net.load_state_dict(payload["net"])
        self.meta_optimizer.load_state_dict(payload["meta_optimizer"])
        self.sampler.set_state(payload["rng"]["sampler"])
        torch.set_rng_state(payload["rng"]["torch"])
        self.step = int(payload["step"])
        self.history = list(payload["history"])
        self.best = dict(payload["best"])
        self.baseline = dict(payload["baseline"])
        logger.info("resumed from %s at meta-step %d", path, self.step)
        return True

    @staticmethod
    def _check_payload(path: Path, payload: dict[str, Any]) -> None:
        """Every entry of a checkpoint is present with the right type (else ValueError)."""
        for key, kind in _PAYLOAD_TYPES.items():
            if not isinstance(payload.get(key), kind):
                raise ValueError(
                    f"{path} is an incomplete checkpoint: {key!r} is missing or not a "
                    f"{kind.__name__}"
                )
        if payload["step"] < 0 or not all(
            isinstance(payload["rng"].get(k), torch.Tensor) for k in ("sampler", "torch")
        ):
            raise ValueError(f"{path} is an incomplete checkpoint: bad 'step' or 'rng' entry")

    def _check_states(self, path: Path, payload: dict[str, Any]) -> None:
        """Load the net, meta-optimiser and generator states into scratch copies, so that
        one that does not fit fails before the trainer is touched."""
        try:
            with torch.random.fork_rng(devices=[]):
                net = LearnedRuleNet(**self.config.net)
            net.load_state_dict(payload["net"])
            optimizer = torch.optim.Adam(net.parameters(), lr=self.config.meta_lr)
            optimizer.load_state_dict(payload["meta_optimizer"])
            for state in payload["rng"].values():
                torch.Generator().set_state(state)
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
            raise ValueError(f"{path} holds a state that does not fit this trainer: {exc}") from exc

    def export(self, path: str | Path, metadata: dict[str, Any], best: bool = True) -> Path:
        """Save the best-validation (or current) net with
        :func:`metaopt.learned.save_checkpoint`; ``metadata`` is completed with the
        training facts (steps, validation numbers, family, config)."""
        net = LearnedRuleNet(**self.config.net)
        state = self.best.get("state") if best and self.best else self.net.state_dict()
        net.load_state_dict(state)
        facts = {
            "meta_trained": True,
            "meta_steps": self.step,
            "best_step": self.best.get("step"),
            "val_meta_loss": self.best.get("meta_loss"),
            "val_acc": self.best.get("acc"),
            "adam_val_meta_loss": self.baseline.get("adam", {}).get("meta_loss"),
            "adam_val_acc": self.baseline.get("adam", {}).get("acc"),
            "train_config": self.config.to_dict(),
        }
        return save_checkpoint(net, path, {**facts, **metadata})


def plot_history(
    history: list[dict[str, Any]], baseline: dict[str, Any], path: str | Path
) -> Path:
    """Plot meta-training curves (train meta-loss, validation meta-loss and accuracy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["meta_loss"]) for r in history if "meta_loss" in r]
    val = [r for r in history if "val_meta_loss" in r]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    if train:
        steps, losses = zip(*train, strict=True)
        axes[0].plot(steps, losses, alpha=0.35, label="train (per step)")
        window = max(1, len(losses) // 20)
        if window > 1:
            smooth = [
                sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) :
                                                                         i + 1])
                for i in range(len(losses))
            ]
            axes[0].plot(steps, smooth, label=f"train (mean of {window})")
    if val:
        axes[0].plot([r["step"] for r in val], [r["val_meta_loss"] for r in val], "o-",
                     label="validation")
        axes[1].plot([r["step"] for r in val], [r["val_acc"] for r in val], "o-",
                     label="learned rule")
    adam_val = baseline.get("adam")
    if adam_val:
        axes[0].axhline(adam_val["meta_loss"], color="k", ls="--", label="Adam (validation)")
        axes[1].axhline(adam_val["acc"], color="k", ls="--", label="Adam")
    axes[0].set(xlabel="meta-step", ylabel="meta-loss", title="continual meta-objective")
    axes[1].set(xlabel="meta-step", ylabel="held-out accuracy (end of sequence)",
                title="validation sequences")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:  # nothing plotted yet: no empty legend
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    with replace_atomically(path) as handle:
        fig.savefig(handle, dpi=100, format="png")
    plt.close(fig)
    return path


@contextlib.contextmanager
def _deferred_interrupt(enabled: bool) -> Iterator[Callable[[], bool]]:
    """Within the block, the first SIGINT only sets a flag (read by the yielded function)
    and restores the previous handler, so a second one interrupts at once. Does nothing
    when not ``enabled``, outside the main thread (where handlers cannot be set) or when
    the process ignores SIGINT (``nohup``, background jobs)."""
    received: list[bool] = []
    previous = signal.getsignal(signal.SIGINT)
    if (
        not enabled
        or threading.current_thread() is not threading.main_thread()
        or previous is signal.SIG_IGN
    ):
        yield lambda: False
        return

    def handler(signum: int, frame: Any) -> None:
        received.append(True)
        signal.signal(signal.SIGINT, previous)
        logger.warning("Ctrl-C: stopping after this meta-step (press again to stop now)")

    signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(received)
    finally:
        signal.signal(signal.SIGINT, previous)
