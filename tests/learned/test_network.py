"""LearnedRuleNet: the encoder written out for torch.compile equals nn.TransformerEncoder."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from metaopt.learned import LearnedRuleNet
from metaopt.learned.features import N_TASK_FEATURES, N_TOKEN_FEATURES
from metaopt.learned.network import _encoder_layer


def _random_net(seed: int, **config: int) -> LearnedRuleNet:
    torch.manual_seed(seed)
    net = LearnedRuleNet(**config).double()
    for p in net.parameters():  # a fresh net has a zero head: make every path matter
        torch.nn.init.normal_(p, std=0.5)
    return net


@settings(max_examples=25, deadline=None)
@given(
    heads_and_width=st.sampled_from([(1, 4), (2, 8), (4, 16), (4, 32)]),
    d_ff=st.sampled_from([4, 16, 64]),
    n_tokens=st.integers(1, 40),
    grad=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_written_out_layer_equals_the_module(heads_and_width, d_ff, n_tokens, grad, seed):
    n_heads, d_model = heads_and_width
    net = _random_net(seed, d_model=d_model, n_heads=n_heads, d_ff=d_ff, n_layers=1).eval()
    layer = net.encoder.layers[0]
    x = torch.randn(n_tokens, d_model, dtype=torch.float64)
    with torch.set_grad_enabled(grad):  # without gradients the module takes its fast path
        expected = layer(x[None])[0]
        got = _encoder_layer(layer, x)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_written_out_layer_has_the_module_gradients():
    net = _random_net(0, d_model=8, n_heads=2, d_ff=16, n_layers=1)
    layer = net.encoder.layers[0]
    x = torch.randn(5, 8, dtype=torch.float64)
    params = list(layer.parameters())
    expected = torch.autograd.grad(layer(x[None])[0].square().sum(), params)
    got = torch.autograd.grad(_encoder_layer(layer, x).square().sum(), params)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("grad", [False, True])
def test_compiled_net_equals_eager_net(grad):
    torch._dynamo.reset()
    net = _random_net(1, d_model=8, n_heads=2, d_ff=16, n_layers=2)
    tokens = torch.randn(6, N_TOKEN_FEATURES, dtype=torch.float64)
    task = torch.randn(N_TASK_FEATURES, dtype=torch.float64)
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    with torch.set_grad_enabled(grad):
        for got, expected in zip(compiled(tokens, task), net(tokens, task), strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_bad_token_shape_is_rejected():
    with pytest.raises(ValueError, match="tokens must be"):
        LearnedRuleNet()(torch.zeros(3, N_TOKEN_FEATURES + 1), torch.zeros(N_TASK_FEATURES))


@pytest.mark.parametrize("grad", [False, True])
def test_a_net_without_encoder_layers_treats_tokens_one_by_one(grad):
    """``n_layers=0`` (a valid configuration) runs eagerly and compiled: no attention,
    so each token's coefficients depend on that token alone (and the task token's
    embedding is dropped with it)."""
    torch._dynamo.reset()
    net = _random_net(2, d_model=8, n_heads=2, d_ff=16, n_layers=0)
    tokens = torch.randn(6, N_TOKEN_FEATURES, dtype=torch.float64)
    task = torch.randn(N_TASK_FEATURES, dtype=torch.float64)
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    with torch.set_grad_enabled(grad):
        whole = net(tokens, task)
        alone = net(tokens[2:3], task)
        for a, b in zip(whole, compiled(tokens, task), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for a, b in zip(whole, alone, strict=True):
        torch.testing.assert_close(a[2:3], b, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(whole.log_scale[0], whole.log_scale[1])
