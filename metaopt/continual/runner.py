"""Train a model sequentially on a stream and record the accuracy matrix.

The protocol: the model is built under ``torch.manual_seed(seed)`` (same initialisation for
every optimizer compared), minibatches are drawn from a generator seeded with ``seed``
(same data order for every optimizer), each task gets the same budget, and after each task
the model is evaluated on every task of the stream.

At each task boundary the runner first calls ``optimizer.end_task(context)`` if the
optimizer has it (regularisers such as EWC estimate their importance there from the task's
data), then ``optimizer.new_task()`` if it has it (the learned optimizer, EWC, SI).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from metaopt.continual.metrics import summarize
from metaopt.continual.streams import Task

__all__ = ["StreamResult", "TaskContext", "evaluate", "run_stream"]

logger = logging.getLogger(__name__)

ModelFactory = Callable[[], nn.Module]
OptimizerFactory = Callable[..., torch.optim.Optimizer]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TaskContext:
    """What an optimizer's ``end_task`` hook sees at a task boundary.

    Attributes:
        model: the model, in training mode.
        task: the task just finished.
        loss_fn: the training loss ``(logits [B, k], labels [B]) -> scalar``.
    """

    model: nn.Module
    task: Task
    loss_fn: LossFn

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The task's logits ``[B, n_classes]`` for images ``x [B, C, H, W]`` (any device;
        moved to the model's)."""
        device = next(self.model.parameters()).device
        return self.task.logits(self.model(x.to(device)))


@dataclass
class StreamResult:
    """Outcome of one sequential run.

    Attributes:
        R: test accuracy matrix ``[T, T]``; ``R[i, j]`` after training task ``i``, on task ``j``.
        b: test accuracy of the initial model on each task ``[T]``.
        R_val: the same on the validation splits (``None`` if the stream has none).
        b_val: initial accuracy on the validation splits.
        train_loss: mean training loss on each task ``[T]`` (over every closure call).
        seconds: wall-clock time of the run.
    """

    R: torch.Tensor
    b: torch.Tensor
    R_val: torch.Tensor | None = None
    b_val: torch.Tensor | None = None
    train_loss: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def metrics(self) -> dict[str, float]:
        """Test-set metrics (see :func:`metaopt.continual.metrics.summarize`)."""
        return summarize(self.R, self.b)

    def val_metrics(self) -> dict[str, float] | None:
        """Validation-set metrics, or ``None`` without validation splits."""
        if self.R_val is None or self.b_val is None:
            return None
        return summarize(self.R_val, self.b_val)


