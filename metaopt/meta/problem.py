"""What every meta-gradient estimator consumes: an inner problem and a rule factory.

An *inner problem* is one task sample: where the inner parameters start, the inner loss
at each step, the meta-loss contributions along the trajectory, and what happens to the
rule's state at each step (task boundaries, loss observations). An estimator runs an
update rule built from the meta-parameters on it and returns the meta-loss and its
gradient with respect to the meta-parameters::

    estimator(meta_params, problem) -> MetaGradient(loss, grads)

The meta-loss of a trajectory is ``sum_k problem.meta_loss(params_k+1, buffers, k)``
over the inner steps ``k`` whose contribution is not ``None``.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import torch
import torch.nn.functional as F

from metaopt.meta.functional import PureModel
from metaopt.rules.base import State, UpdateRule
from metaopt.tree import Params

__all__ = [
    "Estimator",
    "InnerProblem",
    "MetaGradient",
    "RuleFactory",
    "SupervisedProblem",
]

RuleFactory = Callable[[Params], UpdateRule]
"""``meta_params -> UpdateRule``: builds the inner rule from (possibly perturbed or
graph-carrying) meta-parameter tensors, e.g. ``lambda mp: metaopt.rules.sgd(lr=mp["lr"])``."""

Batch = tuple[torch.Tensor, torch.Tensor]


def check_count(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an ``int`` ``>= minimum`` (window lengths, pair counts).

    Raises:
        TypeError: ``value`` is not an integer (``2.5``, ``True``, ``"3"``).
        ValueError: ``value < minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_rule_fn(rule_fn: Any) -> Any:
    """``rule_fn`` if callable (``meta_params -> UpdateRule``); ``TypeError`` otherwise, at
    construction rather than at the first estimate."""
    if not callable(rule_fn):
        raise TypeError(
            f"rule_fn must be callable (meta_params -> UpdateRule), got {type(rule_fn).__name__}"
        )
    return rule_fn


def device_of(meta_params: Params) -> torch.device | None:
    """The device an estimator accumulates its loss on: the first meta-parameter's
    (``None`` when there is none)."""
    return next(iter(meta_params.values())).device if meta_params else None


def scalar_loss(value: torch.Tensor, what: str) -> torch.Tensor:
    """``value`` as a 0-d tensor; one holding several numbers (a loss per example, say)
    raises ``ValueError`` naming ``what`` (e.g. ``"problem.meta_loss"``)."""
    if value.numel() != 1:
        raise ValueError(
            f"{what} must return a 0-d tensor (one number), got shape {tuple(value.shape)}; "
            "reduce it (e.g. .mean())"
        )
    return value.reshape(())


class MetaGradient(NamedTuple):
    """An estimator's result: the meta-loss (0-d, detached) and ``{name: grad}`` with the
    shapes of the meta-parameters (zeros where the meta-loss does not depend on one)."""

    loss: torch.Tensor
    grads: Params


class InnerProblem:
    """One task sample for meta-training. Subclass and override the methods.

    Attributes:
        num_steps: number of inner updates in the trajectory.
    """

    num_steps: int = 1

    def init(self, meta_params: Params) -> tuple[Params, Params]:
        """Initial ``(params, buffers)``. Params must require grad; they may depend on
        ``meta_params`` (e.g. MAML's learned initialisation)."""
        raise NotImplementedError

    def inner_loss(self, params: Params, buffers: Params, step: int) -> tuple[torch.Tensor, Params]:
        """The training loss (0-d) at inner step ``step`` and the updated buffers."""
        raise NotImplementedError

    def meta_loss(self, params: Params, buffers: Params, step: int) -> torch.Tensor | None:
        """Meta-loss contribution after inner update ``step`` (0-d), or ``None``."""
        raise NotImplementedError

    def prepare_state(self, state: State, step: int, loss: torch.Tensor) -> State:
        """Rule state to use for update ``step`` given its inner ``loss`` (default: as is).

        Override to mark task boundaries (``metaopt.learned.new_task``) or to feed the
        loss to a rule that observes it.
        """
        return state


class Estimator(Protocol):
    """The shared estimator interface."""

    def __call__(self, meta_params: Params, problem: Any) -> MetaGradient: ...


class SupervisedProblem(InnerProblem):
    """Train a model on a sequence of batches; the meta-loss is the loss on a held-out
    batch after the last step (optionally after every step).

    Args:
        model: the module (or a :class:`PureModel`); its current weights are the start.
        batches: inner training batches ``(x, y)``, cycled over ``num_steps`` steps.
        meta_batch: the batch the meta-loss is measured on.
        num_steps: inner updates (default ``len(batches)``).
        loss_fn: ``(output, y) -> 0-d loss`` (default cross-entropy).
        every_step: add the meta-loss after every step (averaged) instead of only at the end.
        dtype: cast the model's floating tensors (e.g. ``torch.float64`` for checks).
        init_prefix: when set, meta-parameters named ``prefix + name`` replace the initial
            parameter ``name`` (learned initialisation, MAML). A meta-parameter with a
            non-empty prefix that names no parameter of the model is an error (a typo
            would otherwise get a zero meta-gradient), and so is one of another shape; one
            of another dtype is cast (differentiably) to the problem's. Frozen parameters
            (``requires_grad=False``) are not trained by the inner loop (see
            :class:`PureModel`).
    """

    def __init__(
        self,
        model: torch.nn.Module | PureModel,
        batches: Sequence[Batch],
        meta_batch: Batch,
        num_steps: int | None = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
        every_step: bool = False,
        dtype: torch.dtype | None = None,
        init_prefix: str | None = None,
    ) -> None:
        if not batches:
            raise ValueError("SupervisedProblem needs at least one inner batch")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
        self.model = model if isinstance(model, PureModel) else PureModel(model)
        self.batches = list(batches)
        self.meta_batch = meta_batch
        self.num_steps = (
            len(self.batches) if num_steps is None else check_count("num_steps", num_steps)
        )
        self.loss_fn = loss_fn
        self.every_step = every_step
        self.dtype = dtype
        self.init_prefix = init_prefix

    def init(self, meta_params: Params) -> tuple[Params, Params]:
        params, buffers = self.model.init(self.dtype)
        if self.init_prefix is not None:
            prefix = self.init_prefix
            known = self.model.parameter_names
            names = {k[len(prefix) :] for k in meta_params if k.startswith(prefix)}
            unknown = sorted(prefix + n for n in names - known)
            if unknown and prefix:
                raise ValueError(
                    f"meta-parameters {unknown} name no parameter of the model "
                    f"(init_prefix={prefix!r}; parameters: {sorted(known)})"
                )
            for name in names & known:
                tree = params if name in params else buffers
                value = meta_params[prefix + name]
                if value.shape != tree[name].shape:
                    raise ValueError(
                        f"meta-parameter {prefix + name!r} has shape {tuple(value.shape)}, "
                        f"parameter {name!r} has {tuple(tree[name].shape)}"
                    )
                tree[name] = value.to(tree[name].dtype)  # differentiable cast
        return params, buffers

    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype) if self.dtype is not None and x.is_floating_point() else x

    def inner_loss(self, params: Params, buffers: Params, step: int) -> tuple[torch.Tensor, Params]:
        x, y = self.batches[step % len(self.batches)]
        out, buffers = self.model(params, buffers, self._cast(x))
        return self.loss_fn(out, y), buffers

    def meta_loss(self, params: Params, buffers: Params, step: int) -> torch.Tensor | None:
        last = step == self.num_steps - 1
        if not (self.every_step or last):
            return None
        x, y = self.meta_batch
        out, _ = self.model(params, buffers, self._cast(x))
        loss = self.loss_fn(out, y)
        return loss / self.num_steps if self.every_step else loss
