"""A compiled meta-gradient step for the unrolled estimator, with bounded compile time.

Compiling a whole ``K``-step unroll (``torch.compile(torch.func.grad(unrolled_loss))``)
inlines the Python loop: compile time grows with ``K`` (90-170 s for ``K = 10`` on a
2-core CPU), and ``torch.autograd.grad(create_graph=True)`` through compiled code is not
supported at all (aot_autograd has no double backward).

:func:`make_meta_step` compiles *one* inner step instead, and its vector-Jacobian product
(:func:`torch.func.vjp` over a step that itself calls :func:`torch.func.grad`, i.e.
Hessian-vector products), then runs reverse-mode accumulation through the ``K`` steps in
Python::

    forward:  z_{k+1} = step(theta, z_k, batch_k),    z = (params, opt_state)
    backward: (dz_k, dtheta_k) = vjp(step at z_k)(dz_{k+1}),   dtheta = sum_k dtheta_k

This is the same meta-gradient as backpropagating through the unroll (exact, not an
approximation) at the cost of one extra inner forward per step (the vjp recomputes its
step, like activation checkpointing), with three graphs compiled once whatever ``K``.
``steps_per_call = c`` makes the compiled step (and its vjp) ``c`` inner steps long, so
the fixed cost of a compiled call is paid ``K / c`` times instead of ``K`` (compile time
grows with ``c``, still not with ``K``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import grad_and_value, vjp
from torch.utils import _pytree as pytree

from metaopt._own_cache import compile_own
from metaopt.compile.step import (
    Batch,
    LossFn,
    frozen_names,
    loss_and_buffers,
    raise_eager_error,
    trainable_params,
    update_step,
)
from metaopt.rules.base import State, UpdateRule
from metaopt.tree import Params

__all__ = ["MetaStep", "MetaStepResult", "RuleFactory", "make_meta_step"]

RuleFactory = Callable[[dict[str, torch.Tensor]], UpdateRule]
"""``rule_factory(meta_params) -> UpdateRule``, e.g. ``lambda m: adam(lr=m["lr"])`` or
``lambda m: learned_rule(net, meta_params=m)``; it must use the tensors it is given."""


@dataclass
class MetaStepResult:
    """What a :class:`MetaStep` returns.

    Attributes:
        meta_loss: 0-d validation loss after the ``K`` inner steps.
        meta_grads: ``d meta_loss / d meta_params``, shaped like ``meta_params``.
        init_grads: ``d meta_loss / d params`` for the *starting* inner parameters (the
            MAML meta-gradient), shaped like ``params``.
        params, buffers, opt_state: the inner state after the ``K`` steps (detached), to
            continue a truncated unroll from.
        inner_losses: training loss of each inner step (before its update), shape ``[K]``.
    """

    meta_loss: torch.Tensor
    meta_grads: dict[str, torch.Tensor]
    init_grads: Params
    params: Params
    buffers: Params
    opt_state: State
    inner_losses: torch.Tensor


def _is_float(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex())


def _detached(tree: Any) -> Any:
    """``tree`` with every tensor leaf detached."""
    return pytree.tree_map(lambda x: x.detach() if isinstance(x, torch.Tensor) else x, tree)


RngState = list[tuple[torch.device, torch.Tensor]]
"""The states of the random-number generators of some devices."""


def _rng_state(devices: set[torch.device]) -> RngState:
    """The states of the CPU's generator and of those of ``devices``."""
    cpu = torch.device("cpu")
    states = [(cpu, torch.get_rng_state())]
    for device in sorted(devices - {cpu}, key=str):
        if device.type != "meta":
            states.append((device, torch.get_device_module(device).get_rng_state(device)))
    return states


def _set_rng_state(states: RngState) -> None:
    """Put the generators back into ``states`` (from :func:`_rng_state`)."""
    for device, state in states:
        if device.type == "cpu":
            torch.set_rng_state(state)
        else:
            torch.get_device_module(device).set_rng_state(state, device)


def _split_state(opt_state: State) -> tuple[list[torch.Tensor], list[Any], Any]:
    """Floating leaves of the state (differentiated), the other leaves, and the spec."""
    leaves, spec = pytree.tree_flatten(opt_state)
    floats = [x for x in leaves if _is_float(x)]
    others = [x for x in leaves if not _is_float(x)]
    return floats, others, spec


