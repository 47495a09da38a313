"""What a user of make_step, fit and make_meta_step may rely on, against eager references.

Frozen parameters, donation, errors of a compiled step, one-shot loaders, dropout under the
recomputing meta step, tied weights, float64 and batchnorm buffers written back by fit.
Compiled steps use ``backend="aot_eager"`` (no Inductor) to stay fast.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters
from torch.func import grad
from torch.utils import _pytree as pytree

import metaopt
from metaopt.compile import (
    fit,
    loss_and_buffers,
    make_meta_step,
    make_step,
    module_state,
    tensor_hyper,
)
from metaopt.rules.schedules import step_decay
from tests.compile.compile_models import (
    batches,
    build,
    train_with_torch_optim,
    unrolled_meta_grad,
)

AOT = {"backend": "aot_eager"}


COMPILE = [False, pytest.param(True, marks=pytest.mark.slow)]
"""``compile`` for tests whose compiled case takes over 3 s."""


def compile_kwargs(compile: bool) -> dict[str, str]:
    """Cheap compile options for ``compile=True``, none for the eager step."""
    return AOT if compile else {}


def dropout_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 3)).double()


@pytest.mark.parametrize("compile", COMPILE)
@pytest.mark.parametrize("steps_per_call", [1, 2])
def test_meta_step_with_dropout_is_the_gradient_of_the_sampled_unroll(compile, steps_per_call):
    """remat=True recomputes each inner step in its vjp; it must draw the same dropout
    masks as the forward did, else the meta-gradient mixes two different unrolls."""
    model = dropout_mlp()
    data = [(x.double(), y) for x, y in batches("mlp", 4, seed=1)]
    train, val = data[:3], data[3]
    factory = lambda m: metaopt.rules.sgd(lr=m["lr"])  # noqa: E731
    meta = {"lr": torch.tensor(0.3, dtype=torch.float64)}
    params, buffers = module_state(model)
    torch.manual_seed(5)
    expected = unrolled_meta_grad(model, factory, meta, params, buffers, train, val)
    after_reference = torch.rand(3)
    results = {}
    for remat in (True, False):
        meta_step = make_meta_step(model, F.cross_entropy, factory, remat=remat,
                                   compile=compile, steps_per_call=steps_per_call,
                                   **compile_kwargs(compile))
        torch.manual_seed(5)
        results[remat] = meta_step(meta, params, buffers, factory(meta).init(params), train, val)
        # the generator ends where one pass through the unroll leaves it
        torch.testing.assert_close(torch.rand(3), after_reference, atol=0, rtol=0)
    tight = {"atol": 1e-12, "rtol": 1e-10}
    for remat, out in results.items():
        torch.testing.assert_close(out.meta_grads["lr"], expected["lr"], **tight, msg=str(remat))
    torch.testing.assert_close(results[True].init_grads, results[False].init_grads, **tight)


BAD_CALLS = ["per-sample loss", "(loss, aux)", "dict batch", "3-tuple batch", "state", "width"]


def _bad_call(case: str):
    """``(loss_fn, batch, state transform, expected error, message)`` of a bad call."""
    x, y = batches("mlp", 1)[0]
    per_sample = lambda out, t: F.cross_entropy(out, t, reduction="none")  # noqa: E731
    with_aux = lambda out, t: (F.cross_entropy(out, t), out)  # noqa: E731
    same = lambda s: s  # noqa: E731
    drop_last = lambda s: dict(list(s.items())[:-1])  # noqa: E731
    return {
        "per-sample loss": (per_sample, (x, y), same, ValueError, "0-d loss"),
        "(loss, aux)": (with_aux, (x, y), same, TypeError, "0-d loss tensor, got a tuple"),
        "dict batch": (F.cross_entropy, {"x": x, "y": y}, same, TypeError, "pair, got a dict"),
        "3-tuple batch": (F.cross_entropy, (x, y, y), same, TypeError, "tuple of length 3"),
        "state": (F.cross_entropy, (x, y), drop_last, ValueError, "state does not match"),
        "width": (F.cross_entropy, (x[:, :5], y), same, RuntimeError, "shape"),
    }[case]


@pytest.mark.parametrize("case", BAD_CALLS)
@pytest.mark.parametrize("donate", [False, True])
def test_compiled_step_raises_the_errors_of_the_eager_step(donate, case):
    """Bad input gives the same exception type and message compiled as eager (not
    Dynamo's report of it), and leaves the arguments as they were."""
    model = build("mlp")
    loss_fn, batch, edit, error, message = _bad_call(case)
    for compile in (False, True):
        step = make_step(model, loss_fn, metaopt.rules.adam(lr=0.1), compile=compile,
                         donate=donate, **compile_kwargs(compile))
        params, buffers, state = step.init(model)
        state = edit(state)
        snapshot = pytree.tree_map(torch.clone, (params, buffers, state))
        with pytest.raises(error, match=message):
            step(params, buffers, state, batch)
        for a, b in zip(pytree.tree_leaves((params, buffers, state)),
                        pytree.tree_leaves(snapshot), strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("compile", COMPILE)
def test_donated_step_from_init_does_not_write_into_the_model(compile):
    """make_step: the model is "never modified"; with donate=True, step.init(model)
    must not hand the model's own storage to a step that writes into its inputs."""
    model = build("cnn")  # batchnorm: float and integer buffers
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step = make_step(model, F.cross_entropy, metaopt.rules.sgd(lr=0.1), compile=compile,
                     donate=True, **compile_kwargs(compile))
    params, buffers, state = step.init(model)
    start = params["0.weight"]
    params, buffers, state, _ = step(params, buffers, state, batches("cnn", 1)[0])
    assert params["0.weight"] is start  # still donated: written in place
    assert not torch.equal(start, before["0.weight"])
    assert int(buffers["1.num_batches_tracked"]) == 1
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def frozen_mlp(dtype: torch.dtype = torch.float64) -> nn.Module:
    """The MLP of the compile tests with its first layer frozen (requires_grad=False)."""
    model = build("mlp").to(dtype)
    model[0].requires_grad_(False)
    return model


def reference_adam(model: nn.Module, data, lr: float) -> list[torch.Tensor]:
    """Train ``model`` in place with ``torch.optim.Adam`` over the parameters that require
    grad (what ``torch.optim`` users pass); returns the losses before each step."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    return train_with_torch_optim(model, opt, data)


def assert_params_equal_module(params: dict, model: nn.Module, **tol) -> None:
    for name, p in model.named_parameters():
        torch.testing.assert_close(params[name], p.detach(), **tol)


@pytest.mark.parametrize("compile", [False, True])
def test_frozen_parameters_are_not_trained(compile):
    """requires_grad=False parameters keep their values and get no optimizer state, as
    with torch.optim over the trainable parameters."""
    model = frozen_mlp()
    ref = frozen_mlp()
    data = [(x.double(), y) for x, y in batches("mlp", 4)]
    step = make_step(model, F.cross_entropy, metaopt.rules.adam(lr=0.05), compile=compile,
                     **compile_kwargs(compile))
    assert step.frozen == {"0.weight", "0.bias"}
    params, buffers, state = step.init(model)
    assert set(state) == {"2.weight", "2.bias"}
    frozen_weight = params["0.weight"]
    losses = []
    for batch in data:
        params, buffers, state, metrics = step(params, buffers, state, batch)
        losses.append(metrics["loss"])
    ref_losses = reference_adam(ref, data, lr=0.05)
    tight = {"atol": 1e-12, "rtol": 1e-10}
    assert params["0.weight"] is frozen_weight  # passed through untouched
    assert_params_equal_module(params, ref, **tight)
    torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses), **tight)


@pytest.mark.parametrize("compile", [False, True])
def test_fit_leaves_frozen_parameters_alone(compile):
    model, ref = frozen_mlp(), frozen_mlp()
    frozen_before = model[0].weight.detach().clone()
    data = [(x.double(), y) for x, y in batches("mlp", 3)]
    result = fit(model, data, metaopt.rules.adam(lr=0.05), epochs=2, compile=compile,
                 **compile_kwargs(compile))
    ref_losses = reference_adam(ref, data + data, lr=0.05)
    assert torch.equal(model[0].weight.detach(), frozen_before)
    assert set(result.opt_state) == {"2.weight", "2.bias"}
    tight = {"atol": 1e-12, "rtol": 1e-10}
    assert_params_equal_module(dict(model.named_parameters()), ref, **tight)
    torch.testing.assert_close(result.step_losses, torch.stack(ref_losses), **tight)


def test_fit_rejects_bad_epochs_and_one_shot_loaders_before_training():
    model = build("mlp")
    before = [p.detach().clone() for p in model.parameters()]
    data = batches("mlp", 2)
    with pytest.raises(ValueError, match="epochs"):
        fit(model, data, metaopt.rules.sgd(lr=0.1), epochs=True, compile=False)
    with pytest.raises(TypeError, match="one-shot iterator"):
        fit(model, iter(data), metaopt.rules.sgd(lr=0.1), epochs=2, compile=False)
    with pytest.raises(TypeError, match="one-shot iterator"):
        fit(model, (b for b in data), metaopt.rules.sgd(lr=0.1), epochs=3, compile=False)
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p.detach(), q)
    result = fit(model, iter(data), metaopt.rules.sgd(lr=0.1), epochs=1, compile=False)
    assert result.step_losses.shape == (2,)  # one epoch over a generator is fine


@pytest.mark.slow
def test_dropout_off_in_eval_mode_compiled_matches_eager():
    """In eval mode dropout is the identity: compiled and eager steps agree with each
    other and with torch.optim, whatever the seed."""
    model = dropout_mlp().eval()
    data = [(x.double(), y) for x, y in batches("mlp", 3)]
    rule, _ = tensor_hyper(metaopt.rules.adam, lr=0.05, dtype=torch.float64)
    runs = []
    for compile in (False, True):
        step = make_step(model, F.cross_entropy, rule, compile=compile, **compile_kwargs(compile))
        params, buffers, state = step.init(model)
        torch.manual_seed(len(runs))  # another seed for each: no randomness is used
        for batch in data:
            params, buffers, state, _ = step(params, buffers, state, batch)
        runs.append(params)
    reference_adam(model, data, lr=0.05)
    tight = {"atol": 1e-12, "rtol": 1e-10}
    for params in runs:
        assert_params_equal_module(params, model, **tight)


class TiedModel(nn.Module):
    """Two layers share one weight (``out.weight is embed.weight``), as tied embeddings."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 3, bias=False)
        self.mid = nn.Linear(3, 8)
        self.out = nn.Linear(8, 3, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mid(torch.tanh(self.embed(x)))))


@pytest.mark.parametrize("compile", COMPILE)
def test_fit_tied_weights_match_torch_optim(compile):
    """A tied weight is one parameter: its gradient sums both uses, and it stays tied."""
    torch.manual_seed(0)
    model = TiedModel().double()
    ref = TiedModel().double()
    ref.load_state_dict(model.state_dict())
    data = [(x.double(), y) for x, y in batches("mlp", 3)]
    result = fit(model, data, metaopt.rules.adam(lr=0.05), epochs=2, compile=compile,
                 **compile_kwargs(compile))
    ref_losses = reference_adam(ref, data + data, lr=0.05)
    assert model.out.weight is model.embed.weight
    assert set(result.opt_state) == {"embed.weight", "mid.weight", "mid.bias"}
    tight = {"atol": 1e-12, "rtol": 1e-10}
    assert_params_equal_module(dict(model.named_parameters()), ref, **tight)
    torch.testing.assert_close(result.step_losses, torch.stack(ref_losses), **tight)


@pytest.mark.slow
def test_compiled_fit_writes_batchnorm_buffers_back_like_eager():
    """fit(compile=True) trains private copies in place; the module then holds the final
    parameters and running statistics (integer counter included), as the eager fit."""
    models = [build("cnn").double(), build("cnn").double()]
    data = [(x.double(), y) for x, y in batches("cnn", 3)]
    for model, compile in zip(models, (True, False), strict=True):
        weight = model[0].weight
        fit(model, data, metaopt.rules.sgd(lr=0.1, momentum=0.9), epochs=2, compile=compile,
            **compile_kwargs(compile))
        assert model[0].weight is weight
        assert int(model[1].num_batches_tracked) == 6
    tight = {"atol": 1e-12, "rtol": 1e-10}
    torch.testing.assert_close(models[0].state_dict(), models[1].state_dict(), **tight)


def frozen_unroll_reference(model, factory, meta, params, train, val):
    """``d val_loss / d (meta, params)`` by ``torch.func.grad`` through an eager unroll
    that updates only the parameters requiring grad (no buffers)."""
    frozen = {k for k, p in model.named_parameters() if not p.requires_grad}

    def trainable(p):
        return {k: v for k, v in p.items() if k not in frozen}

    def loss(p, batch):
        return loss_and_buffers(model, F.cross_entropy, p, {}, batch)[0]

    def meta_loss(m, start):
        p = dict(start)
        state = factory(m).init(trainable(p))
        for batch in train:
            g = grad(lambda q, p=p, batch=batch: loss({**p, **q}, batch))(trainable(p))
            updates, state = factory(m).update(g, state, trainable(p))
            p = {**p, **metaopt.apply_updates(trainable(p), updates)}
        return loss(p, val)

    return grad(meta_loss, argnums=(0, 1))(meta, params)


@pytest.mark.parametrize("compile", COMPILE)
@pytest.mark.parametrize("remat", [True, False])
def test_meta_step_keeps_frozen_parameters_fixed_in_the_inner_steps(compile, remat):
    """The inner steps of make_meta_step, like make_step, leave requires_grad=False
    parameters alone; the meta-gradient still flows through them (ANIL-style)."""
    model = frozen_mlp()
    data = [(x.double(), y) for x, y in batches("mlp", 4)]
    train, val = data[:3], data[3]
    factory = lambda m: metaopt.rules.sgd(lr=m["lr"], momentum=0.5)  # noqa: E731
    meta = {"lr": torch.tensor(0.3, dtype=torch.float64)}
    params, buffers = module_state(model)
    meta_step = make_meta_step(model, F.cross_entropy, factory, remat=remat, compile=compile,
                               **compile_kwargs(compile))
    assert meta_step.frozen == {"0.weight", "0.bias"}
    state = factory(meta).init(meta_step.trainable(params))
    out = meta_step(meta, params, buffers, state, train, val)
    expected_meta, expected_init = frozen_unroll_reference(model, factory, meta, params, train,
                                                           val)
    assert torch.equal(out.params["0.weight"], params["0.weight"])
    assert not torch.equal(out.params["2.weight"], params["2.weight"])
    assert set(out.opt_state) == {"2.weight", "2.bias"}
    tight = {"atol": 1e-12, "rtol": 1e-10}
    torch.testing.assert_close(out.meta_grads, expected_meta, **tight)
    torch.testing.assert_close(out.init_grads, expected_init, **tight)
    assert out.init_grads["0.weight"].abs().sum() > 0  # through the frozen layer


@pytest.mark.parametrize("remat", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_compiled_meta_step_raises_the_errors_of_the_eager_one(remat):
    model = build("mlp")
    factory = lambda m: metaopt.rules.adam(lr=m["lr"])  # noqa: E731
    meta = {"lr": torch.tensor(0.1)}
    params, buffers = module_state(model)
    data = batches("mlp", 3)
    per_sample = lambda out, t: F.cross_entropy(out, t, reduction="none")  # noqa: E731
    x, y = data[0]
    cases = [
        (per_sample, data[:2], factory(meta).init(params), ValueError, "0-d loss"),
        (F.cross_entropy, [{"x": x, "y": y}], factory(meta).init(params), TypeError, "pair"),
        (F.cross_entropy, data[:2], {}, ValueError, "state does not match"),
    ]
    for loss_fn, train, state, error, message in cases:
        meta_step = make_meta_step(model, loss_fn, factory, remat=remat, **AOT)
        with pytest.raises(error, match=message):
            meta_step(meta, params, buffers, state, train, data[2])


@pytest.mark.slow
def test_compiled_fit_with_a_schedule_matches_torch_optim_without_recompiling():
    """A schedule is a tensor expression of the (donated, in-place) step count: the
    compiled fit follows torch.optim's StepLR and compiles one graph."""
    model, ref = build("mlp"), build("mlp")
    data = batches("mlp", 3)
    rule = metaopt.rules.adam(lr=step_decay(0.05, step_size=2, gamma=0.5))
    graphs = counters["stats"]["unique_graphs"]
    result = fit(model, data, rule, epochs=2, **AOT)
    assert counters["stats"]["unique_graphs"] - graphs == 1
    opt = torch.optim.Adam(ref.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    losses = train_with_torch_optim(ref, opt, data + data, sched)
    tol = {"atol": 1e-5, "rtol": 1e-5}  # float32
    assert_params_equal_module(dict(model.named_parameters()), ref, **tol)
    torch.testing.assert_close(result.step_losses, torch.stack(losses), **tol)
    assert float(result.opt_state["0.weight"][0].step) == 6  # adam's state, per parameter


def test_compiled_step_with_dropout_draws_from_torch_generator():
    """In training mode dropout masks are drawn at each call (not baked into the graph),
    from torch's generator: with the same seed the aot_eager step equals the eager one."""
    model = dropout_mlp()
    batch = tuple(batches("mlp", 1)[0])
    batch = (batch[0].double(), batch[1])
    outs = {}
    for compile in (False, True):
        step = make_step(model, F.cross_entropy, metaopt.rules.sgd(lr=0.1), compile=compile,
                         **compile_kwargs(compile))
        params, buffers, state = step.init(model)
        torch.manual_seed(3)
        outs[compile] = [step(params, buffers, state, batch) for _ in range(2)]
    for compile, (first, second) in outs.items():
        assert first[3]["loss"] != second[3]["loss"], compile  # two calls, two masks
    tight = {"atol": 1e-12, "rtol": 1e-10}
    for eager, compiled in zip(outs[False], outs[True], strict=True):
        torch.testing.assert_close(compiled[:2], eager[:2], **tight)
        torch.testing.assert_close(compiled[3], eager[3], **tight)


class ReassignsBuffers(nn.Module):
    """Counts its training calls and keeps a running mean of its inputs by reassigning
    its buffers (``self.calls = self.calls + 1``), not by writing into them."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 3)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("mean", torch.zeros(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls = self.calls + 1
            self.mean = 0.9 * self.mean + 0.1 * x.mean(0)
        return self.lin(x - self.mean)


@pytest.mark.parametrize("compile", [False, True])
def test_fit_keeps_buffers_that_the_forward_reassigns(compile):
    """fit (and make_step) return the buffers a forward reassigns, as the eager module
    keeps them; the parameters then follow torch.optim's."""
    torch.manual_seed(0)
    model = ReassignsBuffers()
    ref = ReassignsBuffers()
    ref.load_state_dict(model.state_dict())
    data = batches("mlp", 3)
    fit(model, data, metaopt.rules.sgd(lr=0.1), epochs=2, compile=compile,
        **compile_kwargs(compile))
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    train_with_torch_optim(ref, opt, data + data)
    assert int(model.calls) == 6
    tol = {"atol": 1e-6, "rtol": 1e-5}  # float32
    torch.testing.assert_close(model.state_dict(), ref.state_dict(), **tol)


@pytest.mark.slow
def test_importing_metaopt_compile_does_not_import_dynamo():
    """torch._dynamo takes seconds to import; metaopt.compile needs it only once a step
    is compiled (its error handling imports Dynamo's exception class lazily)."""
    code = "import sys, metaopt.compile; assert 'torch._dynamo' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


@pytest.mark.parametrize("compile", [False, True])
def test_fit_dropout_model_with_a_short_last_batch(compile):
    """A short last batch recompiles the step; with dropout in training mode that second
    compilation failed when Dynamo made the batch size symbolic. Compiled (aot_eager)
    and eager fits draw the same masks from the same seed."""
    model = dropout_mlp()
    gen = torch.Generator().manual_seed(2)
    data = [
        (torch.randn(size, 8, generator=gen, dtype=torch.float64),
         torch.randint(0, 3, (size,), generator=gen))
        for size in (8, 8, 5)
    ]
    torch.manual_seed(4)
    result = fit(model, data, metaopt.rules.sgd(lr=0.1), epochs=2, compile=compile,
                 **compile_kwargs(compile))
    ref = dropout_mlp()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    torch.manual_seed(4)
    losses = train_with_torch_optim(ref, opt, data + data)
    tight = {"atol": 1e-12, "rtol": 1e-10}
    torch.testing.assert_close(result.step_losses, torch.stack(losses), **tight)
    assert_params_equal_module(dict(model.named_parameters()), ref, **tight)
