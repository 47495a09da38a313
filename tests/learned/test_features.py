"""Token layout, sampling and static descriptors."""

from __future__ import annotations

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from metaopt.learned.features import (
    KINDS,
    N_STATIC_FEATURES,
    STATIC_FEATURES,
    layout_of,
    sample_index,
    static_descriptor,
)


@given(
    numel=st.integers(1, 300_000),
    max_block=st.integers(1, 70_000),
    leading=st.integers(1, 50),
)
def test_layout_covers_tensor_with_bounded_tokens(numel, max_block, leading):
    lay = layout_of(numel, max_block, leading)
    assert lay.rows * lay.cols == numel
    assert lay.rows_per_token * lay.cols <= max(max_block, lay.cols)
    assert lay.cols <= max_block or (lay.rows == 1 and numel <= max_block)
    assert lay.n_tokens == math.ceil(lay.rows / lay.rows_per_token)
    assert lay.n_tokens * max_block >= numel


def test_layout_prefers_the_tensors_own_rows():
    assert layout_of(1000 * 300, 65536, 1000) == (1000, 300, 218, 5)
    assert layout_of(500, 65536, 10).n_tokens == 1


@given(numel=st.integers(1, 5000), max_block=st.integers(1, 600), sample=st.integers(1, 64))
def test_sample_index_stays_inside_each_token(numel, max_block, sample):
    lay = layout_of(numel, max_block)
    index = sample_index(lay, sample, torch.device("cpu")).view(lay.n_tokens, sample)
    span = lay.rows_per_token * lay.cols
    token_of = index // span
    assert torch.equal(token_of, torch.arange(lay.n_tokens)[:, None].expand_as(token_of))
    assert int(index.max()) < numel and int(index.min()) >= 0


def test_static_descriptor_recognises_kinds_and_shapes():
    def kind(name, shape):
        d = static_descriptor(name, torch.Size(shape), 0.25)
        assert (
            d.shape == (N_STATIC_FEATURES,) and d[STATIC_FEATURES.index("depth_fraction")] == 0.25
        )
        return KINDS[int(d[-len(KINDS) :].argmax())]

    assert kind("layers.0.weight", (8, 4)) == "weight"
    assert kind("layers.0.bias", (8,)) == "bias"
    assert kind("bn1.weight", (8,)) == "norm"
    assert kind("encoder.layers.0.norm1.bias", (8,)) == "norm"
    assert kind("tok_embedding.weight", (100, 8)) == "embedding"
    d = static_descriptor("conv.weight", torch.Size((16, 3, 3, 3)), 0.0)
    assert d[STATIC_FEATURES.index("ndim_ge_3")] == 1.0
    assert math.isclose(
        float(d[STATIC_FEATURES.index("log_fan_in")]), math.log1p(27) / 10, rel_tol=1e-6
    )
