"""Reference models: output shapes for several input shapes, errors."""

from __future__ import annotations

import pytest
import torch

from metaopt.continual.models import build_model


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 12, 16)])
def test_output_shape_and_gradients(name: str, shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    model = build_model(name, shape, 7)
    out = model(torch.rand(5, *shape))
    assert out.shape == (5, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_options_and_errors() -> None:
    small = build_model("mlp", (1, 8, 8), 3, hidden=(16,))
    assert sum(p.numel() for p in small.parameters()) == 64 * 16 + 16 + 16 * 3 + 3
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet", (1, 8, 8), 3)
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        build_model("mlp", (8, 8), 3)
    with pytest.raises(ValueError, match="does not divide"):
        build_model("transformer", (1, 8, 8), 3, patch=3)
