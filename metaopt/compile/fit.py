"""A minimal trainer on a compiled inner step: :func:`fit`."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from metaopt.compile.step import Batch, LossFn, make_step, module_state
from metaopt.rules.base import State, UpdateRule

__all__ = ["FitResult", "fit"]

logger = logging.getLogger(__name__)


@dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
        step_losses: training loss of every step (before its update), shape ``[steps]``.
        epoch_losses: mean training loss of each epoch, ``len == epochs``.
        opt_state: the rule's final state (to continue training with the same rule).
    """

    step_losses: torch.Tensor
    epoch_losses: list[float]
    opt_state: State


def fit(
    model: nn.Module,
    loader: Iterable[Batch],
    rule: UpdateRule,
    epochs: int,
    *,
    loss_fn: LossFn = nn.functional.cross_entropy,
    opt_state: State | None = None,
    compile: bool = True,
    **compile_kwargs: Any,
) -> FitResult:
    """Train ``model`` in place with a (compiled) pure step of ``rule``.

    The step works on detached copies of the parameters and buffers; after the last step
    they are written back into ``model`` (``model``'s tensors keep their identity, so an
    optimizer or hook holding them stays valid). If an exception interrupts training,
    ``model`` (and a given ``opt_state``) are left unchanged. Compiled, the step updates
    its copies in place (``make_step(donate=True)``), so no step allocates new tensors.

    Args:
        model: the module to train; put it in the mode you want (``model.train()``).
        loader: re-iterable over ``(inputs, targets)`` batches (e.g. a ``DataLoader``).
            Batches of another shape (a short last batch) cost one recompilation; use
            ``drop_last=True`` to avoid it.
        rule: the update rule, e.g. ``metaopt.rules.adam(lr=1e-3)``.
        epochs: number of passes over ``loader`` (>= 1; a one-shot iterator such as a
            generator allows only 1).
        loss_fn: ``(outputs, targets) -> 0-d loss``; cross-entropy by default.
        opt_state: a state to continue from (default: ``rule.init`` of the parameters
            that require grad; the others stay as they are, see :func:`make_step`).
        compile: compile the step (default) or run it eagerly.
        **compile_kwargs: passed to ``torch.compile`` (see :func:`make_step`).

    Returns:
        A :class:`FitResult` with the per-step and per-epoch losses and the final state.
    """
    if type(epochs) is not int or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    if isinstance(loader, Iterator) and epochs > 1:
        raise TypeError(
            f"loader is a one-shot iterator ({type(loader).__name__}), exhausted after the "
            f"first of {epochs} epochs; pass a re-iterable (a list, a DataLoader)"
        )
    # compiled: the step writes into private copies in place (donated), one copy in all
    step = make_step(model, loss_fn, rule, compile=compile, donate=compile, **compile_kwargs)
    params, buffers = module_state(model)
    state = rule.init(step.trainable(params)) if opt_state is None else opt_state
    if compile:
        params, buffers, state = pytree.tree_map(
            lambda x: x.clone() if isinstance(x, torch.Tensor) else x, (params, buffers, state)
        )
    losses: list[torch.Tensor] = []
    epoch_losses: list[float] = []
    for epoch in range(epochs):
        first = len(losses)
        for batch in loader:
            params, buffers, state, metrics = step(params, buffers, state, batch)
            losses.append(metrics["loss"].detach())
        if len(losses) == first:
            raise ValueError("loader yielded no batch")
        epoch_losses.append(torch.stack(losses[first:]).mean().item())
        logger.info("epoch %d: mean loss %.4g", epoch, epoch_losses[-1])
    _write_back(model, params, buffers)
    return FitResult(torch.stack(losses), epoch_losses, state)


@torch.no_grad()
def _write_back(model: nn.Module, params: dict[str, torch.Tensor], buffers: dict) -> None:
    """Copy trained values into ``model``'s own parameters and buffers, in place."""
    for name, p in model.named_parameters():
        p.copy_(params[name])
    for name, b in model.named_buffers():
        b.copy_(buffers[name])
