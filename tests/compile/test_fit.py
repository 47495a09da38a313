"""fit: trains, writes the result back into the module, compiled == eager."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import metaopt
from metaopt.compile import fit, tensor_hyper
from tests.compile.compile_models import batches, build


def separable_batches(n_batches: int = 6, size: int = 8, seed: int = 0):
    """Three Gaussian blobs in 8-d: learnable, so the loss must fall."""
    gen = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(3, 8, generator=gen)
    out = []
    for _ in range(n_batches):
        y = torch.randint(0, 3, (size,), generator=gen)
        out.append((centres[y] + torch.randn(size, 8, generator=gen), y))
    return out


def test_fit_eager_trains_and_writes_back():
    model = build("mlp")
    weight = model[0].weight
    before = weight.detach().clone()
    *train, held_out = separable_batches(7)
    result = fit(model, train, metaopt.rules.adam(lr=0.05), epochs=4, compile=False)
    assert result.step_losses.shape == (4 * 6,)
    assert len(result.epoch_losses) == 4
    assert result.epoch_losses[-1] < 0.5 * result.epoch_losses[0]
    assert model[0].weight is weight  # same tensor, updated in place
    assert not torch.equal(weight.detach(), before)
    # the module now computes what the final parameters compute
    x, y = held_out
    with torch.no_grad():
        final_loss = F.cross_entropy(model(x), y).item()
    assert final_loss < result.epoch_losses[0]


def test_fit_writes_batchnorm_buffers_back():
    model = build("cnn")
    data = batches("cnn", 3)
    fit(model, data, metaopt.rules.sgd(lr=0.1), epochs=2, compile=False)
    assert int(model[1].num_batches_tracked) == 6
    assert model[1].running_mean.abs().sum() > 0


def test_fit_compiled_matches_eager():
    data = separable_batches()
    models = [build("mlp"), build("mlp")]
    rule, _ = tensor_hyper(metaopt.rules.adam, lr=0.05)
    compiled = fit(models[0], data, rule, epochs=2)
    eager = fit(models[1], data, rule, epochs=2, compile=False)
    torch.testing.assert_close(compiled.step_losses, eager.step_losses, atol=1e-5, rtol=1e-5)
    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5)
    # the compiled step updates private copies in place: a failure midway leaves the
    # module and the given opt_state as they were
    params = [p.detach().clone() for p in models[0].parameters()]
    state = torch.utils._pytree.tree_map(torch.clone, compiled.opt_state)
    bad = [(torch.randn(8, 5), torch.randint(0, 3, (8,)))]  # wrong input width
    with pytest.raises(Exception, match=r"shape|size"):
        fit(models[0], data + bad, rule, epochs=1, opt_state=compiled.opt_state)
    for p, q in zip(models[0].parameters(), params, strict=True):
        assert torch.equal(p.detach(), q)
    for x, y in zip(
        torch.utils._pytree.tree_leaves(compiled.opt_state),
        torch.utils._pytree.tree_leaves(state),
        strict=True,
    ):
        assert torch.equal(x, y)


def test_fit_bad_input_leaves_model_unchanged():
    model = build("mlp")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="epochs"):
        fit(model, separable_batches(), metaopt.rules.adam(), epochs=0, compile=False)
    with pytest.raises(ValueError, match="no batch"):
        fit(model, [], metaopt.rules.adam(), epochs=1, compile=False)
    bad = [(torch.randn(8, 5), torch.randint(0, 3, (8,)))]  # wrong input width
    with pytest.raises(RuntimeError):
        fit(model, separable_batches() + bad, metaopt.rules.adam(), epochs=1, compile=False)
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p.detach(), q)


def test_fit_continues_from_opt_state():
    """Two calls of one epoch, the second continuing the rule state, equal one call of two."""
    data = separable_batches()
    rule = metaopt.rules.adam(lr=0.05)
    once, twice = build("mlp"), build("mlp")
    fit(once, data, rule, epochs=2, compile=False)
    first = fit(twice, data, rule, epochs=1, compile=False)
    fit(twice, data, rule, epochs=1, opt_state=first.opt_state, compile=False)
    for p, q in zip(once.parameters(), twice.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)
