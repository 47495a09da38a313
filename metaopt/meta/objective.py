"""The continual meta-objective: learn fast, and do not forget earlier tasks.

A :class:`ContinualProblem` is one sample of a short task sequence ``1..T`` (2-3 tasks
drawn from a continual stream). The inner trajectory trains a model with the rule for
``K_t`` steps on task ``t``, then marks a task boundary (:func:`metaopt.learned.new_task`,
for rules that hold learned state) and moves on; every inner loss is fed to the rule with
:func:`metaopt.learned.observe_loss`. The meta-loss is

.. math::

    L_{meta} = \\frac{1}{T} \\sum_{t=1}^{T} \\Big[ \\frac{\\tilde\\ell_t + w \\sum_{j < t}
               \\tilde\\ell_j}{1 + w (t - 1)} (\\theta_{end(t)}) \\;+\\; \\lambda_{speed}
               \\operatorname{mean}_{k \\in S_t} \\tilde\\ell_t(\\theta_k) \\Big]

* **retention and learning**: at the end of each task ``t``, the loss on the current task
  AND every earlier task of the sequence (each earlier task weighted ``w``,
  ``earlier_weight``, relative to the current one), measured on examples held out from
  the inner-loop batches. A rule that forgets task ``j`` while learning ``t > j`` pays.
* **learning speed** (weight ``lambda_speed``): the current task's held-out loss at the
  points ``S_t`` along the task (every ``speed_every`` steps), i.e. the area under the
  learning curve, so a rule cannot win by not learning.
* ``\\tilde\\ell_j = \\ell_j / \\log(n_{classes,j})``: cross-entropy normalised so that
  chance level is 1 whatever the number of classes.

Every random choice (batches, held-out examples) is fixed when the problem is built, so
repeated evaluations (ES pairs, finite differences, resumed runs) see the same data.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from metaopt.continual.streams import Task
from metaopt.learned.tasks import learned_leaves, new_task, observe_loss
from metaopt.meta.functional import PureModel
from metaopt.meta.problem import InnerProblem, check_count
from metaopt.meta.unroll import InnerCarry, inner_step
from metaopt.rules.base import State, UpdateRule
from metaopt.tree import Params

__all__ = ["ContinualProblem", "evaluate_rule", "has_learned_state"]


def has_learned_state(state: State) -> bool:
    """Whether ``state`` (of any rule) holds learned-rule leaf states."""
    return any(learned_leaves(leaf) for leaf in state.values())


class ContinualProblem(InnerProblem):
    """One task-sequence sample for meta-training (see the module docstring).

    Args:
        model: the inner model (its current weights are the starting point); its output
            has at least ``max(task.logit_offset + task.n_classes)`` logits.
        tasks: the sequence, in order (``metaopt.continual.streams.Task``). Inner batches
            come from ``x_train``; held-out losses from ``x_test``, which for
            meta-training holds examples split off the TRAINING images.
        steps_per_task: inner steps on each task (one number or one per task).
        batch_size: inner mini-batch size.
        meta_batch_size: held-out examples per task for the meta-loss.
        speed_weight: ``lambda_speed``.
        speed_every: spacing of the learning-speed points in steps (default: a quarter
            of the task's steps).
        earlier_weight: weight ``w`` of each earlier task relative to the current one in
            the end-of-task average (1: plain mean; larger: forgetting costs more).
        seed: draws the batches and held-out examples.
    """

    description: str = ""
    """Human-readable summary (set by :class:`~metaopt.meta.tasks.TaskFamily`)."""

    def __init__(
        self,
        model: nn.Module,
        tasks: Sequence[Task],
        steps_per_task: int | Sequence[int] = 20,
        batch_size: int = 32,
        meta_batch_size: int = 128,
        speed_weight: float = 0.25,
        speed_every: int | None = None,
        earlier_weight: float = 1.0,
        seed: int = 0,
    ) -> None:
        if not tasks:
            raise ValueError("ContinualProblem needs at least one task")
        steps = (
            [steps_per_task] * len(tasks)
            if not isinstance(steps_per_task, Sequence)
            else list(steps_per_task)
        )
        if len(steps) != len(tasks):
            raise ValueError(f"steps_per_task must give one count for each of the "
                             f"{len(tasks)} tasks, got {len(steps)}")
        steps = [check_count("steps_per_task", s) for s in steps]
        check_count("batch_size", batch_size)
        check_count("meta_batch_size", meta_batch_size)
        if speed_every is not None:
            check_count("speed_every", speed_every)
        if not all(
            math.isfinite(w) and w >= 0 for w in (speed_weight, earlier_weight)
        ):  # an infinite weight made every meta-loss NaN
            raise ValueError(
                f"speed_weight and earlier_weight must be finite and >= 0, got "
                f"{speed_weight} and {earlier_weight}"
            )
        self.model = PureModel(model)
        self.tasks = list(tasks)
        self.steps = steps
        self.starts = [sum(steps[:t]) for t in range(len(tasks))]
        self.num_steps = sum(steps)
        self.speed_weight = speed_weight
        self.earlier_weight = earlier_weight
        gen = torch.Generator().manual_seed(seed)
        self._batches = [
            torch.randint(0, len(task.y_train), (s, batch_size), generator=gen)
            for task, s in zip(self.tasks, steps, strict=True)
        ]
        self._meta = [
            torch.randperm(len(task.y_test), generator=gen)[:meta_batch_size]
            for task in self.tasks
        ]
        self._speed_points = [
            {k - 1 for k in range(s, 0, -(speed_every or max(1, s // 4)))} for s in steps
        ]

    def to(self, device: str | torch.device) -> ContinualProblem:
        """Move the model, the tasks' images and labels and the fixed batch indices to
        ``device`` (in place; returns ``self``). The problem is built on the CPU, so its
        random choices do not depend on the device it then runs on."""
        device = torch.device(device)
        self.model.module.to(device)
        self.tasks = [
            dataclasses.replace(
                task,
                **{
                    name: value.to(device)
                    for name, value in vars(task).items()
                    if isinstance(value, torch.Tensor)
                },
            )
            for task in self.tasks
        ]
        self._batches = [index.to(device) for index in self._batches]
        self._meta = [index.to(device) for index in self._meta]
        return self

    def task_of(self, step: int) -> tuple[int, int]:
        """``(task index, step within the task)`` of inner step ``step``."""
        for t in reversed(range(len(self.tasks))):
            if step >= self.starts[t]:
                return t, step - self.starts[t]
        raise ValueError(f"step {step} < 0")

    def init(self, meta_params: Params) -> tuple[Params, Params]:
        return self.model.init()

    def _loss(self, params: Params, buffers: Params, task: Task, x, y):
        out, buffers = self.model(params, buffers, x)
        return F.cross_entropy(task.logits(out), y), buffers

    def inner_loss(self, params: Params, buffers: Params, step: int) -> tuple[torch.Tensor, Params]:
        t, k = self.task_of(step)
        task, index = self.tasks[t], self._batches[t][k]
        return self._loss(params, buffers, task, task.x_train[index], task.y_train[index])

    def held_out_loss(self, params: Params, buffers: Params, t: int) -> torch.Tensor:
        """Normalised held-out loss of task ``t`` (0-d)."""
        task, index = self.tasks[t], self._meta[t]
        loss, _ = self._loss(params, buffers, task, task.x_test[index], task.y_test[index])
        return loss / math.log(max(task.n_classes, 2))

    def held_out_accuracy(self, params: Params, buffers: Params, t: int) -> float:
        """Accuracy (fraction) of task ``t`` on its held-out examples."""
        task, index = self.tasks[t], self._meta[t]
        with torch.no_grad():
            out, _ = self.model(params, buffers, task.x_test[index])
        return float((task.logits(out).argmax(1) == task.y_test[index]).float().mean())

    def meta_loss(self, params: Params, buffers: Params, step: int) -> torch.Tensor | None:
        t, k = self.task_of(step)
        n = len(self.tasks)
        total: Any = None
        if k == self.steps[t] - 1:
            losses = torch.stack([self.held_out_loss(params, buffers, j) for j in range(t + 1)])
            weights = torch.full(
                (t + 1,), self.earlier_weight, dtype=losses.dtype, device=losses.device
            )
            weights[t] = 1.0
            total = (losses * weights).sum() / (weights.sum() * n)
        if self.speed_weight and k in self._speed_points[t]:
            speed = self.held_out_loss(params, buffers, t) * (
                self.speed_weight / (n * len(self._speed_points[t]))
            )
            total = speed if total is None else total + speed
        return total

    def prepare_state(self, state: State, step: int, loss: torch.Tensor) -> State:
        if not has_learned_state(state):
            return state
        return observe_loss(self.begin_step(state, step), loss)

    def begin_step(self, state: State, step: int) -> State:
        """The rule state to start inner step ``step`` from: a task boundary
        (:func:`metaopt.learned.new_task`) at the first step of every task after the first,
        for rules that hold learned state; otherwise ``state`` itself."""
        t, k = self.task_of(step)
        if k == 0 and t > 0 and has_learned_state(state):
            return new_task(state)
        return state

    def step_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The data of inner step ``step`` as tensors only (what a compiled step takes).

        Returns:
            ``(x, y, logit_range)``: the inputs ``[B, C, H, W]``, the labels ``[B]``
            counted from ``logit_range[0]`` (int64), and ``logit_range`` = ``[offset,
            offset + n_classes]`` (int64, shape ``[2]``): the logits the task is scored
            on (:meth:`metaopt.continual.streams.Task.logits`).
        """
        t, k = self.task_of(step)
        task, index = self.tasks[t], self._batches[t][k]
        first = task.logit_offset
        return (
            task.x_train[index],
            task.y_train[index],
            torch.tensor(
                [first, first + task.n_classes], dtype=torch.int64, device=task.x_train.device
            ),
        )


def evaluate_rule(rule: UpdateRule, problem: ContinualProblem) -> dict[str, float]:
    """Run the whole sequence with ``rule`` (no meta-graph) and measure it.

    Returns:
        ``{"meta_loss", "acc", "bwt_loss"}``: the meta-loss of the trajectory, the mean
        held-out accuracy over all tasks at the end (like ACC), and the mean increase of
        the normalised held-out loss of earlier tasks between the end of their own
        training and the end of the sequence (forgetting, in loss units).
    """
    params, buffers = problem.init({})
    params = {k: p.detach() for k, p in params.items()}
    carry = InnerCarry(params, buffers, rule.init(params))
    meta_loss = 0.0
    learned_at: list[float] = []
    for step in range(problem.num_steps):
        carry, _ = inner_step(rule, problem, carry, step, create_graph=False)
        with torch.no_grad():
            contribution = problem.meta_loss(carry.params, carry.buffers, step)
            t, k = problem.task_of(step)
            if k == problem.steps[t] - 1:
                learned_at.append(float(problem.held_out_loss(carry.params, carry.buffers, t)))
        if contribution is not None:
            meta_loss += float(contribution)
    n = len(problem.tasks)
    with torch.no_grad():
        final = [float(problem.held_out_loss(carry.params, carry.buffers, j)) for j in range(n)]
    acc = sum(problem.held_out_accuracy(carry.params, carry.buffers, j) for j in range(n)) / n
    forgetting = sum(final[j] - learned_at[j] for j in range(n - 1)) / max(n - 1, 1)
    return {"meta_loss": meta_loss, "acc": acc, "bwt_loss": forgetting}
