"""make_step: compiled == eager, eager == torch.optim, no recompilation, no graph break."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import metaopt
from metaopt.compile import make_step, tensor_hyper
from tests.compile.compile_models import batches, build, graph_breaks, train_with_torch_optim

N_STEPS = 5
TOL = {"atol": 1e-5, "rtol": 1e-5}


def run(step, model, data):
    """Run ``step`` over ``data`` from ``model``'s values; returns the final tuple and losses."""
    params, buffers, state = step.init(model)
    losses = []
    for batch in data:
        params, buffers, state, metrics = step(params, buffers, state, batch)
        losses.append(metrics["loss"])
    return params, buffers, state, torch.stack(losses)


def assert_trees_close(a, b, **tol):
    flat_a, spec_a = torch.utils._pytree.tree_flatten(a)
    flat_b, spec_b = torch.utils._pytree.tree_flatten(b)
    assert spec_a == spec_b
    for x, y in zip(flat_a, flat_b, strict=True):
        torch.testing.assert_close(x, y, **tol)


def check_compiled_matches_eager(kind, rule):
    model = build(kind)
    data = batches(kind, N_STEPS)
    graphs_before = counters["stats"]["unique_graphs"]
    breaks_before = graph_breaks()
    step = make_step(model, F.cross_entropy, rule)
    compiled = run(step, model, data)
    eager = run(make_step(model, F.cross_entropy, rule, compile=False), model, data)
    assert_trees_close(compiled, eager, **TOL)
    assert graph_breaks() == breaks_before, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] - graphs_before <= 1  # one graph, or a cached one
    # the run moved the parameters (the comparison is not between two no-ops)
    start = dict(model.named_parameters())
    assert max((compiled[0][k] - start[k]).abs().max().item() for k in start) > 1e-4
    return step, model, data


@pytest.fixture(scope="module")
def mlp_adam():
    rule, hyper = tensor_hyper(metaopt.rules.adam, lr=1e-2)
    step, model, data = check_compiled_matches_eager("mlp", rule)
    return step, hyper, model, data


def test_compiled_adam_mlp_matches_eager(mlp_adam):
    step, _, _, _ = mlp_adam
    assert step.compiled and step.eager is not step.fn


def test_lr_change_does_not_recompile_and_takes_effect(mlp_adam):
    step, hyper, model, data = mlp_adam
    graphs = counters["stats"]["unique_graphs"]
    try:
        hyper["lr"].fill_(3e-3)
        params, _, _, _ = run(step, model, data)
        params_eager, _, _, _ = run(
            make_step(model, F.cross_entropy, metaopt.rules.adam(lr=3e-3), compile=False),
            model,
            data,
        )
    finally:
        hyper["lr"].fill_(1e-2)
    assert counters["stats"]["unique_graphs"] == graphs
    assert_trees_close(params, params_eager, **TOL)
    params_old_lr, _, _, _ = run(step, model, data)
    assert max((params_old_lr[k] - params[k]).abs().max().item() for k in params) > 1e-4


def test_step_is_one_graph_without_breaks(mlp_adam):
    step, _, model, data = mlp_adam
    params, buffers, state = step.init(model)
    explanation = torch._dynamo.explain(step.eager)(params, buffers, state, data[0])
    assert explanation.graph_count == 1
    assert explanation.graph_break_count == 0


def test_step_is_pure(mlp_adam):
    step, _, model, data = mlp_adam
    params, buffers, state = step.init(model)
    snapshot = torch.utils._pytree.tree_map(torch.clone, (params, buffers, state))
    new = step(params, buffers, state, data[0])
    assert_trees_close((params, buffers, state), snapshot, atol=0, rtol=0)
    assert new[0]["0.weight"] is not params["0.weight"]


def _donated_run(kind, compile):
    """Pure eager steps vs donated steps (compiled or not) from the same start."""
    model = build(kind)
    data = batches(kind, N_STEPS)
    rule, _ = tensor_hyper(metaopt.rules.adam, lr=1e-2)
    pure = run(make_step(model, F.cross_entropy, rule, compile=False), model, data)
    step = make_step(model, F.cross_entropy, rule, compile=compile, donate=True)
    start = step.init(model)
    start = torch.utils._pytree.tree_map(torch.clone, start)  # not the module's storage
    inputs = torch.utils._pytree.tree_leaves(start)
    params, buffers, state = start
    losses = []
    for batch in data:
        params, buffers, state, metrics = step(params, buffers, state, batch)
        losses.append(metrics["loss"])
    outputs = torch.utils._pytree.tree_leaves((params, buffers, state))
    assert len(outputs) == len(inputs)
    assert all(o is i for o, i in zip(outputs, inputs, strict=True))  # written in place
    return pure, (params, buffers, state, torch.stack(losses))


def test_donated_step_writes_into_its_inputs_with_the_same_numbers():
    pure, donated = _donated_run("cnn", compile=False)  # batchnorm: buffers donated too
    assert_trees_close(donated, pure, atol=0, rtol=0)


