"""Continual-learning baselines EWC and SI as quadratic penalties over a base optimizer.

Both add ``strength * sum_i Omega_i (theta_i - theta*_i)^2`` (EWC with a factor 1/2) to the
task loss, where ``theta*`` is the parameter value at the last task boundary and
``Omega`` an importance accumulated over past tasks. The penalty is quadratic, so its
gradient is added to ``p.grad`` right before the base optimizer's step — the same update
as back-propagating the penalised loss, without changing the training loop.

- :class:`EWC` (Kirkpatrick et al., 2017; online form of Schwarz et al., 2018):
  ``Omega`` = diagonal Fisher information, estimated at the end of each task from
  ``n_fisher`` training examples with labels sampled from the model's prediction
  (``end_task`` hook of the runner); summed over tasks with decay ``gamma``.
- :class:`SI` (Zenke et al., 2017): ``Omega += max(w, 0) / (delta^2 + xi)`` where ``w`` is
  the path integral ``-sum_t g_t * (theta_{t+1} - theta_t)`` of the task-loss gradient over
  the task and ``delta`` the parameter change over the task.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from metaopt.continual.runner import TaskContext

__all__ = ["EWC", "SI", "QuadraticRegularizer"]

BaseFactory = Callable[..., torch.optim.Optimizer]


def _trainable(params: torch.Tensor | Iterable[Any]) -> list[Any]:
    """The entries of ``params`` (one tensor, several, or ``(name, tensor)`` pairs as
    ``model.named_parameters()`` gives them) whose tensors require gradients."""
    entries = [params] if isinstance(params, torch.Tensor) else list(params)
    return [e for e in entries if (e[1] if isinstance(e, tuple) else e).requires_grad]


class QuadraticRegularizer(torch.optim.Optimizer):
    """A base optimizer plus a quadratic anchor penalty (shared machinery of EWC and SI).

    ``param_groups`` are the base optimizer's (so learning-rate schedulers act on it);
    the penalty's per-parameter buffers live in ``self.state[p]``.

    Args:
        params: parameters to optimise (tensors, ``(name, tensor)`` pairs or groups).
        base: base optimizer class or factory, default :class:`torch.optim.Adam`.
        strength: penalty coefficient (lambda for EWC, c for SI).
        **base_options: passed to ``base`` (``lr=``...).
    """

    #: factor in front of ``strength * sum Omega (theta - theta*)^2``.
    penalty_scale = 1.0

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        base: BaseFactory = torch.optim.Adam,
        *,
        strength: float = 1.0,
        **base_options: Any,
    ) -> None:
        if not (math.isfinite(strength) and strength >= 0):  # NaN and inf fail too
            raise ValueError(f"strength must be finite and >= 0, got {strength}")
        params = list(params)
        if params and isinstance(params[0], dict):
            params = [{**group, "params": _trainable(group["params"])} for group in params]
        else:
            params = _trainable(params)
        self.base = base(params, **base_options)
        super().__init__(
            [p for group in self.base.param_groups for p in group["params"]],
            {"strength": strength},
        )
        self.param_groups = self.base.param_groups
        self.strength = strength
        for p in self._params():
            self._init_param_state(p)
        self.n_tasks_consolidated = 0

    def _init_param_state(self, p: torch.Tensor) -> None:
        """Penalty buffers of a new parameter: anchored where it is, no importance yet."""
        self.state[p]["anchor"] = p.detach().clone()
        self.state[p]["importance"] = torch.zeros_like(p)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the base optimizer (which fills in its own defaults) and start
        the penalty buffers of its parameters (no importance before the next boundary)."""
        if self.param_groups is not self.base.param_groups:
            # torch.optim.Optimizer.__init__ building the wrapper's own groups, replaced
            # by the base optimizer's right after
            super().add_param_group(param_group)
            return
        self.base.add_param_group({**param_group, "params": _trainable(param_group["params"])})
        for p in self.base.param_groups[-1]["params"]:
            self._init_param_state(p)

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def penalty(self) -> torch.Tensor:
        """The penalty (a differentiable scalar) at the current parameter values."""
        total = torch.zeros(())
        for p in self._params():
            st = self.state[p]
            total = total + (st["importance"] * (p - st["anchor"]) ** 2).sum()
        return self.penalty_scale * self.strength * total

    @torch.no_grad()
    def _add_penalty_grad(self) -> None:
        if self.n_tasks_consolidated == 0 or self.strength == 0:
            return
        coef = 2.0 * self.penalty_scale * self.strength
        for p in self._params():
            if p.grad is not None:
                st = self.state[p]
                p.grad.add_(coef * st["importance"] * (p - st["anchor"]))

    def _before_step(self) -> None:
        """Hook before the penalty gradient is added (``p.grad`` = task-loss gradient)."""

    def _after_step(self) -> None:
        """Hook after the base optimizer's step."""

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One step: closure (task loss), penalty gradient, base optimizer step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._before_step()
        self._add_penalty_grad()
        self.base.step()
        self._after_step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none)

    def _task_importance(self, p: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def new_task(self) -> None:
        """Task boundary: fold this task's importance in and anchor at the current values."""
        for p in self._params():
            st = self.state[p]
            st["importance"] = self._fold(st["importance"], self._task_importance(p))
            st["anchor"] = p.detach().clone()
        self.n_tasks_consolidated += 1

    def _fold(self, accumulated: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        return accumulated + new

    def _counters(self) -> dict[str, int]:
        """Bookkeeping saved with the state dict besides the per-parameter buffers."""
        return {"n_tasks_consolidated": self.n_tasks_consolidated}

    def _load_counters(self, counters: dict[str, int]) -> None:
        self.n_tasks_consolidated = counters["n_tasks_consolidated"]

    def state_dict(self) -> dict[str, Any]:
        return {
            "base": self.base.state_dict(),
            "regularizer": super().state_dict(),
            "counters": self._counters(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base.load_state_dict(state_dict["base"])
        super().load_state_dict(state_dict["regularizer"])
        self.param_groups = self.base.param_groups
        counters = state_dict.get("counters")
        if counters is None:  # written before the counters were saved: infer them
            consolidated = any(self.state[p]["importance"].any() for p in self._params())
            counters = {**self._counters(), "n_tasks_consolidated": int(consolidated)}
        self._load_counters(counters)


class EWC(QuadraticRegularizer):
    """Elastic weight consolidation: Fisher-weighted penalty ``strength/2 * F (theta - theta*)^2``.

    Args:
        params: parameters or groups (see :class:`QuadraticRegularizer`).
        base: base optimizer class or factory.
        strength: penalty coefficient.
        **base_options: passed to ``base``.
        n_fisher: examples used to estimate the Fisher at each task end (>= 1).
        gamma: decay of the accumulated Fisher (1 = plain sum over tasks; >= 0).

    Without an ``end_task`` call (outside :func:`~metaopt.continual.runner.run_stream`),
    ``new_task()`` falls back to the mean squared minibatch gradient of the task.
    """

    penalty_scale = 0.5

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        base: BaseFactory = torch.optim.Adam,
        *,
        strength: float = 100.0,
        n_fisher: int = 200,
        gamma: float = 1.0,
        **base_options: Any,
    ) -> None:
        if n_fisher < 1:
            raise ValueError(f"n_fisher must be >= 1, got {n_fisher}")
        if not (math.isfinite(gamma) and gamma >= 0):
            raise ValueError(f"gamma must be finite and >= 0, got {gamma}")
        super().__init__(params, base, strength=strength, **base_options)
        self.n_fisher = n_fisher
        self.gamma = gamma
        self._n_steps = 0

    def _init_param_state(self, p: torch.Tensor) -> None:
        super()._init_param_state(p)
        self._clear_task_buffers(p)

    def _clear_task_buffers(self, p: torch.Tensor) -> None:
        self.state[p]["fisher"] = None
        self.state[p]["grad_sq"] = torch.zeros_like(p)

    def _reset_task_buffers(self) -> None:
        for p in self._params():
            self._clear_task_buffers(p)
        self._n_steps = 0

    @torch.no_grad()
    def _before_step(self) -> None:
        for p in self._params():
            if p.grad is not None:
                self.state[p]["grad_sq"].add_(p.grad**2)
        self._n_steps += 1

    def end_task(self, context: TaskContext) -> None:
        """Estimate the diagonal Fisher on the finished task (labels sampled from the model)."""
        params = self._params()
        fisher = [torch.zeros_like(p) for p in params]
        x = context.task.x_train[: self.n_fisher]
        was_training = context.model.training
        context.model.eval()
        for i in range(len(x)):
            log_probs = torch.log_softmax(context.logits(x[i : i + 1]), dim=1)
            label = torch.multinomial(log_probs.detach().exp()[0], 1).item()
            grads = torch.autograd.grad(log_probs[0, label], params, allow_unused=True)
            for f, g in zip(fisher, grads, strict=True):
                if g is not None:
                    f.add_(g**2)
        context.model.train(was_training)
        for p, f in zip(params, fisher, strict=True):
            self.state[p]["fisher"] = f / max(1, len(x))

    def _counters(self) -> dict[str, int]:
        return {**super()._counters(), "n_steps": self._n_steps}

    def _load_counters(self, counters: dict[str, int]) -> None:
        super()._load_counters(counters)
        self._n_steps = counters["n_steps"]

    def _task_importance(self, p: torch.Tensor) -> torch.Tensor:
        st = self.state[p]
        if st["fisher"] is not None:
            return st["fisher"]
        return st["grad_sq"] / max(1, self._n_steps)

    def _fold(self, accumulated: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        return self.gamma * accumulated + new

    def new_task(self) -> None:
        super().new_task()
        self._reset_task_buffers()


class SI(QuadraticRegularizer):
    """Synaptic intelligence: path-integral importance, penalty ``c * Omega (theta - theta*)^2``.

    Args:
        params: parameters or groups (see :class:`QuadraticRegularizer`).
        base: base optimizer class or factory.
        strength: penalty coefficient.
        **base_options: passed to ``base``.
        xi: damping of the importance denominator (> 0).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        base: BaseFactory = torch.optim.Adam,
        *,
        strength: float = 1.0,
        xi: float = 0.1,
        **base_options: Any,
    ) -> None:
        if not (math.isfinite(xi) and xi > 0):
            raise ValueError(f"xi must be > 0 (it damps a division by delta^2), got {xi}")
        super().__init__(params, base, strength=strength, **base_options)
        self.xi = xi

    def _init_param_state(self, p: torch.Tensor) -> None:
        super()._init_param_state(p)
        self.state[p]["path"] = torch.zeros_like(p)

    @torch.no_grad()
    def _before_step(self) -> None:
        for p in self._params():
            st = self.state[p]
            st["task_grad"] = None if p.grad is None else p.grad.clone()
            st["previous"] = p.detach().clone()

    @torch.no_grad()
    def _after_step(self) -> None:
        for p in self._params():
            st = self.state[p]
            if st["task_grad"] is not None:
                st["path"].sub_(st["task_grad"] * (p - st["previous"]))

    def _task_importance(self, p: torch.Tensor) -> torch.Tensor:
        st = self.state[p]
        delta = p.detach() - st["anchor"]
        return st["path"].clamp(min=0) / (delta**2 + self.xi)

    def new_task(self) -> None:
        super().new_task()
        for p in self._params():
            self.state[p]["path"].zero_()
