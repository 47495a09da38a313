"""Tiny models, batches and references for the compile tests (small: compiling stays cheap)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters
from torch.func import grad

import metaopt
from metaopt.compile import loss_and_buffers


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))


def cnn_bn() -> nn.Module:
    """Conv (no bias: a bias before batchnorm has a zero gradient that Adam would
    normalise from rounding noise), batchnorm, ReLU, pooling, linear head."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 3),
    )


class TinyTransformer(nn.Module):
    """Each of the 8 input features is a token: embedding, one encoder layer, mean, head.

    The encoder layer has no biases: the key bias of attention has a zero gradient
    (softmax ignores a constant shift), which Adam would normalise from rounding noise.
    """

    def __init__(self, d_model: int = 8) -> None:
        super().__init__()
        self.embed = nn.Linear(1, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, 2, dim_feedforward=16, dropout=0.0, batch_first=True, bias=False
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.embed(x.reshape(x.shape[0], -1, 1)))
        return self.head(h.mean(dim=1))


BUILDERS = {"mlp": mlp, "cnn": cnn_bn, "transformer": TinyTransformer}


def build(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return BUILDERS[kind]()


def batches(kind: str, n: int, seed: int = 0, size: int = 8) -> list[tuple[torch.Tensor, ...]]:
    """``n`` random ``(x, y)`` batches for ``kind`` (3 classes)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (size, 1, 6, 6) if kind == "cnn" else (size, 8)
    return [
        (torch.randn(*shape, generator=gen), torch.randint(0, 3, (size,), generator=gen))
        for _ in range(n)
    ]


def graph_breaks() -> int:
    """Graph breaks Dynamo has counted in this process so far (compare before/after)."""
    return sum(counters["graph_break"].values())


def unrolled_meta_grad(model, factory, meta, params, buffers, train, val):
    """Reference: torch.func.grad through the whole Python unroll (eager)."""

    def meta_loss(m):
        p, b, s = params, buffers, factory(m).init(params)
        for batch in train:
            g, b = grad(lambda q, b=b, batch=batch: loss_and_buffers(
                model, F.cross_entropy, q, b, batch), has_aux=True)(p)
            u, s = factory(m).update(g, s, p)
            p = metaopt.apply_updates(p, u)
        return loss_and_buffers(model, F.cross_entropy, p, b, val)[0]

    return grad(meta_loss)(meta)


def train_with_torch_optim(
    model: nn.Module, opt: torch.optim.Optimizer, data, sched=None
) -> list[torch.Tensor]:
    """Train ``model`` in place with ``opt`` (stepping ``sched`` after each step, if given)
    on cross-entropy over ``data``; returns the losses before each step."""
    losses = []
    for x, y in data:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.detach())
    return losses
