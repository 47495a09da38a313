"""Hypothesis over random architectures: the learned optimizer keeps every parameter
finite, in shape and in dtype, through task boundaries."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from metaopt import LearnedOptimizer
from tests.learned.helpers import perturbed_net

BLOCKS = ("linear", "conv", "attention", "norm")


class RandomNet(nn.Module):
    """Embedding -> a random stack of blocks over [batch, seq, width] -> linear head."""

    def __init__(self, blocks: list[str], width: int, vocab: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        layers = []
        for kind in blocks:
            if kind == "linear":
                layers.append(nn.Linear(width, width))
            elif kind == "conv":
                layers.append(nn.Conv1d(width, width, 3, padding=1))
            elif kind == "attention":
                layers.append(nn.MultiheadAttention(width, 2, batch_first=True))
            else:
                layers.append(nn.LayerNorm(width))
        self.blocks = nn.ModuleList(layers)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        for layer in self.blocks:
            if isinstance(layer, nn.Conv1d):
                h = torch.tanh(layer(h.transpose(1, 2)).transpose(1, 2))
            elif isinstance(layer, nn.MultiheadAttention):
                h = h + layer(h, h, h, need_weights=False)[0]
            else:
                h = torch.tanh(layer(h))
        return self.head(h)


@settings(max_examples=8)
@given(
    blocks=st.lists(st.sampled_from(BLOCKS), min_size=1, max_size=4),
    width=st.sampled_from([2, 4, 6]),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    max_block=st.sampled_from([8, 65536]),
    seed=st.integers(0, 100),
)
def test_random_architectures_stay_finite_with_shapes_and_dtypes(
    blocks, width, dtype, max_block, seed
):
    torch.manual_seed(seed)
    model = RandomNet(blocks, width, vocab=7).to(dtype)
    shapes = {k: (p.shape, p.dtype) for k, p in model.named_parameters()}
    opt = LearnedOptimizer(
        model.named_parameters(), lr=0.05, net=perturbed_net(seed, std=1.0), max_block=max_block
    )
    tokens = torch.randint(0, 7, (3, 5))
    for step in range(4):
        if step == 2:
            opt.new_task()
        opt.zero_grad()
        logits = model(tokens).float()
        nn.functional.cross_entropy(logits.reshape(-1, 7), tokens.reshape(-1)).backward()
        opt.step()
    for name, p in model.named_parameters():
        assert (p.shape, p.dtype) == shapes[name]
        assert torch.isfinite(p).all(), name
        assert all(torch.isfinite(v).all() for v in opt.state[p].values()), name
