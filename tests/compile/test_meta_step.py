"""make_meta_step: the per-step reverse accumulation equals backprop through the unroll;
compiled == eager; compile time does not grow with the unroll length."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters
from torch.utils import _pytree as pytree

import metaopt
from metaopt.compile import make_meta_step, module_state
from tests.compile.compile_models import batches, build, graph_breaks, unrolled_meta_grad


def adam_factory(meta):
    """Adam whose learning rate and beta1 are meta-parameters (eps_root keeps the
    second derivative finite)."""
    return metaopt.rules.adam(lr=meta["lr"], betas=(meta["b1"], 0.999), eps_root=1e-8)


def sgd_factory(meta):
    return metaopt.rules.sgd(lr=meta["lr"], momentum=meta["momentum"])


def problem(kind, k, dtype=torch.float32, seed=0):
    model = build(kind, seed).to(dtype)
    data = [(x.to(dtype), y) for x, y in batches(kind, k + 1, seed)]
    params, buffers = module_state(model)
    return model, params, buffers, data[:k], data[k]


@pytest.mark.parametrize(
    ("kind", "factory", "meta"),
    [
        ("mlp", adam_factory, {"lr": 0.01, "b1": 0.9}),
        ("mlp", sgd_factory, {"lr": 0.1, "momentum": 0.5}),
        ("cnn", adam_factory, {"lr": 0.01, "b1": 0.8}),
    ],
)
def test_eager_meta_step_equals_backprop_through_unroll(kind, factory, meta):
    meta = {k: torch.tensor(v, dtype=torch.float64) for k, v in meta.items()}
    model, params, buffers, train, val = problem(kind, 4, torch.float64)
    step = make_meta_step(model, F.cross_entropy, factory, compile=False)
    out = step(meta, params, buffers, factory(meta).init(params), train, val)
    ref = unrolled_meta_grad(model, factory, meta, params, buffers, train, val)
    for name in meta:
        torch.testing.assert_close(out.meta_grads[name], ref[name], atol=1e-10, rtol=1e-8)
        assert out.meta_grads[name].abs() > 1e-6  # a real dependence, not 0 == 0
    assert out.inner_losses.shape == (4,)
    assert out.meta_loss.dim() == 0


def test_meta_step_matches_finite_differences():
    meta = {
        "lr": torch.tensor(0.05, dtype=torch.float64),
        "momentum": torch.tensor(0.5, dtype=torch.float64),
    }
    model, params, buffers, train, val = problem("mlp", 3, torch.float64)
    step = make_meta_step(model, F.cross_entropy, sgd_factory, compile=False)

    def loss_at(m):
        return step(m, params, buffers, sgd_factory(m).init(params), train, val).meta_loss

    g = step(meta, params, buffers, sgd_factory(meta).init(params), train, val).meta_grads
    h = 1e-6
    for name in meta:
        up = {**meta, name: meta[name] + h}
        down = {**meta, name: meta[name] - h}
        fd = (loss_at(up) - loss_at(down)) / (2 * h)
        torch.testing.assert_close(g[name], fd, atol=1e-7, rtol=1e-5)


def test_matches_metaopt_meta_unrolled():
    """Same number as the autograd estimator of metaopt.meta on the same problem."""
    meta_pkg = pytest.importorskip("metaopt.meta")
    meta = {
        "lr": torch.tensor(0.01, dtype=torch.float64),
        "b1": torch.tensor(0.9, dtype=torch.float64),
    }
    model, params, buffers, train, val = problem("mlp", 3, torch.float64)
    ours = make_meta_step(model, F.cross_entropy, adam_factory, compile=False)(
        meta, params, buffers, adam_factory(meta).init(params), train, val
    )
    theirs = meta_pkg.Unrolled(adam_factory)(meta, meta_pkg.SupervisedProblem(model, train, val))
    torch.testing.assert_close(ours.meta_loss, theirs.loss, atol=1e-12, rtol=1e-10)
    for name in meta:
        torch.testing.assert_close(ours.meta_grads[name], theirs.grads[name], atol=1e-10, rtol=1e-8)


def test_init_grads_are_the_maml_meta_gradient():
    """d meta_loss / d initial params equals metaopt.meta.Unrolled's gradient with respect
    to the initial weights (MAML), on the same problem."""
    meta_pkg = pytest.importorskip("metaopt.meta")
    meta = {
        "lr": torch.tensor(0.1, dtype=torch.float64),
        "momentum": torch.tensor(0.5, dtype=torch.float64),
    }
    model, params, buffers, train, val = problem("mlp", 3, torch.float64)
    ours = make_meta_step(model, F.cross_entropy, sgd_factory, compile=False)(
        meta, params, buffers, sgd_factory(meta).init(params), train, val
    )
    init = {"init." + k: v for k, v in params.items()}
    theirs = meta_pkg.Unrolled(lambda m: sgd_factory(meta))(
        init, meta_pkg.SupervisedProblem(model, train, val, init_prefix="init.")
    )
    for name in params:
        torch.testing.assert_close(
            ours.init_grads[name], theirs.grads["init." + name], atol=1e-10, rtol=1e-8
        )
    assert max(float(g.abs().max()) for g in ours.init_grads.values()) > 1e-6


def test_bad_inputs():
    model, params, buffers, train, val = problem("mlp", 2)
    step = make_meta_step(model, F.cross_entropy, sgd_factory, compile=False)
    meta = {"lr": torch.tensor(0.1), "momentum": torch.tensor(0.5)}
    state = sgd_factory(meta).init(params)
    with pytest.raises(ValueError, match="at least one batch"):
        step(meta, params, buffers, state, [], val)
    with pytest.raises(TypeError, match="floating-point"):
        step({**meta, "lr": torch.tensor(1)}, params, buffers, state, train, val)
    with pytest.raises(TypeError, match="meta_params -> UpdateRule"):
        make_meta_step(model, F.cross_entropy, metaopt.rules.sgd(lr=0.1))
    for bad in (0, 1.5, True, None):
        with pytest.raises(ValueError, match="steps_per_call"):
            make_meta_step(model, F.cross_entropy, sgd_factory, steps_per_call=bad)


def assert_same_result(a, b, rtol=1e-8):
    """Two MetaStepResults equal to float64 rounding (gradients, losses, final state)."""
    torch.testing.assert_close(b.meta_loss, a.meta_loss, atol=1e-12, rtol=rtol)
    torch.testing.assert_close(b.inner_losses, a.inner_losses, atol=1e-12, rtol=rtol)
    for got, want in ((b.meta_grads, a.meta_grads), (b.init_grads, a.init_grads)):
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], atol=1e-10, rtol=rtol)
    for x, y in zip(
        pytree.tree_leaves((b.params, b.buffers, b.opt_state)),
        pytree.tree_leaves((a.params, a.buffers, a.opt_state)),
        strict=True,
    ):
        torch.testing.assert_close(x, y, atol=1e-12, rtol=rtol)


@settings(max_examples=12, deadline=None)
@given(k=st.integers(1, 5), steps_per_call=st.integers(2, 6), remat=st.booleans())
def test_steps_per_call_does_not_change_the_result(k, steps_per_call, remat):
    """Grouping the K inner steps into calls of ``steps_per_call`` (the last one shorter
    when K is not a multiple, or the only one when steps_per_call > K) gives the result
    of one step per call (float64, Adam with meta-parameters)."""
    meta = {
        "lr": torch.tensor(0.01, dtype=torch.float64),
        "b1": torch.tensor(0.8, dtype=torch.float64),
    }
    model, params, buffers, train, val = problem("mlp", k, torch.float64)
    state = adam_factory(meta).init(params)
    one = make_meta_step(model, F.cross_entropy, adam_factory, compile=False, remat=remat)
    grouped = make_meta_step(
        model, F.cross_entropy, adam_factory, compile=False, remat=remat,
        steps_per_call=steps_per_call,
    )
    a = one(meta, params, buffers, state, train, val)
    assert_same_result(a, grouped(meta, params, buffers, state, train, val))
    assert a.inner_losses.shape == (k,)


def test_steps_per_call_with_batchnorm_buffers():
    """The buffers (batchnorm running statistics) carried from step to step inside a
    call, with and without remat."""
    meta = {
        "lr": torch.tensor(0.01, dtype=torch.float64),
        "b1": torch.tensor(0.8, dtype=torch.float64),
    }
    model, params, buffers, train, val = problem("cnn", 3, torch.float64)
    state = adam_factory(meta).init(params)
    for remat in (True, False):
        one = make_meta_step(model, F.cross_entropy, adam_factory, compile=False, remat=remat)
        two = make_meta_step(
            model, F.cross_entropy, adam_factory, compile=False, remat=remat, steps_per_call=2
        )
        a = one(meta, params, buffers, state, train, val)
        b = two(meta, params, buffers, state, train, val)
        assert_same_result(a, b)
        assert any(not torch.equal(a.buffers[n], buffers[n]) for n in buffers)


@pytest.mark.slow
def test_compiled_meta_step_matches_eager_and_does_not_recompile_for_longer_unrolls():
    meta = {"lr": torch.tensor(0.01), "b1": torch.tensor(0.9)}
    model, params, buffers, train, val = problem("mlp", 6)
    compiled = make_meta_step(model, F.cross_entropy, adam_factory)
    eager = make_meta_step(model, F.cross_entropy, adam_factory, compile=False)
    state = adam_factory(meta).init(params)
    graphs_before = counters["stats"]["unique_graphs"]
    breaks_before = graph_breaks()
    short = compiled(meta, params, buffers, state, train[:2], val)
    graphs_after_first = counters["stats"]["unique_graphs"]
    long = compiled(meta, params, buffers, state, train, val)
    assert counters["stats"]["unique_graphs"] == graphs_after_first  # K=6 reuses K=2's graphs
    assert graphs_after_first - graphs_before <= 3  # inner step, its vjp, validation grad
    assert graph_breaks() == breaks_before, dict(counters["graph_break"])
    for out, k in ((short, 2), (long, 6)):
        ref = eager(meta, params, buffers, state, train[:k], val)
        torch.testing.assert_close(out.meta_loss, ref.meta_loss, atol=1e-5, rtol=1e-5)
        for name in meta:  # second-order terms: float32 rounding is amplified a little
            torch.testing.assert_close(
                out.meta_grads[name], ref.meta_grads[name], atol=1e-4, rtol=1e-4
            )
        for name in params:
            torch.testing.assert_close(out.params[name], ref.params[name], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_without_remat_same_meta_and_init_gradients(kind):
    """remat=False (autograd through the steps) == the per-step vjp, float64, batchnorm
    included: meta-gradients, MAML gradients, final state and losses."""
    meta = {
        "lr": torch.tensor(0.01, dtype=torch.float64),
        "b1": torch.tensor(0.8, dtype=torch.float64),
    }
    model, params, buffers, train, val = problem(kind, 3, torch.float64)
    state = adam_factory(meta).init(params)
    remat = make_meta_step(model, F.cross_entropy, adam_factory, compile=False)
    direct = make_meta_step(model, F.cross_entropy, adam_factory, compile=False, remat=False)
    a = remat(meta, params, buffers, state, train, val)
    b = direct(meta, params, buffers, state, train, val)
    torch.testing.assert_close(b.meta_loss, a.meta_loss, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(b.inner_losses, a.inner_losses, atol=1e-12, rtol=1e-10)
    for name in meta:
        torch.testing.assert_close(b.meta_grads[name], a.meta_grads[name], atol=1e-10, rtol=1e-8)
        assert a.meta_grads[name].abs() > 1e-6
    for name in params:
        torch.testing.assert_close(b.init_grads[name], a.init_grads[name], atol=1e-10, rtol=1e-8)
        torch.testing.assert_close(b.params[name], a.params[name], atol=1e-12, rtol=1e-10)
        assert not b.params[name].requires_grad
    for x, y in zip(
        torch.utils._pytree.tree_leaves(b.opt_state),
        torch.utils._pytree.tree_leaves(a.opt_state),
        strict=True,
    ):
        torch.testing.assert_close(x, y, atol=1e-12, rtol=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("remat", [True, False])
def test_compiled_steps_per_call_matches_eager(remat):
    """Two inner steps per compiled call: equal to the eager one-step result; a longer
    unroll that is a multiple reuses the graphs, a remainder compiles one more."""
    meta = {"lr": torch.tensor(0.01), "b1": torch.tensor(0.9)}
    model, params, buffers, train, val = problem("mlp", 5)
    state = adam_factory(meta).init(params)
    compiled = make_meta_step(
        model, F.cross_entropy, adam_factory, remat=remat, steps_per_call=2
    )
    eager = make_meta_step(model, F.cross_entropy, adam_factory, compile=False, remat=remat)
    breaks_before = graph_breaks()
    graphs_before = counters["stats"]["unique_graphs"]
    out = compiled(meta, params, buffers, state, train[:2], val)
    first = counters["stats"]["unique_graphs"]
    assert first - graphs_before <= (3 if remat else 2)
    long = compiled(meta, params, buffers, state, train[:4], val)
    assert counters["stats"]["unique_graphs"] == first  # K=4: the same two-step graphs
    ragged = compiled(meta, params, buffers, state, train, val)  # K=5: 2 + 2 + 1
    assert graph_breaks() == breaks_before, dict(counters["graph_break"])
    for result, k in ((out, 2), (long, 4), (ragged, 5)):
        ref = eager(meta, params, buffers, state, train[:k], val)
        torch.testing.assert_close(result.meta_loss, ref.meta_loss, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(result.inner_losses, ref.inner_losses, atol=1e-5, rtol=1e-5)
        for name in meta:
            torch.testing.assert_close(
                result.meta_grads[name], ref.meta_grads[name], atol=1e-4, rtol=1e-4
            )
        for name in params:
            torch.testing.assert_close(
                result.init_grads[name], ref.init_grads[name], atol=1e-4, rtol=1e-4
            )


@pytest.mark.slow
def test_compiled_meta_step_without_remat_matches_eager():
    meta = {"lr": torch.tensor(0.01), "b1": torch.tensor(0.9)}
    model, params, buffers, train, val = problem("mlp", 4)
    state = adam_factory(meta).init(params)
    breaks_before = graph_breaks()
    graphs_before = counters["stats"]["unique_graphs"]
    out = make_meta_step(model, F.cross_entropy, adam_factory, remat=False)(
        meta, params, buffers, state, train, val
    )
    assert graph_breaks() == breaks_before, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] - graphs_before <= 2  # inner step, validation
    ref = make_meta_step(model, F.cross_entropy, adam_factory, compile=False)(
        meta, params, buffers, state, train, val
    )
    torch.testing.assert_close(out.meta_loss, ref.meta_loss, atol=1e-5, rtol=1e-5)
    for name in meta:
        torch.testing.assert_close(out.meta_grads[name], ref.meta_grads[name], atol=1e-4, rtol=1e-4)
    for name in params:
        torch.testing.assert_close(out.init_grads[name], ref.init_grads[name], atol=1e-4, rtol=1e-4)
