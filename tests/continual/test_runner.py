"""Runner end to end on tiny streams: shapes, initial accuracy, reproducibility, hooks."""

from __future__ import annotations

import functools

import pytest
import torch

from metaopt.continual.models import build_model
from metaopt.continual.runner import TaskContext, evaluate, run_stream
from metaopt.continual.streams import Task, n_outputs


def _model(stream: list[Task]):
    return functools.partial(build_model, "mlp", (1, 8, 8), n_outputs(stream), hidden=(32,))


OPTIMIZERS = {
    "sgd": functools.partial(torch.optim.SGD, lr=0.1),
    "adam": functools.partial(torch.optim.Adam, lr=1e-2),
}


def test_two_optimizers_same_init_and_reproducible(tiny_stream: list[Task]) -> None:
    results = {
        name: run_stream(_model(tiny_stream), factory, tiny_stream, epochs=2, seed=3)
        for name, factory in OPTIMIZERS.items()
    }
    for result in results.values():
        assert result.R.shape == (2, 2) and result.b.shape == (2,)
        assert ((0 <= result.R) & (result.R <= 1)).all()
        assert result.R_val is None and len(result.train_loss) == 2
        # the task just trained is learned well beyond chance (0.5 on 2-way tasks)
        assert result.R[0, 0] > 0.8 and result.R[1, 1] > 0.8
    # same initialisation for every optimizer: identical accuracy at initialisation
    assert torch.equal(results["sgd"].b, results["adam"].b)
    assert not torch.equal(results["sgd"].R, results["adam"].R)
    torch.manual_seed(3)
    fresh = _model(tiny_stream)()
    expected_b = [evaluate(fresh, t, t.x_test, t.y_test) for t in tiny_stream]
    assert results["sgd"].b.tolist() == pytest.approx(expected_b)
    again = run_stream(_model(tiny_stream), OPTIMIZERS["adam"], tiny_stream, epochs=2, seed=3)
    assert torch.equal(again.R, results["adam"].R)
    assert again.train_loss == results["adam"].train_loss
    on_cpu = run_stream(
        _model(tiny_stream), OPTIMIZERS["adam"], tiny_stream, epochs=2, seed=3, device="cpu"
    )
    assert torch.equal(on_cpu.R, results["adam"].R)
    other_seed = run_stream(_model(tiny_stream), OPTIMIZERS["adam"], tiny_stream, epochs=2, seed=4)
    assert not torch.equal(other_seed.b, results["adam"].b)


class _Spy(torch.optim.SGD):
    """SGD that records the runner's calls."""

    def __init__(self, params, **kw) -> None:
        super().__init__(params, lr=0.05, **kw)
        self.calls: list[tuple[str, object]] = []

    def step(self, closure=None):
        self.calls.append(("step", None))
        return super().step(closure)

    def end_task(self, context: TaskContext) -> None:
        assert context.logits(context.task.x_train[:3]).shape == (3, context.task.n_classes)
        self.calls.append(("end_task", context.task.task_id))

    def new_task(self) -> None:
        self.calls.append(("new_task", None))


def test_steps_budget_and_task_boundary_hooks(tiny_val_stream: list[Task]) -> None:
    spies: list[_Spy] = []

    def factory(params) -> _Spy:
        spies.append(_Spy(params))
        return spies[-1]

    result = run_stream(_model(tiny_val_stream), factory, tiny_val_stream, steps=7, batch_size=8)
    calls = spies[0].calls
    assert (
        calls == [("step", None)] * 7 + [("end_task", 0), ("new_task", None)] + [("step", None)] * 7
    )
    assert result.R_val is not None and result.R_val.shape == (2, 2)
    assert result.b_val is not None and result.val_metrics() is not None
    assert set(result.metrics()) == {"acc", "bwt", "fwt", "forgetting", "learning_acc"}


def test_task_incremental_heads_are_separate(tiny_stream: list[Task]) -> None:
    """Training task 1 only touches its own head's output weights in a task-IL stream."""
    models = []

    def model_factory():
        models.append(_model(tiny_stream)())
        return models[-1]

    stream = tiny_stream[1:]  # only the second task: logits 2..3
    run_stream(model_factory, OPTIMIZERS["sgd"], stream, steps=3)
    torch.manual_seed(0)
    reference = _model(tiny_stream)()
    head, ref_head = models[0].net[-1].weight, reference.net[-1].weight
    assert torch.equal(head[:2], ref_head[:2])
    assert not torch.equal(head[2:], ref_head[2:])


def test_bad_budget(tiny_stream: list[Task]) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        run_stream(_model(tiny_stream), OPTIMIZERS["sgd"], tiny_stream, batch_size=0)
    with pytest.raises(ValueError, match="no tasks"):
        run_stream(_model(tiny_stream), OPTIMIZERS["sgd"], [])
    with pytest.raises(ValueError, match="no parameters"):
        run_stream(torch.nn.Flatten, OPTIMIZERS["sgd"], tiny_stream)


@pytest.mark.parametrize("kind", ["adam", "ewc", "si"])
def test_named_parameters_change_nothing_for_the_baselines(tiny_stream, kind) -> None:
    """The suite hands optimizers ``model.named_parameters()`` (the learned rule reads
    parameter kinds from names); the baselines' results are those with plain tensors."""
    from metaopt.continual.baselines import EWC, SI

    factory = {
        "adam": OPTIMIZERS["adam"],
        "ewc": functools.partial(EWC, lr=1e-2, strength=1e2),
        "si": functools.partial(SI, lr=1e-2, strength=1.0),
    }[kind]
    seen = []

    def recording(params):
        params = list(params)
        seen.append(type(params[0]))
        return factory(params)

    plain = run_stream(_model(tiny_stream), recording, tiny_stream, seed=1)
    named = run_stream(_model(tiny_stream), recording, tiny_stream, seed=1, named_parameters=True)
    assert seen == [torch.nn.Parameter, tuple]
    assert torch.equal(plain.R, named.R) and plain.train_loss == named.train_loss


def test_named_parameters_reach_the_learned_rule(tiny_stream) -> None:
    """With names, a LayerNorm's parameters are norm tokens for the learned rule (as in
    meta-training); without, biases."""
    from metaopt import LearnedOptimizer

    class WithNorm(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(64, 16)
            self.norm = torch.nn.LayerNorm(16)
            self.head = torch.nn.Linear(16, n_outputs(tiny_stream))

        def forward(self, x):
            return self.head(torch.relu(self.norm(self.fc(x.flatten(1)))))

    keys = []

    def recording(params):
        opt = LearnedOptimizer(params, lr=1e-2)
        keys.append(opt.param_keys(opt.param_groups[0]))
        return opt

    plain = run_stream(WithNorm, recording, tiny_stream, seed=0)
    named = run_stream(WithNorm, recording, tiny_stream, seed=0, named_parameters=True)
    assert keys[0][:3] == ["0", "1", "2"] and keys[1][:3] == ["fc.weight", "fc.bias", "norm.weight"]
    assert not torch.equal(plain.R, named.R) or plain.train_loss != named.train_loss
