"""Small problems and a toy learnable rule shared by the metaopt.meta tests."""

from __future__ import annotations

import torch
from torch import nn

from metaopt.meta import InnerProblem, SupervisedProblem
from metaopt.rules import UpdateRule, per_leaf
from metaopt.tree import Params


def toy_rule(mp: Params) -> UpdateRule:
    """A learnable rule: momentum with a learned decay, learned mix of g and m, learned lr.

    ``m = sigmoid(b) m + (1 - sigmoid(b)) g``; update ``-exp(log_lr) (mix0 g + mix1 m)``.
    """

    beta = torch.sigmoid(mp["b"])
    lr = torch.exp(mp["log_lr"])

    def update_leaf(g, m, p):
        m = beta * m + (1 - beta) * g
        return -lr * (mp["mix"][0] * g + mp["mix"][1] * m), m

    return per_leaf(torch.zeros_like, update_leaf, "toy")


def toy_meta_params(dtype: torch.dtype = torch.float64) -> Params:
    return {
        "b": torch.tensor(0.5, dtype=dtype),
        "log_lr": torch.tensor(-2.0, dtype=dtype),
        "mix": torch.tensor([0.7, 0.4], dtype=dtype),
    }


def tiny_mlp(n_in: int = 3, hidden: int = 4, n_out: int = 2, batchnorm: bool = False) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(n_in, hidden)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(hidden))
    layers += [nn.Tanh(), nn.Linear(hidden, n_out)]
    return nn.Sequential(*layers)


def classification_problem(
    seed: int = 0,
    steps: int = 4,
    batchnorm: bool = False,
    dtype: torch.dtype = torch.float64,
    n_batches: int = 2,
    batch: int = 8,
    **kw,
) -> SupervisedProblem:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = tiny_mlp(batchnorm=batchnorm)
    batches = [
        (torch.randn(batch, 3, generator=g), torch.randint(0, 2, (batch,), generator=g))
        for _ in range(n_batches)
    ]
    meta = (torch.randn(16, 3, generator=g), torch.randint(0, 2, (16,), generator=g))
    return SupervisedProblem(model, batches, meta, num_steps=steps, dtype=dtype, **kw)


class QuadraticProblem(InnerProblem):
    """Inner loss ``0.5 w^T A w - b^T w`` from ``w0 = meta_params['w0']``; meta-loss
    ``0.5 ||w - c||^2`` after every step. With a fixed-lr rule the meta-loss is quadratic
    in ``w0``."""

    def __init__(self, dim: int = 4, steps: int = 3, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        q = torch.randn(dim, dim, generator=g, dtype=torch.float64)
        self.A = q @ q.T / dim + torch.eye(dim, dtype=torch.float64)
        self.b = torch.randn(dim, generator=g, dtype=torch.float64)
        self.c = torch.randn(dim, generator=g, dtype=torch.float64)
        self.num_steps = steps

    def init(self, meta_params: Params) -> tuple[Params, Params]:
        w0 = meta_params["w0"]
        return {"w": w0 if w0.requires_grad else w0.clone().requires_grad_(True)}, {}

    def inner_loss(self, params, buffers, step):
        w = params["w"]
        return 0.5 * w @ self.A @ w - self.b @ w, buffers

    def meta_loss(self, params, buffers, step):
        d = params["w"] - self.c
        return 0.5 * d @ d
