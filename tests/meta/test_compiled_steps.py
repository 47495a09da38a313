"""Compiled inner steps for the continual meta-objective (metaopt.meta.compiled)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import metaopt
from metaopt.learned import LearnedRuleNet, learned_rule
from metaopt.meta import MetaTrainer, TrainConfig, Unrolled
from metaopt.meta.compiled import CompiledContinualSteps, masked_cross_entropy
from metaopt.meta.tasks import FamilyConfig, TaskFamily


@given(
    n_outputs=st.integers(1, 12),
    data=st.data(),
    batch=st.integers(1, 5),
)
def test_masked_cross_entropy_equals_the_sliced_one(n_outputs, data, batch):
    first = data.draw(st.integers(0, n_outputs - 1))
    last = data.draw(st.integers(first + 1, n_outputs))
    out = (10 * torch.randn(batch, n_outputs, dtype=torch.float64)).requires_grad_()
    y = torch.randint(0, last - first, (batch,))
    want = F.cross_entropy(out[:, first:last], y)
    got = masked_cross_entropy(out, y, torch.tensor([first, last]))
    torch.testing.assert_close(got, want)
    g_want, = torch.autograd.grad(want, out)
    g_got, = torch.autograd.grad(got, out)
    torch.testing.assert_close(g_got, g_want)


def _perturbed_net(seed: int = 0) -> LearnedRuleNet:
    """A rule network away from the Adam identity, so every coefficient matters."""
    torch.manual_seed(seed)
    net = LearnedRuleNet()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def _family(models: tuple[str, ...]) -> TaskFamily:
    config = FamilyConfig(
        models=models, n_tasks=(2, 2), steps_per_task=(3, 4), batch_size=(8,), examples=80
    )
    return TaskFamily(config)


def _assert_same_meta_gradient(eager, compiled, tol=1e-5):
    """Same meta-loss, and every meta-gradient tensor equal up to ``tol`` times its
    largest entry (float32 rounding through Adam-like normalisation of small gradients
    is amplified along a trajectory, so elementwise relative checks are meaningless)."""
    assert float(compiled.loss) == pytest.approx(float(eager.loss), rel=1e-5)
    assert max(float(g.abs().max()) for g in eager.grads.values()) > 0
    for k, g in eager.grads.items():
        err = float((compiled.grads[k] - g).abs().max())
        assert err <= tol * float(g.abs().max()) + 1e-12, (k, err, float(g.abs().max()))


@pytest.mark.slow
@pytest.mark.parametrize("model", ["mlp", "cnn", "transformer"])
def test_traced_steps_give_the_eager_meta_gradient(model):
    """Dynamo + AOT autograd (no code generation: backend aot_eager) through the learned
    rule's inner steps, a truncation window and a task boundary, on each model family
    (the CNN has batch norm buffers, the transformer attention): same meta-loss and
    meta-gradient as the eager unroll."""
    net = _perturbed_net()
    rule_fn = lambda m: learned_rule(net, 1e-2, meta_params=m)  # noqa: E731
    problem = _family((model,)).sample(torch.Generator().manual_seed(1))
    mp = dict(net.named_parameters())
    steps = CompiledContinualSteps(rule_fn, backend="aot_eager")
    eager = Unrolled(rule_fn, truncation=3)(mp, problem)
    compiled = Unrolled(rule_fn, truncation=3, step_fn=steps)(mp, problem)
    _assert_same_meta_gradient(eager, compiled)
    assert steps.num_compiled == 1


@pytest.mark.slow
def test_one_graph_serves_every_sequence_of_the_same_shapes():
    """Other tasks (classes, label offsets, stream kinds) and freshly built models of the
    same structure reuse the compiled graph; another batch shape gets its own function."""
    net = _perturbed_net()
    rule_fn = lambda m: learned_rule(net, 1e-2, meta_params=m)  # noqa: E731
    steps = CompiledContinualSteps(rule_fn, backend="aot_eager")
    unrolled = Unrolled(rule_fn, truncation=4, step_fn=steps)
    mp = dict(net.named_parameters())
    family = _family(("mlp",))
    gen = torch.Generator().manual_seed(2)
    torch._dynamo.utils.counters.clear()
    unrolled(mp, family.sample(gen))
    # one graph: the importance fold of a task boundary happens before the compiled step
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs == 1
    for _ in range(2):
        unrolled(mp, family.sample(gen))
    assert steps.num_compiled == 1
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    wide = FamilyConfig(models=("mlp",), n_tasks=(2, 2), steps_per_task=(3, 3),
                        batch_size=(5,), examples=80)
    unrolled(mp, TaskFamily(wide).sample(gen))
    assert steps.num_compiled == 2


def test_compiled_steps_work_with_hand_written_rules():
    """A rule without learned state (no task boundaries, no loss observation): Adam with
    a meta-learned lr, traced steps vs the eager unroll."""
    rule_fn = lambda m: metaopt.rules.adam(lr=m["lr"], eps_root=1e-12)  # noqa: E731
    problem = _family(("mlp",)).sample(torch.Generator().manual_seed(4))
    mp = {"lr": torch.tensor(0.01)}
    steps = CompiledContinualSteps(rule_fn, backend="aot_eager")
    eager = Unrolled(rule_fn)(mp, problem)
    compiled = Unrolled(rule_fn, step_fn=steps)(mp, problem)
    _assert_same_meta_gradient(eager, compiled)


def test_bad_arguments_are_rejected():
    with pytest.raises(TypeError, match="rule_fn"):
        CompiledContinualSteps(None)
    with pytest.raises(TypeError, match="step_fn"):
        Unrolled(lambda m: metaopt.rules.sgd(0.1), step_fn=3)
    steps = CompiledContinualSteps(lambda m: metaopt.rules.sgd(0.1))
    with pytest.raises(TypeError, match="ContinualProblem"):
        steps({}, object(), None, 0)
    with pytest.raises(ValueError, match="unrolled"):
        MetaTrainer(TrainConfig(estimator="es"), "unused", compile=True)


@pytest.mark.slow
def test_inductor_compiled_steps_give_the_eager_meta_gradient():
    """The default backend (Inductor's generated C++): same meta-gradient as the eager
    unroll on an MLP sequence with a task boundary (SIMD code generation off, as for
    every small model here, to keep the compile short)."""
    net = _perturbed_net()
    rule_fn = lambda m: learned_rule(net, 1e-2, meta_params=m)  # noqa: E731
    problem = _family(("mlp",)).sample(torch.Generator().manual_seed(1))
    mp = dict(net.named_parameters())
    steps = CompiledContinualSteps(rule_fn, options={"cpp.vec_isa_ok": False})
    eager = Unrolled(rule_fn, truncation=3)(mp, problem)
    compiled = Unrolled(rule_fn, truncation=3, step_fn=steps)(mp, problem)
    _assert_same_meta_gradient(eager, compiled, tol=2e-3)


def test_only_a_pending_task_boundary_makes_a_step_fold():
    from metaopt.learned import new_task
    from metaopt.meta.compiled import _folds_a_task

    params = {"w": torch.randn(3, 2), "b": torch.zeros(3)}
    state = learned_rule(LearnedRuleNet()).init(params)
    assert not _folds_a_task(state)
    assert _folds_a_task(new_task(state))  # folded by the next update
    assert not _folds_a_task(new_task(state, params))  # folded now
    assert not _folds_a_task(metaopt.rules.adam(0.1).init(params))
