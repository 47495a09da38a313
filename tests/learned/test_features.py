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
    Layout,
    layout_of,
    sample_columns,
    static_descriptor,
)


@given(
    numel=st.integers(1, 300_000),
    max_block=st.integers(64, 70_000),
    leading=st.integers(1, 50),
)
def test_layout_cuts_tensor_into_equal_bounded_tokens(numel, max_block, leading):
    lay = layout_of(numel, max_block, leading)
    assert lay.n_tokens * lay.length == numel
    low = math.ceil(numel / max_block)
    if lay.length > 4 * max_block:  # only a size without any suitable divisor
        assert lay.n_tokens == 1
        assert not any(numel % d == 0 and numel // d <= 4 * max_block for d in range(2, low))
    assert lay.n_tokens <= 4 * low or lay.length >= max_block // 64


def test_layout_prefers_whole_rows_and_few_tokens():
    assert layout_of(1000 * 300, 65536, 1000) == (5, 60000)  # 200 rows per token
    assert layout_of(535 * 784, 65536, 535) == (7, 59920)  # rows would need 107 tokens
    assert layout_of(2045 * 2045, 65536, 2045) == (25, 167281)  # not 409 small tokens
    assert layout_of(500, 65536, 10) == (1, 500)
    assert layout_of(65537, 65536) == (1, 65537)  # prime: one token


@given(length=st.integers(1, 5000), sample=st.integers(1, 64))
def test_sample_columns_are_evenly_spaced_inside_a_token(length, sample):
    index = sample_columns(Layout(3, length), sample, torch.device("cpu"))
    assert index.shape == (sample,)
    assert int(index.min()) == 0 and int(index.max()) < length
    assert bool((index[1:] >= index[:-1]).all())


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
