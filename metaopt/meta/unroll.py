"""Truncated backpropagation through the inner loop (the unrolled meta-gradient).

The inner loop runs ``problem.num_steps`` updates of the rule built from the
meta-parameters. With ``truncation=K`` the trajectory is cut into windows of ``K`` steps:
each window's meta-loss is backpropagated through that window only, then the inner
parameters, buffers and rule state are detached. Memory is therefore O(K), not
O(num_steps), and the estimate is the usual truncated-BPTT one (exact when
``truncation`` is ``None`` or ``>= num_steps``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from metaopt.meta.functional import detach_tree
from metaopt.meta.problem import (
    InnerProblem,
    MetaGradient,
    RuleFactory,
    check_count,
    check_rule_fn,
    device_of,
    scalar_loss,
)
from metaopt.rules.base import State, UpdateRule, apply_updates
from metaopt.tree import Params

__all__ = ["InnerCarry", "StepFn", "Unrolled", "inner_step", "leaf_meta_params"]


@dataclass
class InnerCarry:
    """Everything the inner loop carries from one step to the next."""

    params: Params
    buffers: Params
    state: State


def leaf_meta_params(meta_params: Params) -> Params:
    """Detached copies of ``meta_params`` that require grad (the leaves to differentiate)."""
    if not meta_params:
        raise ValueError("meta_params is empty: nothing to differentiate")
    return {k: v.detach().requires_grad_(True) for k, v in meta_params.items()}


def inner_step(
    rule: UpdateRule,
    problem: InnerProblem,
    carry: InnerCarry,
    step: int,
    create_graph: bool,
) -> tuple[InnerCarry, torch.Tensor]:
    """One inner update; returns the new carry and the inner loss (0-d) at ``step``.

    With ``create_graph`` the update stays differentiable (second-order terms kept);
    otherwise the new parameters are detached leaves and no graph outlives the step. A
    parameter the inner loss does not use gets a ``None`` gradient: the rule leaves it and
    its state as they are (as ``torch.optim`` skips a parameter without ``.grad``).

    Raises:
        ValueError: no parameters, or an inner loss that depends on none of them.
    """
    params = carry.params
    if not params:
        raise ValueError("the inner problem has no trainable parameters: nothing to unroll")
    with torch.enable_grad():
        if not create_graph:
            params = {k: p.detach().requires_grad_(True) for k, p in params.items()}
        loss, buffers = problem.inner_loss(params, carry.buffers, step)
        loss = scalar_loss(loss, "problem.inner_loss")
        if not loss.requires_grad:
            raise ValueError(
                "problem.inner_loss does not depend on any trainable parameter (its loss "
                "does not require grad)"
            )
        # a parameter the loss does not use (an inactive head) gets None, which the rules
        # skip (update None, state kept), as torch.optim skips a parameter without .grad
        grads = torch.autograd.grad(
            loss, list(params.values()), create_graph=create_graph, allow_unused=True
        )
    grads = dict(zip(params, grads, strict=True))
    state = problem.prepare_state(carry.state, step, loss.detach())
    if create_graph:
        updates, state = rule.update(grads, state, params)
        new_params = apply_updates(params, updates)
    else:
        with torch.no_grad():
            detached = detach_tree(params)
            updates, state = rule.update(grads, state, detached)
            new_params = apply_updates(detached, updates)
        buffers = detach_tree(buffers)
    return InnerCarry(new_params, buffers, state), loss.detach()


StepFn = Callable[[Params, InnerProblem, InnerCarry, int], tuple[InnerCarry, torch.Tensor]]
"""``(meta_params, problem, carry, step) -> (new carry, inner loss)``: one differentiable
inner update (see :class:`Unrolled`)."""


class Unrolled:
    """Meta-gradient by (truncated) backpropagation through the inner updates.

    Args:
        rule_fn: ``meta_params -> UpdateRule``.
        truncation: window length K in inner steps; ``None`` backpropagates through the
            whole trajectory.

    Calling ``Unrolled(rule_fn, K)(meta_params, problem)`` returns
    :class:`MetaGradient`: the summed meta-loss and its (truncated) gradient, summed
    over windows.

    Attention inside the inner model runs on PyTorch's math kernel during the unroll
    (the fused CPU/flash kernels have no double backward).

    ``step_fn(meta_params, problem, carry, step) -> (carry, loss)`` replaces the eager
    :func:`inner_step` (``create_graph=True``) when given, e.g. the compiled steps of
    :class:`metaopt.meta.compiled.CompiledContinualSteps`; it must keep the new carry
    differentiable with respect to ``meta_params`` and the old carry.
    """

    def __init__(
        self,
        rule_fn: RuleFactory,
        truncation: int | None = None,
        step_fn: StepFn | None = None,
    ) -> None:
        if truncation is not None:
            truncation = check_count("truncation", truncation)
        if step_fn is not None and not callable(step_fn):
            raise TypeError(f"step_fn must be callable, got {type(step_fn).__name__}")
        self.rule_fn = check_rule_fn(rule_fn)
        self.truncation = truncation
        self.step_fn = step_fn

    def __call__(self, meta_params: Params, problem: InnerProblem) -> MetaGradient:
        with sdpa_kernel(SDPBackend.MATH):
            return self._run(meta_params, problem)

    def _run(self, meta_params: Params, problem: InnerProblem) -> MetaGradient:
        mp = leaf_meta_params(meta_params)
        rule = self.rule_fn(mp)
        params, buffers = problem.init(mp)
        carry = InnerCarry(params, buffers, rule.init(params))
        total_grads = {k: torch.zeros_like(v) for k, v in mp.items()}
        total_loss = torch.zeros((), dtype=torch.float64, device=device_of(mp))
        window = self.truncation or problem.num_steps
        window_loss: Any = None
        for step in range(problem.num_steps):
            if step % window == 0 and step > 0:  # the previous window's graph is freed
                rule = self.rule_fn(mp)
            if self.step_fn is None:
                carry, _ = inner_step(rule, problem, carry, step, create_graph=True)
            else:
                carry, _ = self.step_fn(mp, problem, carry, step)
            contribution = problem.meta_loss(carry.params, carry.buffers, step)
            if contribution is not None:
                contribution = scalar_loss(contribution, "problem.meta_loss")
                window_loss = contribution if window_loss is None else window_loss + contribution
            if (step + 1) % window == 0 or step == problem.num_steps - 1:
                if window_loss is not None:
                    total_loss += window_loss.detach().double()
                    self._accumulate(window_loss, mp, total_grads)
                window_loss = None
                carry = InnerCarry(
                    {k: p.detach().requires_grad_(True) for k, p in carry.params.items()},
                    detach_tree(carry.buffers),
                    detach_tree(carry.state),
                )
        return MetaGradient(total_loss.to(next(iter(mp.values())).dtype), total_grads)

    @staticmethod
    def _accumulate(loss: torch.Tensor, mp: Params, total: Params) -> None:
        if not loss.requires_grad:
            return
        grads = torch.autograd.grad(loss, list(mp.values()), allow_unused=True)
        for (k, _), g in zip(mp.items(), grads, strict=True):
            if g is not None:
                total[k] += g
