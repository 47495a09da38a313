"""One pure inner training step — forward, gradient, update — that ``torch.compile`` fuses.

:func:`make_step` turns an ``nn.Module``, a loss and an :class:`~metaopt.rules.UpdateRule`
into ``step(params, buffers, opt_state, batch) -> (params, buffers, opt_state, metrics)``.
The model runs through :func:`torch.func.functional_call` and the gradient comes from
:func:`torch.func.grad_and_value`, so the whole step is a pure function of tensors: Dynamo
captures it as one graph (``fullgraph=True``) and Inductor fuses the update arithmetic.

Hyper-parameters that change during training (a learning rate set by a schedule) must be
tensors, not Python numbers: Dynamo treats a Python float as a constant and recompiles
when it changes, while a 0-d tensor is a graph input. :func:`tensor_hyper` builds a rule
with tensor hyper-parameters that are changed in place; the schedules of
:mod:`metaopt.rules.schedules` are tensor expressions of the step count and never
recompile either.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
from torch import nn
from torch.func import functional_call, grad_and_value
from torch.utils import _pytree as pytree

from metaopt._own_cache import compile_own
from metaopt.rules.base import State, UpdateRule, apply_updates
from metaopt.tree import Params

__all__ = [
    "Batch",
    "InnerStep",
    "LossFn",
    "StepFn",
    "frozen_names",
    "loss_and_buffers",
    "make_step",
    "module_state",
    "raise_eager_error",
    "tensor_hyper",
    "trainable_params",
    "update_step",
    "write_into",
]

Batch = tuple[Any, torch.Tensor]
"""``(inputs, targets)``: ``model(inputs)`` is compared with ``targets`` by the loss."""

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``loss_fn(outputs, targets) -> 0-d loss``, e.g. :func:`torch.nn.functional.cross_entropy`."""

StepFn = Callable[
    [Params, Params, State, Batch], tuple[Params, Params, State, dict[str, torch.Tensor]]
]
"""``step(params, buffers, opt_state, batch) -> (params, buffers, opt_state, metrics)``."""


def module_state(model: nn.Module) -> tuple[Params, Params]:
    """``(params, buffers)`` of ``model`` as detached tensors sharing its storage.

    Returns:
        ``params``: ``{name: tensor}`` of ``model.named_parameters()``; ``buffers``:
        ``{name: tensor}`` of ``model.named_buffers()`` (batchnorm running statistics).
    """
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = {name: b.detach() for name, b in model.named_buffers()}
    return params, buffers


def loss_and_buffers(
    model: nn.Module, loss_fn: LossFn, params: Params, buffers: Params, batch: Batch
) -> tuple[torch.Tensor, Params]:
    """The loss of ``model`` with ``params`` and ``buffers`` on ``batch``, computed purely.

    The module updates its buffers in place (batchnorm running statistics in training
    mode) or reassigns them (``self.count = self.count + 1``); it does so on fresh copies,
    which are returned, so ``buffers`` is untouched and the function stays pure (and
    differentiable under :mod:`torch.func` transforms).

    Returns:
        ``(loss, new_buffers)``: a 0-d loss and the updated buffers.
    """
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        got = type(batch).__name__
        if isinstance(batch, (tuple, list)):
            got += f" of length {len(batch)}"
        raise TypeError(f"batch must be an (inputs, targets) pair, got a {got}")
    inputs, targets = batch
    # one dict: functional_call writes into it the buffers the forward reassigns
    # (``self.count = self.count + 1``), which a dict merged from two it would lose
    tensors = {**params, **{name: b.clone() for name, b in buffers.items()}}
    outputs = functional_call(model, tensors, (inputs,))
    new_buffers = {name: tensors[name] for name in buffers}
    loss = loss_fn(outputs, targets)
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"loss_fn must return a 0-d loss tensor, got a {type(loss).__name__}")
    if loss.dim() != 0:
        raise ValueError(f"loss_fn must return a 0-d loss, got shape {tuple(loss.shape)}")
    return loss, new_buffers


def write_into(old: Any, new: Any) -> Any:
    """``new`` written into the tensors of ``old`` in place, leaf by leaf, where both are
    tensors of the same shape and dtype (and not the same tensor); other leaves, or all
    of ``new`` when the two trees differ in structure, are returned as they are.

    Returns:
        ``new``'s values, held in ``old``'s tensors where possible.
    """
    old_leaves, old_spec = pytree.tree_flatten(old)
    new_leaves, new_spec = pytree.tree_flatten(new)
    if old_spec != new_spec:
        return new
    out = []
    for o, n in zip(old_leaves, new_leaves, strict=True):
        donatable = (
            isinstance(o, torch.Tensor)
            and isinstance(n, torch.Tensor)
            and o is not n
            and o.shape == n.shape
            and o.dtype == n.dtype
            and o.device == n.device
        )
        if donatable:
            o.copy_(n)
        out.append(o if donatable else n)
    return pytree.tree_unflatten(out, old_spec)