@pytest.mark.slow
def test_compiled_donated_step_matches_pure_eager_step():
    breaks = graph_breaks()
    pure, donated = _donated_run("cnn", compile=True)
    assert_trees_close(donated, pure, **TOL)
    assert graph_breaks() == breaks


def test_write_into_keeps_what_does_not_fit():
    from metaopt.compile.step import write_into

    old = {"a": torch.zeros(2), "b": torch.zeros(3), "c": torch.zeros(2)}
    new = {"a": torch.ones(2), "b": torch.ones(4), "c": torch.ones(2, dtype=torch.float64)}
    out = write_into(old, new)
    assert out["a"] is old["a"] and torch.equal(old["a"], torch.ones(2))
    assert out["b"] is new["b"] and torch.equal(old["b"], torch.zeros(3))  # other shape
    assert out["c"] is new["c"] and torch.equal(old["c"], torch.zeros(2))  # other dtype
    assert write_into({"a": old["a"]}, {"x": new["a"]}) == {"x": new["a"]}  # other keys


def test_eager_step_matches_torch_optim_adam_with_batchnorm():
    """The functional step (eager) equals nn.Module + torch.optim.Adam, running stats too."""
    model = build("cnn").double()
    data = [(x.double(), y) for x, y in batches("cnn", 4)]
    step = make_step(model, F.cross_entropy, metaopt.rules.adam(lr=1e-2), compile=False)
    params, buffers, _, losses = run(step, model, data)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ref_losses = train_with_torch_optim(model, opt, data)
    tight = {"atol": 1e-12, "rtol": 1e-10}
    assert_trees_close(params, {k: p.detach() for k, p in model.named_parameters()}, **tight)
    assert_trees_close(buffers, dict(model.named_buffers()), **tight)
    torch.testing.assert_close(losses, torch.stack(ref_losses), **tight)
    assert int(buffers["1.num_batches_tracked"]) == len(data)


def test_bad_inputs_raise_clear_errors():
    model = build("mlp")
    with pytest.raises(TypeError, match="UpdateRule"):
        make_step(model, F.cross_entropy, metaopt.rules.adam)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        make_step(lambda x: x, F.cross_entropy, metaopt.rules.adam())
    with pytest.raises(TypeError, match="compile=True"):
        make_step(model, F.cross_entropy, metaopt.rules.adam(), compile=False, fullgraph=True)
    step = make_step(model, F.cross_entropy, metaopt.rules.adam(), compile=False)
    params, buffers, state = step.init(model)
    per_sample = lambda out, y: F.cross_entropy(out, y, reduction="none")  # noqa: E731
    bad = make_step(model, per_sample, metaopt.rules.adam(), compile=False)
    with pytest.raises(ValueError, match="0-d loss"):
        bad(params, buffers, state, batches("mlp", 1)[0])


def test_tensor_hyper_converts_only_floats():
    rule, tensors = tensor_hyper(metaopt.rules.adam, lr=1e-3, amsgrad=True, betas=(0.8, 0.9))
    assert set(tensors) == {"lr"}
    assert tensors["lr"].dim() == 0 and float(tensors["lr"]) == pytest.approx(1e-3)
    params = {"w": torch.ones(2)}
    assert rule.init(params)["w"][0].max_exp_avg_sq.shape == (2,)  # amsgrad kept as a bool


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["cnn", "transformer"])
def test_compiled_adam_matches_eager(kind):
    rule, _ = tensor_hyper(metaopt.rules.adam, lr=1e-2)
    step, _, _ = check_compiled_matches_eager(kind, rule)
    if kind == "cnn":  # running statistics are carried through the compiled step too
        params, buffers, state = step.init(build(kind))
        new_buffers = step(params, buffers, state, batches(kind, 1)[0])[1]
        assert int(new_buffers["1.num_batches_tracked"]) == 1


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mlp", "cnn", "transformer"])
def test_compiled_sgd_momentum_matches_eager(kind):
    rule, _ = tensor_hyper(metaopt.rules.sgd, lr=0.1, momentum=0.9, weight_decay=1e-3)
    check_compiled_matches_eager(kind, rule)


class _Recurrent(torch.nn.Module):
    """An LSTM classifier over a sequence of 5 steps of 3 features (Dynamo refuses to
    compile LSTMs: the step runs eagerly, see docs/compile.md)."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = torch.nn.LSTM(3, 6, batch_first=True)
        self.head = torch.nn.Linear(6, 2)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def test_eager_step_on_an_lstm_matches_torch_optim():
    torch.manual_seed(0)
    model = _Recurrent().double()
    gen = torch.Generator().manual_seed(1)
    data = [
        (
            torch.randn(4, 5, 3, generator=gen, dtype=torch.float64),
            torch.randint(0, 2, (4,), generator=gen),
        )
        for _ in range(3)
    ]
    rule = metaopt.rules.sgd(lr=0.1, momentum=0.9)
    params, *_ = run(make_step(model, F.cross_entropy, rule, compile=False), model, data)
    reference = _Recurrent().double()
    reference.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        opt.step()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(params[name], p.detach(), rtol=1e-10, atol=1e-12)
