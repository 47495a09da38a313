"""LearnedOptimizer(compile=True) (the fused in-place step) follows the eager optimizer
across a task boundary."""

from __future__ import annotations

import copy

import pytest
import torch

import metaopt


@pytest.mark.slow
def test_compiled_learned_optimizer_matches_eager_across_a_task_boundary():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    twin, initial = copy.deepcopy(model), copy.deepcopy(model)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    compiled = metaopt.LearnedOptimizer(model.parameters(), lr=1e-2, compile=True)
    eager = metaopt.LearnedOptimizer(twin.parameters(), lr=1e-2)
    moments = None
    for step in range(6):
        if step == 3:
            compiled.new_task()
            eager.new_task()
        for net, opt in ((model, compiled), (twin, eager)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
        if moments is None:
            moments = [compiled.state[p][".exp_avg"].data_ptr() for p in model.parameters()]
    # the fused path updated the moments in their own storage (the functional one would not)
    assert [compiled.state[p][".exp_avg"].data_ptr() for p in model.parameters()] == moments
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)  # float32, the bound
    assert compiled.task_index == eager.task_index == 1
    pairs = zip(model.parameters(), initial.parameters(), strict=True)
    assert all(not torch.equal(p, q) for p, q in pairs)  # training really moved them


@pytest.mark.slow
def test_compiled_learned_optimizer_follows_a_scheduler_without_recompiling():
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    twin = copy.deepcopy(model)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    pairs = []
    for net, compile in ((model, True), (twin, False)):
        opt = metaopt.LearnedOptimizer(net.parameters(), lr=1e-2, compile=compile)
        pairs.append((net, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)))
    graphs = None
    for step in range(4):
        for net, opt, sched in pairs:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
            sched.step()
        if step == 0:
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs  # 4 learning rates, one graph
    assert pairs[0][1].param_groups[0]["lr"] == pytest.approx(1e-2 / 16)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)