def _join_state(floats: list[torch.Tensor], others: list[Any], like: list[Any], spec: Any):
    f, o = iter(floats), iter(others)
    return pytree.tree_unflatten([next(f) if _is_float(x) else next(o) for x in like], spec)


def _compiled(fn: Callable[..., Any], **compile_kwargs: Any) -> Callable[..., Any]:
    """``fn`` compiled; when it fails to compile, ``fn`` (pure) runs eagerly to raise its
    own error (see :func:`~metaopt.compile.step.raise_eager_error`)."""
    compiled = compile_own(fn, **compile_kwargs)

    def call(*args: Any) -> Any:
        try:
            return compiled(*args)
        except Exception as error:
            raise_eager_error(error, fn, *args)

    return call


class _Pieces:
    """The three pure functions a meta step is made of (compiled or not)."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, rule_factory: RuleFactory):
        self.loss = functools.partial(loss_and_buffers, model, loss_fn)
        self.rule_factory = rule_factory
        self.frozen = frozen_names(model)
        # one inner step, frozen parameters left as they are: (rule, params, buffers,
        # opt_state, batch) -> (params, buffers, opt_state, loss)
        self.step = functools.partial(update_step, model, loss_fn, self.frozen)

    def inner(self, meta: dict, params: Params, buffers: Params, opt_state: State, batches):
        """``len(batches)`` inner steps: ``(params, buffers, opt_state, losses)`` after
        them, ``losses[i]`` the training loss of step ``i`` before its update."""
        rule = self.rule_factory(meta)
        losses = []
        for batch in batches:
            params, buffers, opt_state, loss = self.step(rule, params, buffers, opt_state, batch)
            losses.append(loss)
        return params, buffers, opt_state, torch.stack(losses)

    def inner_vjp(self, meta, params, buffers, opt_state, batches, cot_params, cot_state):
        """Pull ``(cot_params, cot_state)`` (cotangents of the parameters and floating
        state leaves after the ``len(batches)`` steps of :meth:`inner`) back to ``(meta,
        params, floating state leaves)`` before them."""
        floats, others, spec = _split_state(opt_state)
        leaves = pytree.tree_leaves(opt_state)

        def steps(m, p, f):
            state = _join_state(f, others, leaves, spec)
            rule = self.rule_factory(m)
            b = buffers
            for batch in batches:
                p, b, state, _ = self.step(rule, p, b, state, batch)
            return p, _split_state(state)[0]

        _, pullback = vjp(steps, meta, params, floats)
        return pullback((cot_params, cot_state))

    def val_grad(self, params: Params, buffers: Params, batch: Batch):
        """``(d val_loss / d params, val_loss)``."""
        return grad_and_value(lambda p: self.loss(p, buffers, batch)[0])(params)

    def val_loss(self, params: Params, buffers: Params, batch: Batch) -> torch.Tensor:
        """The 0-d loss on ``batch`` (the meta-objective)."""
        return self.loss(params, buffers, batch)[0]


class MetaStep:
    """Meta-gradient of the validation loss after ``K`` inner steps (see module doc).

    Call it as ``meta_step(meta_params, params, buffers, opt_state, train_batches,
    val_batch)``; build it with :func:`make_meta_step`.

    Attributes:
        frozen: names of the parameters that did not require grad when the step was
            built: the inner steps leave them as they are (they have no optimizer
            state), the meta-gradient flows through them (``init_grads`` has theirs).
    """

    def __init__(
        self,
        pieces: _Pieces,
        wrap: Callable[[Callable], Callable],
        remat: bool,
        steps_per_call: int = 1,
    ):
        self.remat = remat
        self.steps_per_call = steps_per_call
        self.frozen = pieces.frozen
        self.inner = wrap(pieces.inner)
        if remat:
            self.inner_vjp = wrap(pieces.inner_vjp)
            self.val_grad = wrap(pieces.val_grad)
        else:
            self.val_loss = wrap(pieces.val_loss)

    def __call__(
        self,
        meta_params: dict[str, torch.Tensor],
        params: Params,
        buffers: Params,
        opt_state: State,
        train_batches: Sequence[Batch],
        val_batch: Batch,
    ) -> MetaStepResult:
        """Run ``K = len(train_batches)`` inner steps from ``(params, buffers, opt_state)``
        with the rule ``rule_factory(meta_params)``, then the loss on ``val_batch``.

        Args:
            meta_params: ``{name: tensor}`` of meta-parameters (floating point).
            params: the inner starting parameters.
            buffers: the model's buffers (e.g. batchnorm running statistics).
            opt_state: the rule's state at the start, from
                ``rule_factory(meta_params).init(meta_step.trainable(params))`` or a
                previous result.
            train_batches: the ``K >= 1`` inner training batches.
            val_batch: the batch of the meta-objective.

        Returns:
            A :class:`MetaStepResult` (meta-loss, meta-gradients, final inner state).
        """
        if len(train_batches) < 1:
            raise ValueError("train_batches must hold at least one batch")
        if not self.trainable(params):
            raise ValueError(
                "no trainable parameters: params is empty or holds only frozen ones "
                f"({sorted(params)})"
            )
        bad = [k for k, v in meta_params.items() if not _is_float(v)]
        if bad:
            raise TypeError(f"meta_params {bad} are not floating-point tensors")
        if not self.remat:
            return self._through_autograd(
                meta_params, params, buffers, opt_state, train_batches, val_batch
            )
        meta = {k: v.detach() for k, v in meta_params.items()}
        chunks = self._chunks(train_batches)
        trajectory = []
        losses = []
        z = (_detached(params), buffers, _detached(opt_state))
        devices = {x.device for x in params.values()}
        for chunk in chunks:
            # the vjp recomputes the chunk: with the same random numbers (dropout masks)
            trajectory.append((z, _rng_state(devices)))
            *z, chunk_losses = self.inner(meta, *z, chunk)
            losses.append(chunk_losses)
        cot_params, meta_loss = self.val_grad(z[0], z[1], val_batch)
        after_forward = _rng_state(devices)
        cot_state = [torch.zeros_like(x) for x in _split_state(z[2])[0]]
        meta_grads = {k: torch.zeros_like(v) for k, v in meta.items()}
        try:
            for ((p, b, s), rng), chunk in zip(
                reversed(trajectory), reversed(chunks), strict=True
            ):
                _set_rng_state(rng)
                g_meta, cot_params, cot_state = self.inner_vjp(
                    meta, p, b, s, chunk, cot_params, cot_state
                )
                meta_grads = {k: meta_grads[k] + g_meta[k] for k in meta_grads}
        finally:  # the generators advance as by one forward pass, as with remat=False
            _set_rng_state(after_forward)
        return MetaStepResult(
            meta_loss, meta_grads, cot_params, z[0], z[1], z[2], torch.cat(losses)
        )

    def trainable(self, params: Params) -> Params:
        """The entries of ``params`` that the inner steps train (all but :attr:`frozen`)."""
        return trainable_params(params, self.frozen)

    def _chunks(self, train_batches: Sequence[Batch]) -> list[tuple[Batch, ...]]:
        """The batches in groups of ``steps_per_call`` (the last may be shorter), one
        group per call of the compiled inner step."""
        n = self.steps_per_call
        return [tuple(train_batches[i : i + n]) for i in range(0, len(train_batches), n)]

    def _through_autograd(
        self,
        meta_params: dict[str, torch.Tensor],
        params: Params,
        buffers: Params,
        opt_state: State,
        train_batches: Sequence[Batch],
        val_batch: Batch,
    ) -> MetaStepResult:
        """``remat=False``: the ``K`` (compiled) inner steps run under autograd, which keeps
        what each step's backward needs; one backward pass then gives both gradients."""
        with torch.enable_grad():
            meta = {k: v.detach().requires_grad_() for k, v in meta_params.items()}
            start = {k: v.detach().requires_grad_() for k, v in params.items()}
            # floating state leaves require grad from the start, as they do after a step:
            # every step then meets the same compiled graph (no second compilation)
            state = pytree.tree_map(
                lambda x: (
                    x.detach().requires_grad_(_is_float(x)) if isinstance(x, torch.Tensor) else x
                ),
                opt_state,
            )
            z = (start, buffers, state)
            losses = []
            for chunk in self._chunks(train_batches):
                *z, chunk_losses = self.inner(meta, *z, chunk)
                losses.append(chunk_losses.detach())
            meta_loss = self.val_loss(z[0], z[1], val_batch)
            inputs = [*meta.values(), *start.values()]
            grads = torch.autograd.grad(meta_loss, inputs, allow_unused=True)
        grads = [
            torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs, strict=True)
        ]
        meta_grads = dict(zip(meta, grads[: len(meta)], strict=True))
        init_grads = dict(zip(start, grads[len(meta) :], strict=True))
        return MetaStepResult(
            meta_loss.detach(),
            meta_grads,
            init_grads,
            _detached(z[0]),
            _detached(z[1]),
            _detached(z[2]),
            torch.cat(losses),
        )


