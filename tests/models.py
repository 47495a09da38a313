"""Small random architectures shared by tests: MLP, CNN with batchnorm, transformer encoder."""

from __future__ import annotations

import torch
from torch import nn


def mlp(width: int = 16, depth: int = 2, n_in: int = 8, n_out: int = 3) -> nn.Module:
    layers: list[nn.Module] = []
    d = n_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.Tanh()]
        d = width
    layers.append(nn.Linear(d, n_out))
    return nn.Sequential(*layers)


def cnn(channels: int = 4, n_out: int = 3) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * channels, n_out),
    )


class TinyTransformer(nn.Module):
    """Token embedding, a one-layer ``nn.TransformerEncoder`` and a linear head."""

    def __init__(self, d_model: int = 8, heads: int = 2, n_in: int = 8, n_out: int = 3):
        super().__init__()
        self.embed = nn.Linear(1, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, heads, dim_feedforward=2 * d_model, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.embed(x.reshape(x.shape[0], -1, 1)))
        return self.head(h.mean(dim=1))


def build(kind: str, size: int, seed: int, dtype: torch.dtype = torch.float64):
    """``(model, inputs, targets)`` for ``kind`` in {"mlp", "cnn", "transformer"}."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if kind == "mlp":
        model, x = mlp(width=size), torch.randn(12, 8, generator=gen)
    elif kind == "cnn":
        model, x = cnn(channels=size), torch.randn(6, 1, 6, 6, generator=gen)
    elif kind == "transformer":
        model, x = TinyTransformer(d_model=2 * max(1, size // 2)), torch.randn(6, 8, generator=gen)
    else:
        raise ValueError(kind)
    y = torch.randint(0, 3, (x.shape[0],), generator=gen)
    return model.to(dtype), x.to(dtype), y


KINDS = ("mlp", "cnn", "transformer")
