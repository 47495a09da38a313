"""Helpers shared by the learned-rule tests."""

from __future__ import annotations

import torch

from metaopt.learned import LearnedRuleNet


def perturbed_net(
    seed: int = 0, std: float = 0.3, dtype: torch.dtype = torch.float32, **kw
) -> LearnedRuleNet:
    """A small LearnedRuleNet whose zero output layer is replaced by random values, so that
    every coefficient (scale, corrections, gate, lambda, rho) is active."""
    torch.manual_seed(seed)
    net = LearnedRuleNet(d_model=16, n_heads=2, n_layers=1, d_ff=16, **kw).to(dtype)
    with torch.no_grad():
        net.head.weight.normal_(0.0, std)
        net.head.bias.normal_(0.0, std)
        net.head.bias[4] = -0.3  # gate raw < 0 -> gate 1 before clamping: keep it away from 0
        net.head.bias[5] = 1.0  # lambda > 0
        net.head.bias[6] = 1.0  # rho > 0
    return net


def copy_params(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in params.items()}


def mlp_params(dtype: torch.dtype = torch.float64, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4), torch.nn.LayerNorm(4)
    ).to(dtype)
    return {k: v.detach().clone() for k, v in model.named_parameters()}
