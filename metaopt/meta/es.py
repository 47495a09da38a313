"""Evolution strategies: antithetic ES and persistent ES (PES). No graph is kept.

Both estimate the gradient of the Gaussian-smoothed meta-loss
``E_eps[L(phi + sigma * eps)]``, ``eps ~ N(0, I)``, from meta-loss evaluations only, so
they work for horizons where backpropagation explodes or is too expensive, and for
non-differentiable inner loops. For a meta-loss that is quadratic in ``phi`` the
antithetic estimate is unbiased for the true gradient.

* :class:`ES`: each antithetic pair runs the whole trajectory at ``phi +/- sigma eps``:
  ``g = mean_i (L(phi + sigma eps_i) - L(phi - sigma eps_i)) / (2 sigma) * eps_i``.
* :class:`PES` (Vicol et al., 2021): the trajectory is cut into windows of K steps; each
  window draws fresh noise, each particle keeps its own inner state across windows and
  the sum ``xi`` of the noise it has seen. The window's contribution is
  ``(L_+ - L_-) / (2 sigma) * xi``. Summed over windows it is unbiased for the whole
  horizon, unlike truncated ES, while each window is only K steps long.

The two runs of an antithetic pair (of a PES window) see the same random numbers inside
the inner loop (dropout masks, random augmentations drawn from torch's global generator):
each pair draws a seed from ``generator`` and both runs start from it (common random
numbers). So the difference ``L+ - L-`` measures the perturbation only, and a seeded
``generator`` makes the whole estimate reproducible; the caller's global random state is
restored after each run.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

from metaopt.meta.problem import (
    InnerProblem,
    MetaGradient,
    RuleFactory,
    check_count,
    check_rule_fn,
    device_of,
    scalar_loss,
)
from metaopt.meta.unroll import InnerCarry, inner_step
from metaopt.tree import Params

__all__ = ["ES", "PES"]


def _check(sigma: float, num_pairs: int) -> int:
    if not 0 < sigma < math.inf:
        raise ValueError(f"sigma must be finite and > 0, got {sigma}")
    return check_count("num_pairs", num_pairs)


def _check_meta_params(meta_params: Params) -> None:
    if not meta_params:
        raise ValueError("meta_params is empty: nothing to estimate a gradient for")


def _pair_seed(generator: torch.Generator | None) -> int:
    """The seed both runs of one antithetic pair start torch's global generator from."""
    device = generator.device if generator is not None else None  # a CUDA generator too
    return int(torch.randint(2**62, (1,), generator=generator, device=device))


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run the block from global random state ``seed``; the caller's state is restored."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _noise(meta_params: Params, generator: torch.Generator | None) -> Params:
    """Standard normal noise shaped like ``meta_params``, drawn on ``generator``'s device
    (a CPU generator for meta-parameters on a GPU gives the same noise as on the CPU)."""
    return {
        k: torch.randn(
            v.shape,
            dtype=v.dtype,
            device=generator.device if generator is not None else v.device,
            generator=generator,
        ).to(v.device)
        for k, v in meta_params.items()
    }


def _shift(meta_params: Params, eps: Params, scale: float) -> Params:
    """``meta_params + scale * eps``; a perturbation lost entirely to rounding (``sigma``
    below the resolution of a meta-parameter's dtype) raises instead of making both runs
    of a pair equal and the estimate silently zero. (Tensors on the ``meta`` device hold
    no values to check.)"""
    shifted = {k: v.detach() + scale * eps[k] for k, v in meta_params.items()}
    for k, v in meta_params.items():
        if v.device.type == "meta" or not v.numel():
            continue
        if torch.equal(shifted[k], v.detach()) and bool(eps[k].any()):
            raise ValueError(
                f"sigma={abs(scale)} is below the resolution of meta-parameter {k!r} "
                f"({v.dtype}, largest magnitude {float(v.abs().max()):.3g}): the perturbation "
                "rounds away; use a larger sigma or a wider dtype"
            )
    return shifted


def _run(
    rule_fn: RuleFactory,
    meta_params: Params,
    problem: InnerProblem,
    carry: InnerCarry | None,
    steps: range,
) -> tuple[InnerCarry, torch.Tensor]:
    """Run ``steps`` inner updates without a meta-graph; returns the carry and the summed
    meta-loss (float64) of those steps."""
    rule = rule_fn(meta_params)
    if carry is None:
        params, buffers = problem.init(meta_params)
        params = {k: p.detach() for k, p in params.items()}
        carry = InnerCarry(params, buffers, rule.init(params))
    total = torch.zeros((), dtype=torch.float64, device=device_of(meta_params))
    for step in steps:
        carry, _ = inner_step(rule, problem, carry, step, create_graph=False)
        with torch.no_grad():
            contribution = problem.meta_loss(carry.params, carry.buffers, step)
        if contribution is not None:
            total += scalar_loss(contribution, "problem.meta_loss").detach().double()
    return carry, total