@torch.no_grad()
def evaluate(
    model: nn.Module, task: Task, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000
) -> float:
    """Accuracy in ``[0, 1]`` of ``model`` on ``(x, y)`` scored on ``task``'s logits
    (batches are moved to the model's device)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(y), batch_size):
        logits = task.logits(model(x[start : start + batch_size].to(device)))
        labels = y[start : start + batch_size].to(device)
        correct += (logits.argmax(dim=1) == labels).sum().item()
    model.train(was_training)
    return correct / max(1, len(y))


def _evaluate_all(
    model: nn.Module, stream: Sequence[Task], batch_size: int
) -> tuple[list[float], list[float] | None]:
    test = [evaluate(model, t, t.x_test, t.y_test, batch_size) for t in stream]
    if any(t.x_val is None or t.y_val is None for t in stream):
        return test, None
    val = [evaluate(model, t, t.x_val, t.y_val, batch_size) for t in stream]
    return test, val


def _batches(n: int, batch_size: int, n_steps: int, gen: torch.Generator):
    """``n_steps`` index batches over ``n`` examples, reshuffling at each epoch."""
    done = 0
    while done < n_steps:
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            if done == n_steps:
                return
            yield order[start : start + batch_size]
            done += 1


def run_stream(
    model_factory: ModelFactory,
    optimizer_factory: OptimizerFactory,
    stream: Sequence[Task],
    *,
    epochs: int = 1,
    steps: int | None = None,
    batch_size: int = 32,
    seed: int = 0,
    loss_fn: LossFn = F.cross_entropy,
    eval_batch_size: int = 1000,
    device: str | torch.device | None = None,
    named_parameters: bool = False,
) -> StreamResult:
    """Train sequentially on ``stream`` and evaluate on every task after each task.

    Args:
        model_factory: ``() -> nn.Module`` returning logits ``[B, n_outputs(stream)]``;
            called once, under ``torch.manual_seed(seed)``.
        optimizer_factory: ``(params) -> optimizer`` (e.g. ``functools.partial(
            torch.optim.Adam, lr=1e-3)``); its ``end_task(context)`` and ``new_task()``
            are called at task boundaries when present.
        stream: the tasks, in training order.
        epochs: passes over each task's training data (ignored when ``steps`` is given).
        steps: exact number of optimizer steps per task, reshuffling as needed.
        batch_size: training minibatch size.
        seed: seeds the initialisation and the data order.
        loss_fn: ``(task logits [B, k], labels [B]) -> scalar`` loss.
        eval_batch_size: evaluation batch size (does not change results).
        device: where to train (``"cuda"``...); default: where the factory put the model.
            Tasks stay where they are; minibatches are moved.
        named_parameters: give the optimizer factory ``model.named_parameters()``
            (``(name, parameter)`` pairs, which ``torch.optim`` optimizers, EWC, SI and
            :class:`metaopt.LearnedOptimizer` accept) instead of ``model.parameters()``.
            The learned rule reads parameter kinds (norm, embedding) from names, as it
            saw them in meta-training.

    Returns:
        A :class:`StreamResult` with ``R [T, T]`` and ``b [T]`` (and validation versions if
        the tasks carry validation splits).

    Raises:
        ValueError: an empty stream, a budget below 1, a task without training or test
            examples (or with an empty validation split), or a model without parameters.
    """
    if not stream:
        raise ValueError("the stream has no tasks")
    if batch_size < 1 or epochs < 1 or (steps is not None and steps < 1) or eval_batch_size < 1:
        raise ValueError(
            f"need batch_size, epochs, steps, eval_batch_size >= 1; got {batch_size}, "
            f"{epochs}, {steps}, {eval_batch_size}"
        )
    for task in stream:
        for split, labels in (("training", task.y_train), ("test", task.y_test)):
            if len(labels) == 0:
                raise ValueError(f"task {task.name!r} has no {split} examples")
        if task.y_val is not None and len(task.y_val) == 0:
            raise ValueError(f"task {task.name!r} has an empty validation split")
    start_time = time.perf_counter()
    torch.manual_seed(seed)
    model = model_factory()
    if device is not None:
        model.to(device)
    model.train()
    first = next(model.parameters(), None)
    if first is None:
        raise ValueError("the model has no parameters: nothing to train")
    device = first.device
    optimizer = optimizer_factory(
        model.named_parameters() if named_parameters else model.parameters()
    )
    data_gen = torch.Generator().manual_seed(seed)
    T = len(stream)
    R = torch.zeros(T, T)
    R_val = torch.zeros(T, T)
    b_list, b_val_list = _evaluate_all(model, stream, eval_batch_size)
    has_val = b_val_list is not None
    train_loss = []
    for i, task in enumerate(stream):
        if i > 0:
            if hasattr(optimizer, "end_task"):
                optimizer.end_task(TaskContext(model, stream[i - 1], loss_fn))
            if hasattr(optimizer, "new_task"):
                optimizer.new_task()
        n = len(task.y_train)
        n_steps = steps if steps is not None else epochs * math.ceil(n / batch_size)
        losses: list[torch.Tensor] = []
        for index in _batches(n, batch_size, n_steps, data_gen):
            xb, yb = task.x_train[index].to(device), task.y_train[index].to(device)

            def closure(xb: torch.Tensor = xb, yb: torch.Tensor = yb) -> torch.Tensor:
                optimizer.zero_grad()
                loss = loss_fn(task.logits(model(xb)), yb)  # noqa: B023 - called at once
                loss.backward()
                losses.append(loss.detach())  # noqa: B023 - called at once
                return loss

            optimizer.step(closure)
        total = float(torch.stack(losses).sum()) if losses else 0.0
        train_loss.append(total / max(1, len(losses)))
        test, val = _evaluate_all(model, stream, eval_batch_size)
        R[i] = torch.tensor(test)
        if val is not None:
            R_val[i] = torch.tensor(val)
        logger.debug("task %d (%s): loss %.4f, test acc %s", i, task.name, train_loss[-1], test)
    return StreamResult(
        R=R,
        b=torch.tensor(b_list),
        R_val=R_val if has_val else None,
        b_val=torch.tensor(b_val_list) if has_val else None,
        train_loss=train_loss,
        seconds=time.perf_counter() - start_time,
    )
