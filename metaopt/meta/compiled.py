"""Compiled inner steps for the continual meta-objective (``Unrolled(step_fn=...)``).

The unrolled estimator's inner step (loss, gradient with its second-order terms, learned
update) runs eagerly op by op. :class:`CompiledContinualSteps` runs the same step through
``torch.compile`` instead: one pure function ``(meta-parameters, params, buffers, state,
batch) -> (params, buffers, state, loss)`` that calls :func:`torch.func.grad_and_value`
for the inner gradient, compiled with ``fullgraph=True`` and run under ordinary autograd
(its backward is compiled too), so backpropagating the meta-loss through a window of steps
gives the same meta-gradient as the eager unroll.

What a compiled graph is specialised on, and how recompilation stays bounded:

* the task's logit range is a tensor input (the loss masks the logits outside it instead
  of slicing them), so tasks with other classes or label offsets reuse the graph;
* the model is an argument, not a constant: models the task family builds afresh for each
  sequence share a graph as long as their structure is the same (Dynamo guards on it);
* one compiled function (with its own Dynamo cache) per *shape signature* — the model's
  class, parameter and buffer shapes and dtypes, the batch shape — so a family that mixes
  datasets, models and batch sizes compiles each combination once instead of running into
  Dynamo's recompilation limit;
* floating parameters and state leaves always enter as tensors that require grad (leaves
  are made so after a truncation window is detached), so the first step of a window meets
  the same graph as the others; buffers always enter detached (batch-norm running
  statistics carry no gradient, and may not require one).

Task boundaries (:func:`metaopt.learned.new_task`) happen eagerly before the step; the
loss observation (:func:`metaopt.learned.observe_loss`) happens inside it, between the
loss and the update, as in :meth:`ContinualProblem.prepare_state`. The first update
after a boundary also folds the finished task's importance into the state, with the
rule's own importance score; for a rule that offers it (``learned_rule``'s
``update.fold_pending``) that fold runs eagerly before the compiled step too, so the
step after a boundary meets the ordinary graph instead of compiling one of its own (as
large and as slow to compile: about 30 s on a 2-core CPU). Other rules (a ``chain``
around ``learned_rule``) fold inside the step: two graphs per shape signature.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad_and_value
from torch.utils import _pytree as pytree

from metaopt._own_cache import compile_own
from metaopt.learned.tasks import learned_leaves, observe_loss
from metaopt.meta.functional import detach_tree, pure_call
from metaopt.meta.objective import ContinualProblem, has_learned_state
from metaopt.meta.problem import RuleFactory
from metaopt.meta.unroll import InnerCarry
from metaopt.rules.base import apply_updates
from metaopt.tree import Params

__all__ = ["CompiledContinualSteps", "masked_cross_entropy"]


def masked_cross_entropy(
    output: torch.Tensor, y: torch.Tensor, logit_range: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy over the logits ``[logit_range[0], logit_range[1])`` of ``output``.

    Equal to ``F.cross_entropy(output[:, a:b], y)`` with ``(a, b) = logit_range``, but the
    range is a tensor, so a compiled graph does not specialise on it: the logits outside
    it are set to the dtype's lowest value (their softmax weight is exactly 0).

    Args:
        output: ``[B, n_outputs]`` logits.
        y: ``[B]`` int64 labels counted from ``a``.
        logit_range: int64 ``[2]``: ``(a, b)``.
    """
    positions = torch.arange(output.shape[1], device=output.device)
    inside = (positions >= logit_range[0]) & (positions < logit_range[1])
    logits = output.masked_fill(~inside, torch.finfo(output.dtype).min)
    return F.cross_entropy(logits, y + logit_range[0])