class ES:
    """Antithetic evolution strategies over the whole inner trajectory.

    Args:
        rule_fn: ``meta_params -> UpdateRule``.
        sigma: standard deviation of the perturbation (units of the meta-parameters).
        num_pairs: antithetic pairs per estimate (2 * num_pairs trajectories).
        generator: source of the noise (seed it for reproducible estimates).
    """

    def __init__(
        self,
        rule_fn: RuleFactory,
        sigma: float = 0.01,
        num_pairs: int = 8,
        generator: torch.Generator | None = None,
    ) -> None:
        self.rule_fn, self.sigma, self.num_pairs, self.generator = (
            check_rule_fn(rule_fn),
            sigma,
            _check(sigma, num_pairs),
            generator,
        )

    def __call__(self, meta_params: Params, problem: InnerProblem) -> MetaGradient:
        _check_meta_params(meta_params)
        steps = range(problem.num_steps)
        grads = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in meta_params.items()}
        loss = torch.zeros((), dtype=torch.float64, device=device_of(meta_params))
        for _ in range(self.num_pairs):
            eps = _noise(meta_params, self.generator)
            seed = _pair_seed(self.generator)
            with _seeded(seed):
                _, plus = _run(
                    self.rule_fn, _shift(meta_params, eps, self.sigma), problem, None, steps
                )
            with _seeded(seed):
                _, minus = _run(
                    self.rule_fn, _shift(meta_params, eps, -self.sigma), problem, None, steps
                )
            weight = (plus - minus) / (2 * self.sigma * self.num_pairs)
            for k in grads:
                grads[k] += weight * eps[k].double()
            loss += (plus + minus) / (2 * self.num_pairs)
        return _as_meta_gradient(loss, grads, meta_params)


class PES:
    """Persistent evolution strategies: unbiased ES over a long horizon in K-step windows.

    Args:
        rule_fn: ``meta_params -> UpdateRule``.
        truncation: window length K (inner steps); ``None``: the whole trajectory is one
            window (then PES is :class:`ES`).
        sigma: perturbation standard deviation.
        num_pairs: antithetic particle pairs.
        generator: source of the noise.
    """

    def __init__(
        self,
        rule_fn: RuleFactory,
        truncation: int | None = 10,
        sigma: float = 0.01,
        num_pairs: int = 8,
        generator: torch.Generator | None = None,
    ) -> None:
        self.num_pairs = _check(sigma, num_pairs)
        if truncation is not None:
            truncation = check_count("truncation", truncation)
        self.rule_fn, self.truncation = check_rule_fn(rule_fn), truncation
        self.sigma, self.generator = sigma, generator

    def __call__(self, meta_params: Params, problem: InnerProblem) -> MetaGradient:
        _check_meta_params(meta_params)
        grads = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in meta_params.items()}
        loss = torch.zeros((), dtype=torch.float64, device=device_of(meta_params))
        window = self.truncation or max(problem.num_steps, 1)
        for _ in range(self.num_pairs):
            carries: list[InnerCarry | None] = [None, None]
            xi = {k: torch.zeros_like(v) for k, v in meta_params.items()}
            for start in range(0, problem.num_steps, window):
                steps = range(start, min(start + window, problem.num_steps))
                eps = _noise(meta_params, self.generator)
                seed = _pair_seed(self.generator)
                xi = {k: xi[k] + eps[k] for k in xi}
                totals = []
                for i, sign in enumerate((1.0, -1.0)):
                    shifted = _shift(meta_params, eps, sign * self.sigma)
                    with _seeded(seed):
                        carries[i], total = _run(self.rule_fn, shifted, problem, carries[i], steps)
                    totals.append(total)
                weight = (totals[0] - totals[1]) / (2 * self.sigma * self.num_pairs)
                for k in grads:
                    grads[k] += weight * xi[k].double()
                loss += (totals[0] + totals[1]) / (2 * self.num_pairs)
        return _as_meta_gradient(loss, grads, meta_params)


def _as_meta_gradient(loss: torch.Tensor, grads: Params, meta_params: Params) -> MetaGradient:
    dtype = next(iter(meta_params.values())).dtype
    return MetaGradient(
        loss.to(dtype), {k: g.to(meta_params[k].dtype) for k, g in grads.items()}
    )
