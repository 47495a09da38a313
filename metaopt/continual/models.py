"""Small reference models for continual-learning benchmarks: MLP, CNN, ViT-style transformer.

All take images ``[B, C, H, W]`` and return logits ``[B, n_outputs]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["MLP", "MODELS", "SmallCNN", "SmallViT", "build_model"]


class MLP(nn.Module):
    """Fully connected ReLU network on flattened images (default 2 hidden layers of 400)."""

    def __init__(
        self, input_shape: Sequence[int], n_outputs: int, hidden: Sequence[int] = (400, 400)
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, n_outputs))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """Conv-BatchNorm-ReLU blocks (each halving the resolution), global average pool, linear."""

    def __init__(
        self, input_shape: Sequence[int], n_outputs: int, channels: Sequence[int] = (16, 32)
    ) -> None:
        super().__init__()
        smallest = 2 ** len(channels)  # each block halves the resolution
        if min(input_shape[1:]) < smallest:
            raise ValueError(
                f"the CNN needs images of at least {smallest}x{smallest} pixels, got "
                f"{tuple(input_shape)}; use the mlp for flat [N, D] data"
            )
        layers: list[nn.Module] = []
        c_in = input_shape[0]
        for c in channels:
            layers += [
                nn.Conv2d(c_in, c, 3, padding=1, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            c_in = c
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, n_outputs)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _default_patch(size: int) -> int:
    """Largest divisor of ``size`` that gives at least 4 patches per side."""
    return max(p for p in range(1, size // 4 + 1) if size % p == 0) if size >= 4 else 1


class SmallViT(nn.Module):
    """ViT-style transformer: linear patch embedding, CLS token, pre-norm encoder, linear head.

    Args:
        input_shape: ``(C, H, W)``.
        n_outputs: number of logits.
        patch: patch side in pixels (must divide H and W); default gives 4x4 patches grid
            for 8x8 and 28x28 inputs.
        dim: embedding width.
        depth: number of encoder layers.
        heads: number of attention heads.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        n_outputs: int,
        patch: int | None = None,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
    ) -> None:
        super().__init__()
        c, h, w = input_shape
        patch = patch or _default_patch(math.gcd(h, w))
        if h % patch or w % patch:
            raise ValueError(f"patch {patch} does not divide the image size {h}x{w}")
        n_patches = (h // patch) * (w // patch)
        self.embed = nn.Conv2d(c, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, n_patches + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(len(x), -1, -1), tokens], dim=1) + self.pos
        return self.head(self.norm(self.encoder(tokens)[:, 0]))


MODELS = {"mlp": MLP, "cnn": SmallCNN, "transformer": SmallViT}
"""Model names accepted by :func:`build_model`."""


def build_model(
    name: str, input_shape: Sequence[int], n_outputs: int, **kwargs: object
) -> nn.Module:
    """Build a reference model by name.

    Args:
        name: ``"mlp"``, ``"cnn"`` or ``"transformer"``.
        input_shape: ``(C, H, W)`` of one image.
        n_outputs: number of logits.
        **kwargs: model options (``hidden=``, ``channels=``, ``dim=``...).
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
    return MODELS[name](tuple(input_shape), n_outputs, **kwargs)