def _continual_step(
    rule_fn: RuleFactory,
    module: nn.Module,
    observe: bool,
    meta: Params,
    params: Params,
    buffers: Params,
    state: Any,
    x: torch.Tensor,
    y: torch.Tensor,
    logit_range: torch.Tensor,
):
    """One inner step (pure): ``(params, buffers, state, loss)`` after it."""
    rule = rule_fn(meta)

    def loss_of(p: Params):
        out, new_buffers = pure_call(module, p, buffers, x)
        return masked_cross_entropy(out, y, logit_range), new_buffers

    grads, (loss, new_buffers) = grad_and_value(loss_of, has_aux=True)(params)
    if observe:
        state = observe_loss(state, loss.detach())
    updates, state = rule.update(grads, state, params)
    return apply_updates(params, updates), new_buffers, state, loss.detach()


def _requiring_grad(tree: Any) -> Any:
    """``tree`` with every floating tensor that does not require grad replaced by a
    detached copy that does (a leaf); other leaves unchanged."""

    def fix(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.is_floating_point() and not x.requires_grad:
            return x.detach().requires_grad_(True)
        return x

    return pytree.tree_map(fix, tree)


def _folds_a_task(state: Any) -> bool:
    """Whether the next update of ``state`` folds a pending task boundary (see
    :func:`metaopt.learned.new_task` without parameters)."""
    return any(leaf.pending.numel() for value in state.values() for leaf in learned_leaves(value))


def _signature(module: nn.Module, x: torch.Tensor) -> tuple:
    """What selects a compiled function: the model's class, tensor shapes and dtypes and
    train/eval mode, and the batch's shape and dtype."""
    tensors = [*module.named_parameters(), *module.named_buffers()]
    return (
        type(module),
        module.training,
        tuple((k, tuple(t.shape), t.dtype) for k, t in tensors),
        tuple(x.shape),
        x.dtype,
    )


class CompiledContinualSteps:
    """Compiled inner steps of :class:`ContinualProblem` trajectories for
    :class:`~metaopt.meta.Unrolled` (see the module docstring).

    Args:
        rule_fn: ``meta_params -> UpdateRule`` (the estimator's rule factory).
        **compile_kwargs: passed to ``torch.compile`` (``fullgraph=True`` by default).

    Call it as ``steps(meta_params, problem, carry, step) -> (carry, loss)``, the
    interface of ``Unrolled(..., step_fn=steps)``.
    """

    def __init__(self, rule_fn: RuleFactory, **compile_kwargs: Any) -> None:
        if not callable(rule_fn):
            raise TypeError("rule_fn must be a function meta_params -> UpdateRule")
        compile_kwargs.setdefault("fullgraph", True)
        self.rule_fn = rule_fn
        self.compile_kwargs = compile_kwargs
        self._compiled: dict[tuple, Any] = {}

    @property
    def num_compiled(self) -> int:
        """How many compiled functions (shape signatures) exist so far."""
        return len(self._compiled)

    def __call__(
        self, meta_params: Params, problem: ContinualProblem, carry: InnerCarry, step: int
    ) -> tuple[InnerCarry, torch.Tensor]:
        """Inner step ``step`` of ``problem`` from ``carry``; differentiable with respect
        to ``meta_params`` and the carry. Returns the new carry and the inner loss (0-d,
        detached)."""
        if not isinstance(problem, ContinualProblem):
            raise TypeError(
                f"compiled inner steps need a ContinualProblem, got {type(problem).__name__}"
            )
        state = problem.begin_step(carry.state, step)
        if _folds_a_task(state):  # fold now if the rule can: one graph (module docstring)
            fold = getattr(self.rule_fn(meta_params).update, "fold_pending", None)
            if fold is not None:
                state = fold(state, carry.params)
        x, y, logit_range = problem.step_batch(step)
        module = problem.model.module
        key = _signature(module, x)
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self._compiled[key] = compile_own(_continual_step, **self.compile_kwargs)
        params, buffers, state, loss = compiled(
            self.rule_fn,
            module,
            has_learned_state(state),
            meta_params,
            _requiring_grad(carry.params),
            detach_tree(carry.buffers),
            _requiring_grad(state),
            x,
            y,
            logit_range,
        )
        return InnerCarry(params, buffers, state), loss
