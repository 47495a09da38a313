"""Tutorial (c): MAML-style few-shot sine regression with a differentiable functional rule.

Meta-learns the initial weights and the inner learning rate; the meta-gradient flows
through ``metaopt.rules.sgd``'s update (second order).

    python examples/maml.py                  # 2,000 meta-iterations
    python examples/maml.py --smoke
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from torch.func import functional_call

import metaopt
from metaopt import rules

Batch = tuple[torch.Tensor, torch.Tensor]


def sample_task(gen: torch.Generator, k: int = 10) -> tuple[Batch, Batch]:
    """Support and query sets ``(x [k, 1], y [k, 1])`` of one random sine wave."""
    amplitude = torch.empty(()).uniform_(0.5, 3.0, generator=gen)
    phase = torch.empty(()).uniform_(0.0, math.pi, generator=gen)
    x = torch.empty(2 * k, 1).uniform_(-5.0, 5.0, generator=gen)
    y = amplitude * torch.sin(x + phase)
    return (x[:k], y[:k]), (x[k:], y[k:])


class FewShot:
    """A model, its inner loop (``steps`` updates of ``rules.sgd``) and its evaluation."""

    def __init__(self, inner_steps: int) -> None:
        self.model = torch.nn.Sequential(
            torch.nn.Linear(1, 40), torch.nn.ReLU(),
            torch.nn.Linear(40, 40), torch.nn.ReLU(),
            torch.nn.Linear(40, 1),
        )
        self.inner_steps = inner_steps

    def loss(self, params: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(functional_call(self.model, params, (x,)), y)

    def adapt(self, init, lr, support: Batch, create_graph: bool = True):
        rule = rules.sgd(lr=lr)
        params, state = dict(init), rule.init(init)
        for _ in range(self.inner_steps):
            grads = torch.autograd.grad(
                self.loss(params, support), list(params.values()), create_graph=create_graph
            )
            updates, state = rule.update(dict(zip(params, grads, strict=True)), state, params)
            params = metaopt.apply_updates(params, updates)
        return params

    def evaluate(self, init, lr, n_tasks: int = 100) -> float:
        gen = torch.Generator().manual_seed(1234)
        total = 0.0
        for _ in range(n_tasks):
            support, query = sample_task(gen)
            total += self.loss(self.adapt(init, lr, support, create_graph=False), query).item()
        return total / n_tasks


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--meta-batch", type=int, default=4)
    parser.add_argument("--inner-steps", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny run for the tests")
    args = parser.parse_args(argv)
    iterations = 100 if args.smoke else args.iterations

    torch.manual_seed(args.seed)
    learner = FewShot(args.inner_steps)
    init = {k: v.detach().clone().requires_grad_(True) for k, v in learner.model.named_parameters()}
    log_lr = torch.tensor(math.log(0.01), requires_grad=True)
    meta_opt = torch.optim.Adam([*init.values(), log_lr], lr=3e-3)

    before = learner.evaluate(init, log_lr.exp().detach())
    gen = torch.Generator().manual_seed(args.seed)
    for _ in range(iterations):
        meta_opt.zero_grad()
        meta_loss = sum(
            learner.loss(learner.adapt(init, log_lr.exp(), support), query)
            for support, query in (sample_task(gen) for _ in range(args.meta_batch))
        ) / args.meta_batch
        meta_loss.backward()
        meta_opt.step()
    after = learner.evaluate(init, log_lr.exp().detach())
    print(
        f"query MSE after {args.inner_steps} inner step(s): {before:.3f} before meta-training, "
        f"{after:.3f} after; inner lr {log_lr.exp().item():.4f}"
    )
    return {"before": before, "after": after, "inner_lr": log_lr.exp().item()}


if __name__ == "__main__":
    main()
