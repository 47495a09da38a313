"""Token layout, sampling and static descriptors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from metaopt.learned.features import (
    KINDS,
    N_STATIC_FEATURES,
    STATIC_FEATURES,
    _sample_columns_cpu,
    constant_on,
    layout_of,
    sample_columns,
    static_descriptor,
    token_pieces,
)


@given(
    numel=st.integers(1, 300_000),
    max_block=st.integers(64, 70_000),
    leading=st.integers(1, 50),
)
def test_layout_cuts_tensor_into_bounded_tokens(numel, max_block, leading):
    """Tokens cover the tensor in order, none holds more than ``4 * max_block`` elements,
    and there are at most ``4 * ceil(numel / max_block) + 1`` of them; a shorter last
    token only where no equal tokens fit those bounds."""
    leading = math.gcd(numel, leading)  # a tensor's first dimension divides its size
    lay = layout_of(numel, max_block, leading)
    assert lay.n_tokens * lay.length + lay.tail == numel
    assert 0 <= lay.tail < lay.length <= 4 * max_block
    low = math.ceil(numel / max_block)
    assert lay.total_tokens <= 4 * low + 1
    if lay.tail:
        assert not any(
            numel % n == 0 and numel // n <= 4 * max_block for n in range(1, 4 * low + 1)
        )
        assert lay.length % (numel // leading) == 0 or lay.length == max_block  # whole rows
    pieces = token_pieces(torch.arange(numel), lay)
    assert [tuple(p.shape) for p in pieces] == list(lay.segments)
    assert torch.equal(torch.cat([p.reshape(-1) for p in pieces]), torch.arange(numel))


def test_layout_prefers_whole_rows_and_few_tokens():
    assert layout_of(1000 * 300, 65536, 1000) == (5, 60000, 0)  # 200 rows per token
    assert layout_of(535 * 784, 65536, 535) == (7, 59920, 0)  # rows would need 107 tokens
    assert layout_of(2045 * 2045, 65536, 2045) == (25, 167281, 0)  # not 409 small tokens
    assert layout_of(500, 65536, 10) == (1, 500, 0)
    assert layout_of(65537, 65536) == (1, 65537, 0)  # prime: one token, within 4 x max_block


def test_a_size_without_fitting_divisors_gets_a_shorter_last_token():
    # 2 x a prime: one token of 2,000,006 elements before; now 30 blocks and the rest
    assert layout_of(2 * 1000003, 65536, 2) == (30, 65536, 33926)
    # Linear(1009, 997): 64 rows of 1009 per token, 37 rows in the last
    lay = layout_of(997 * 1009, 65536, 997)
    assert lay == (15, 64 * 1009, 37 * 1009)
    assert lay.segments == ((15, 64 * 1009), (1, 37 * 1009)) and lay.total_tokens == 16
    assert layout_of(1009, 64) == (15, 64, 49)


@given(length=st.integers(1, 5000), sample=st.integers(1, 64))
def test_sample_columns_are_evenly_spaced_inside_a_token(length, sample):
    index = sample_columns(length, sample, torch.device("cpu"))
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
    # whole words, the innermost module's deciding
    assert kind("bert.embeddings.LayerNorm.weight", (8,)) == "norm"
    assert kind("transformer.h.0.ln_1.bias", (8,)) == "norm"
    assert kind("model.layers.3.input_layernorm.weight", (8,)) == "norm"
    assert kind("pos_embed", (1, 17, 8)) == "embedding"
    for name in ("ensemble.0.weight", "member_1.weight", "subnet.fc.weight", "normal_head.w"):
        assert kind(name, (8, 4)) == "weight", name
        assert kind(name.replace("weight", "bias"), (8,)) == "bias", name
    assert kind("3", (8,)) == "bias" and kind("0", (8, 4)) == "weight"  # unnamed: by rank
    d = static_descriptor("conv.weight", torch.Size((16, 3, 3, 3)), 0.0)
    assert d[STATIC_FEATURES.index("ndim_ge_3")] == 1.0
    assert math.isclose(
        float(d[STATIC_FEATURES.index("log_fan_in")]), math.log1p(27) / 10, rel_tol=1e-6
    )


def test_constant_on_copies_an_index_to_its_device_once():
    """Outside torch.compile an index built on the CPU reaches a device once and is then
    reused (an eager GPU step copies nothing from the host; a CUDA graph can capture it)."""
    meta = torch.device("meta")
    first = constant_on(meta, _sample_columns_cpu, 100, 8)
    assert first.device == meta and first.shape == (8,)
    assert constant_on(meta, _sample_columns_cpu, 100, 8) is first
    assert constant_on(meta, _sample_columns_cpu, 100, 9) is not first
    on_cpu = constant_on(torch.device("cpu"), _sample_columns_cpu, 100, 8)
    assert torch.equal(on_cpu, torch.arange(8) * 100 // 8)
    assert torch.equal(sample_columns(100, 8, torch.device("cpu")), on_cpu)


@pytest.mark.parametrize("model_name", ["mlp", "cnn", "transformer"])
def test_kinds_of_the_meta_training_models_are_those_the_shipped_rule_saw(model_name):
    """The shipped rule was meta-trained with kinds from name substrings ("emb", "norm",
    "bn", "ln"); whole-word matching must give the same kinds on those models."""
    from metaopt.continual import build_model

    def by_substring(name, ndim):
        lowered = name.lower()
        if "emb" in lowered:
            return "embedding"
        if any(tag in lowered for tag in ("norm", "bn", "ln")):
            return "norm"
        return "bias" if ndim <= 1 else "weight"

    def kind(name, shape):
        d = static_descriptor(name, shape, 0.5)
        return KINDS[int(d[-len(KINDS) :].argmax())]

    for shape in ((1, 28, 28), (1, 8, 8)):
        for name, p in build_model(model_name, shape, 10).named_parameters():
            assert kind(name, p.shape) == by_substring(name, p.ndim), name
