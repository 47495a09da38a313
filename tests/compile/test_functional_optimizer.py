"""FunctionalOptimizer(compile=True): same numbers as the eager path, no recompilation when
a scheduler changes the learning rate."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import metaopt
from metaopt.optim import FunctionalOptimizer
from tests.compile.compile_models import batches, build


def train(opt_factory, steps: int = 6, kind: str = "mlp", graphs: list[int] | None = None):
    """Train a fresh model with a StepLR schedule; returns the model and the optimizer.
    ``graphs`` receives Dynamo's count of compiled graphs before and after each step."""
    model = build(kind)
    opt = opt_factory(model)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for x, y in batches(kind, steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if graphs is not None and not graphs:
            graphs.append(counters["stats"]["unique_graphs"])
        opt.step()
        if graphs is not None:
            graphs.append(counters["stats"]["unique_graphs"])
        sched.step()
    return model, opt


@pytest.mark.parametrize(
    ("factory", "hyper"),
    [
        (metaopt.rules.adam, {"lr": 1e-2, "weight_decay": 1e-3}),
        (metaopt.rules.sgd, {"lr": 0.1, "momentum": 0.9}),
    ],
)
def test_compiled_update_matches_eager_without_recompiling(factory, hyper):
    graphs: list[int] = []

    def compiled_opt(model):
        return FunctionalOptimizer(model.parameters(), factory, compile=True, **hyper)

    # 3 learning rates: 1e-2, 5e-3, 2.5e-3
    model_c, opt_c = train(compiled_opt, graphs=graphs)
    model_e, opt_e = train(
        lambda model: FunctionalOptimizer(model.parameters(), factory, **hyper)
    )
    assert graphs[1] > graphs[0], "the update was not compiled"
    assert graphs[-1] == graphs[1], "the learning-rate schedule caused recompilation"
    for p, q in zip(model_c.parameters(), model_e.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5)
    for p, q in zip(model_c.parameters(), model_e.parameters(), strict=True):
        for (name, a), (_, b) in zip(opt_c.state[p].items(), opt_e.state[q].items(), strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)
    # the state_dict format does not depend on compile
    assert opt_c.state_dict()["state"].keys() == opt_e.state_dict()["state"].keys()
