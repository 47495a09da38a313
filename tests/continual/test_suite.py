"""Suite plumbing: stream names, optimizer grid and factories, stream budgets, learned."""

from __future__ import annotations

import functools

import pytest
import torch

from metaopt.continual import suite as suite_module
from metaopt.continual.baselines import EWC, SI
from metaopt.continual.models import build_model
from metaopt.continual.runner import run_stream
from metaopt.continual.streams import n_outputs
from metaopt.continual.suite import (
    Budget,
    Setting,
    build_stream,
    learned_available,
    make_optimizer,
    n_runs,
    optimizer_grid,
    parse_stream,
    suite_from_preset,
)


def test_parse_stream_names() -> None:
    spec = parse_stream("split-fashion-mnist-class", n_tasks=2)
    assert (spec.kind, spec.dataset, spec.scenario, spec.n_tasks) == (
        "split",
        "fashion-mnist",
        "class",
        2,
    )
    assert spec.name == "split-fashion-mnist-class"
    assert parse_stream("permuted-mnist").scenario is None
    for bad in ("split-mnist", "permuted-mnist-task", "shuffled-mnist", "split-../x-task",
                "split-.hidden-task", "rotated-a/b", "permuted-"):
        with pytest.raises(ValueError, match="stream"):
            parse_stream(bad)
    # any other name is a folder of IDX files in the data directory (checked on loading)
    spec = parse_stream("split-my_kmnist.v2-domain", n_tasks=3)
    assert (spec.kind, spec.dataset, spec.scenario) == ("split", "my_kmnist.v2", "domain")
    spec = parse_stream("split-hard-task-domain", n_tasks=2)  # only the last suffix
    assert (spec.dataset, spec.scenario, spec.name) == ("hard-task", "domain",
                                                        "split-hard-task-domain")
    assert parse_stream("permuted-hard-class").dataset == "hard-class"  # not a scenario


def test_grid_and_factories() -> None:
    grid = optimizer_grid(["sgd", "adam", "ewc", "si"], [0.1, 1e-6], [10.0], [1.0, 2.0])
    assert [s.label for s in grid] == [
        "sgd lr=0.1",
        "sgd lr=1e-06",
        "adam lr=0.1",
        "adam lr=1e-06",
        "ewc lr=0.001 strength=10",
        "si lr=0.001 strength=1",
        "si lr=0.001 strength=2",
    ]
    params = [torch.nn.Parameter(torch.zeros(3))]
    assert isinstance(make_optimizer(grid[0])(params), torch.optim.SGD)
    assert make_optimizer(grid[3])(params).param_groups[0]["lr"] == 1e-6
    assert isinstance(make_optimizer(grid[4])(params), EWC)
    si = make_optimizer(grid[6])(params)
    assert isinstance(si, SI) and si.strength == 2.0 and isinstance(si.base, torch.optim.Adam)
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_optimizer(Setting("lbfgs"))


def test_build_stream_budget_on_digits() -> None:
    budget = Budget(n_train=50, n_val=10, n_test=20)
    stream = build_stream(parse_stream("split-digits-domain"), budget, seed=0)
    assert [(len(t.y_train), len(t.y_val), len(t.y_test)) for t in stream] == [(50, 10, 20)] * 5
    again = build_stream(parse_stream("split-digits-domain"), budget, seed=0)
    assert all(torch.equal(a.x_val, b.x_val) for a, b in zip(stream, again, strict=True))
    permuted = build_stream(parse_stream("permuted-digits", n_tasks=3), budget, seed=1)
    assert [(len(t.y_train), len(t.y_val), len(t.y_test)) for t in permuted] == [(50, 10, 20)] * 3


def test_preset_drops_learned_when_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(suite_module, "learned_available", lambda checkpoint="default": False)
    spec = suite_from_preset("quick", seeds=[0])
    assert "learned" not in {s.optimizer for s in spec.settings}
    assert n_runs(spec) == 2 * 1 * len(spec.settings) * 1
    with pytest.raises(ValueError, match="unknown suite"):
        suite_from_preset("huge")


@pytest.mark.skipif(not learned_available(), reason="learned optimizer not in this tree")
def test_learned_optimizer_runs_and_sees_task_boundaries() -> None:
    stream = build_stream(parse_stream("permuted-digits", n_tasks=3), Budget(40, 10, 20), 0)
    made = []

    def factory(params):
        made.append(make_optimizer(Setting("learned"))(params))
        return made[-1]

    model = functools.partial(build_model, "mlp", (1, 8, 8), n_outputs(stream), hidden=(16,))
    result = run_stream(model, factory, stream, steps=3)
    assert result.R.shape == (3, 3) and made[0].task_index == 2