def raise_eager_error(error: Exception, eager: Callable[..., Any], *args: Any) -> NoReturn:
    """Raise ``error``, raised by the compiled version of ``eager`` on ``args``, as the
    eager function would report the failure.

    A Python exception raised while Dynamo traces (a bad batch or loss, a state that does
    not match) reaches the caller as Dynamo's report of it (``Unsupported: Observed
    exception``). For such an error this first runs ``eager`` (the function uncompiled;
    it must not mutate its arguments) on ``args`` and raises its error, chained to
    ``error``; any other error, or one that ``eager`` does not reproduce, is raised as is.
    """
    # imported here: torch._dynamo costs seconds to import, and the compiled call that
    # raised ``error`` has imported it already
    from torch._dynamo.exc import TorchDynamoException

    if isinstance(error, TorchDynamoException):
        try:
            eager(*args)
        except Exception as eager_error:
            raise eager_error from error
    raise error


def frozen_names(model: nn.Module) -> frozenset[str]:
    """Names of ``model``'s parameters that do not require grad."""
    return frozenset(name for name, p in model.named_parameters() if not p.requires_grad)


def trainable_params(params: Params, frozen: frozenset[str]) -> Params:
    """The entries of ``params`` not named in ``frozen`` (those a step trains)."""
    return {k: v for k, v in params.items() if k not in frozen}


def update_step(
    model: nn.Module,
    loss_fn: LossFn,
    frozen: frozenset[str],
    rule: UpdateRule,
    params: Params,
    buffers: Params,
    opt_state: State,
    batch: Batch,
) -> tuple[Params, Params, State, torch.Tensor]:
    """One pure training step: ``(params, buffers, opt_state, loss)`` after it, ``loss``
    the loss before it. The parameters named in ``frozen`` enter the forward as they are:
    they are neither differentiated nor updated, and ``opt_state`` has no entry for them."""
    trainable = trainable_params(params, frozen)
    fixed = {k: v for k, v in params.items() if k in frozen}

    def loss(trainable: Params) -> tuple[torch.Tensor, Params]:
        return loss_and_buffers(model, loss_fn, {**trainable, **fixed}, buffers, batch)

    grads, (value, new_buffers) = grad_and_value(loss, has_aux=True)(trainable)
    updates, new_state = rule.update(grads, opt_state, trainable)
    new_params = {**params, **apply_updates(trainable, updates)}  # params' key order
    return new_params, new_buffers, new_state, value


def _pure_step(
    model: nn.Module, loss_fn: LossFn, rule: UpdateRule, donate: bool, frozen: frozenset[str]
) -> StepFn:
    """:func:`update_step` as a :data:`StepFn`, writing into its inputs if ``donate``."""

    def step(params: Params, buffers: Params, opt_state: State, batch: Batch):
        new_params, new_buffers, new_state, loss = update_step(
            model, loss_fn, frozen, rule, params, buffers, opt_state, batch
        )
        if donate:
            new_params = write_into(params, new_params)
            new_buffers = write_into(buffers, new_buffers)
            new_state = write_into(opt_state, new_state)
        return new_params, new_buffers, new_state, {"loss": loss}

    return step


@dataclass(frozen=True)
class InnerStep:
    """An inner training step; call it as ``step(params, buffers, opt_state, batch)``.

    Attributes:
        fn: the function that runs (compiled when ``compiled`` is true).
        eager: the same step without ``torch.compile`` (the reference for ``fn``).
        rule: the update rule it applies.
        compiled: whether ``fn`` is the ``torch.compile`` of ``eager``.
        donate: whether the step writes its results into the tensors passed in.
        frozen: names of the parameters that did not require grad when the step was
            built: they enter the forward unchanged, and have no optimizer state.
        pure: the step without ``torch.compile`` and without donation; when ``fn`` fails
            to compile, it runs on the same arguments so that the error raised is the
            step's own (a bad batch or loss), not Dynamo's report of it.
    """

    fn: StepFn
    eager: StepFn
    rule: UpdateRule
    compiled: bool
    donate: bool = False
    frozen: frozenset[str] = frozenset()
    pure: StepFn | None = None

    def __call__(
        self, params: Params, buffers: Params, opt_state: State, batch: Batch
    ) -> tuple[Params, Params, State, dict[str, torch.Tensor]]:
        """One step: returns new ``(params, buffers, opt_state, {"loss": 0-d loss})``.

        ``loss`` is the training loss *before* the update, on ``batch``.
        """
        try:
            return self.fn(params, buffers, opt_state, batch)
        except Exception as error:
            if self.pure is None:
                raise
            raise_eager_error(error, self.pure, params, buffers, opt_state, batch)

    def trainable(self, params: Params) -> Params:
        """The entries of ``params`` that the step trains (all but :attr:`frozen`)."""
        return trainable_params(params, self.frozen)

    def init(self, model: nn.Module) -> tuple[Params, Params, State]:
        """``(params, buffers, opt_state)`` to start from: :func:`module_state` of
        ``model`` (copies of it when the step donates its inputs, so that it never
        writes into ``model``) and the rule's initial state of the trainable parameters."""
        params, buffers = module_state(model)
        if self.donate:
            params, buffers = pytree.tree_map(torch.clone, (params, buffers))
        return params, buffers, self.rule.init(self.trainable(params))