def make_meta_step(
    model: nn.Module,
    loss_fn: LossFn,
    rule_factory: RuleFactory,
    *,
    compile: bool = True,
    remat: bool = True,
    steps_per_call: int = 1,
    **compile_kwargs: Any,
) -> MetaStep:
    """Build a (compiled) unrolled meta-gradient step whose compile time does not grow
    with the unroll length.

    Args:
        model: the inner architecture (its own tensors are not used). Its parameters
            that do not require grad now are frozen in the inner steps, as in
            :func:`~metaopt.compile.make_step` (see :attr:`MetaStep.frozen`).
        loss_fn: ``(outputs, targets) -> 0-d loss``, for the inner steps and the
            meta-objective.
        rule_factory: ``meta_params -> UpdateRule`` (see :data:`RuleFactory`).
        compile: compile the pieces (inner step, its vjp, the validation gradient) with
            ``torch.compile`` (default) or run them eagerly (the reference).
        remat: ``True`` (default): keep only the ``K`` step inputs and recompute each
            step inside its vjp on the way back (memory of one step's graph, whatever
            ``K``; one extra inner forward per step). ``False``: run the compiled inner
            steps under ordinary autograd, which keeps every step's intermediate values
            (memory grows with ``K``, as in ``higher``) and needs no recomputation (fewer
            operations; on the small models of ``benchmarks/`` the autograd engine's
            per-call cost made Adam's meta step 0.96x to 1.8x the time of ``True``;
            the learned rule's ran 0.93x-1.02x the time and compiled in about half,
            see ``docs/compile.md``). Both give the same meta-gradient.
        steps_per_call: inner steps per call of the compiled step (and of its vjp). Each
            call has a fixed cost (guards, wrappers; about 0.1-0.2 ms on a CPU) that more
            steps per call share; the compiled graph, and its compile time, grow about
            linearly with it (the steps are inlined), not with ``K``. ``K`` need not be a
            multiple: the last call takes the remaining steps (one more compilation when
            ``K % steps_per_call != 0``). Same meta-gradient for every value.
        **compile_kwargs: passed to ``torch.compile``; ``fullgraph=True`` and
            ``dynamic=False`` (as :func:`~metaopt.compile.make_step`) by default.

    Returns:
        A :class:`MetaStep`.

    Example:
        >>> meta_step = make_meta_step(model, F.cross_entropy, lambda m: adam(lr=m["lr"]))
        >>> meta = {"lr": torch.tensor(1e-2)}
        >>> params, buffers = module_state(model)
        >>> state = adam(lr=meta["lr"]).init(meta_step.trainable(params))
        >>> out = meta_step(meta, params, buffers, state, batches, val_batch)
        >>> out.meta_grads["lr"]   # d val_loss / d lr through the K steps
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not callable(rule_factory) or isinstance(rule_factory, UpdateRule):
        raise TypeError("rule_factory must be a function meta_params -> UpdateRule")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if type(steps_per_call) is not int or steps_per_call < 1:
        raise ValueError(f"steps_per_call must be an integer >= 1, got {steps_per_call!r}")
    pieces = _Pieces(model, loss_fn, rule_factory)
    if not compile:
        if compile_kwargs:
            raise TypeError(f"compile_kwargs {sorted(compile_kwargs)} need compile=True")
        return MetaStep(pieces, lambda fn: fn, remat, steps_per_call)
    compile_kwargs.setdefault("fullgraph", True)
    compile_kwargs.setdefault("dynamic", False)  # as make_step: dropout needs static shapes
    return MetaStep(
        pieces,
        lambda fn: _compiled(fn, **compile_kwargs),
        remat,
        steps_per_call,
    )