def make_step(
    model: nn.Module,
    loss_fn: LossFn,
    rule: UpdateRule,
    *,
    compile: bool = True,
    donate: bool = False,
    **compile_kwargs: Any,
) -> InnerStep:
    """Build one pure training step ``(params, buffers, opt_state, batch) -> (params,
    buffers, opt_state, metrics)``.

    Args:
        model: the architecture; its own tensors are not used (parameters and buffers are
            arguments of the step) and never modified. Its ``training`` flag is read at
            each call (batchnorm uses batch statistics and updates its running statistics
            only in training mode). Its parameters that do not require grad now are
            frozen (:attr:`InnerStep.frozen`): the step neither differentiates nor updates
            them, and the optimizer state covers the others only, as ``torch.optim``
            skips parameters without a gradient.
        loss_fn: ``(outputs, targets) -> 0-d loss``.
        rule: the update rule. Give hyper-parameters that change during training as 0-d
            tensors (see :func:`tensor_hyper`) or as schedules, never as Python numbers
            that you rebuild the rule with: those recompile.
        compile: wrap the step in ``torch.compile`` (default) or run it eagerly.
        donate: write the new parameters, buffers and optimizer state into the tensors
            that were passed in, and return those (as JAX's ``donate_argnums``): the
            compiled step then updates them in place, one read and one write of each,
            instead of allocating new ones every step. The caller must not need the old
            values (:meth:`InnerStep.init` therefore returns copies of the model's
            tensors). ``False`` (default): a pure step, the inputs stay untouched.
        **compile_kwargs: passed to ``torch.compile``; ``fullgraph=True`` (the step has
            no graph break for the rules of :mod:`metaopt.rules`) and ``dynamic=False``
            (one graph per batch shape; Dynamo's dynamic shapes cannot trace dropout
            under :func:`torch.func.grad`) by default.

    Returns:
        An :class:`InnerStep`. ``metrics`` holds ``"loss"``, the 0-d training loss on the
        batch before the update.

    Example:
        >>> rule, hyper = tensor_hyper(metaopt.rules.adam, lr=1e-3)
        >>> step = make_step(model, torch.nn.functional.cross_entropy, rule)
        >>> params, buffers, state = step.init(model)
        >>> params, buffers, state, metrics = step(params, buffers, state, (x, y))
        >>> hyper["lr"].fill_(5e-4)          # new learning rate, no recompilation
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(rule, UpdateRule):
        raise TypeError(
            f"rule must be an UpdateRule (e.g. metaopt.rules.adam(lr=...)), got "
            f"{type(rule).__name__}; for a rule factory use tensor_hyper(factory, ...)"
        )
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if compile_kwargs and not compile:
        raise TypeError(f"compile_kwargs {sorted(compile_kwargs)} need compile=True")
    frozen = frozen_names(model)
    eager = _pure_step(model, loss_fn, rule, donate, frozen)
    if not compile:
        return InnerStep(eager, eager, rule, False, donate, frozen)
    compile_kwargs.setdefault("fullgraph", True)
    # static shapes: a batch of a new shape (a short last batch) costs one more static
    # graph. Dynamo's default made that recompilation's batch size symbolic, and torch
    # cannot trace dropout under torch.func.grad with symbolic sizes ("Cannot call
    # numel() on tensor with symbolic sizes"); it also shares that choice between all the
    # steps of a process, so one step's batch sizes broke another step's compilation.
    compile_kwargs.setdefault("dynamic", False)
    pure = _pure_step(model, loss_fn, rule, False, frozen) if donate else eager
    return InnerStep(
        compile_own(eager, **compile_kwargs), eager, rule, True, donate, frozen, pure
    )


def tensor_hyper(
    factory: Callable[..., UpdateRule],
    *,
    dtype: torch.dtype = torch.float32,
    **hyper: Any,
) -> tuple[UpdateRule, dict[str, torch.Tensor]]:
    """Build ``factory(**hyper)`` with every float hyper-parameter held in a 0-d tensor.

    Change a value in place (``tensors["lr"].fill_(1e-4)``) and the next step uses it (the
    rules of :mod:`metaopt.rules` read tensor hyper-parameters at every update); a
    compiled step does not recompile, because the tensor is a graph input.

    Args:
        factory: a rule factory such as :func:`metaopt.rules.adam`.
        dtype: dtype of the hyper-parameter tensors (float32 by default, so the values
            are rounded to float32: for a float64 model pass ``torch.float64``, or the
            steps drift from ``torch.optim``'s by about 1e-9 relative).
        **hyper: the factory's keyword arguments; Python floats become tensors, anything
            else (bools, tuples, ints) is passed unchanged.

    Returns:
        ``(rule, tensors)``: the rule and ``{name: 0-d tensor}`` of the converted values.
    """
    tensors = {
        name: torch.tensor(value, dtype=dtype)
        for name, value in hyper.items()
        if isinstance(value, float)
    }
    return factory(**{**hyper, **tensors}), tensors
