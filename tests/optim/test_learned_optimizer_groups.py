"""LearnedOptimizer runs one attention over every parameter group that shares the rule's
hyper-parameters (and a device), as the rule saw whole models in meta-training."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from metaopt import LearnedOptimizer
from metaopt.learned import LearnedRuleNet, load_pretrained


@pytest.fixture(scope="module")
def default_net() -> LearnedRuleNet:
    return load_pretrained("default")


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 4))


def _whole_plan(opt: LearnedOptimizer) -> list:
    """``(group, keys, params)`` of every group with all its parameters, as ``step``
    gathers them when every parameter has a gradient."""
    return [(g, opt.param_keys(g), list(g["params"])) for g in opt.param_groups]


def _train(model: nn.Module, opt: LearnedOptimizer, tasks: int = 2, steps: int = 4) -> None:
    """``tasks`` tasks of ``steps`` full-batch steps, a task boundary after each."""
    g = torch.Generator().manual_seed(5)
    for _ in range(tasks):
        x, y = torch.randn(12, 8, generator=g), torch.randint(0, 4, (12,), generator=g)
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        opt.new_task()


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_groups_with_equal_hyper_parameters_update_as_one_group(default_net, compile):
    """The model's parameters split in order into two groups with the same lr step
    bit-identically to one group (one attention over all tensors); before, each group
    had an attention of its own and the parameters differed by up to 0.28."""
    one, two = _model(), _model()
    opts = [
        LearnedOptimizer(one.parameters(), lr=1e-2, net=copy.deepcopy(default_net),
                         compile=compile),
        LearnedOptimizer(
            [{"params": list(two[0].parameters())},
             {"params": [*two[1].parameters(), *two[3].parameters()]}],
            lr=1e-2, net=copy.deepcopy(default_net), compile=compile,
        ),
    ]
    for model, opt in zip((one, two), opts, strict=True):
        _train(model, opt)
    for p, q in zip(one.parameters(), two.parameters(), strict=True):
        assert torch.equal(p, q)
    assert len(opts[1].param_groups) == 2  # the groups themselves are left as they are


def test_groups_with_other_hyper_parameters_keep_their_own_attention(default_net):
    """A group with another lr, betas, eps or topk_fraction is one update call of its
    own; equal values (betas as a list or a tuple) share one."""
    params = [nn.Parameter(torch.randn(3)) for _ in range(8)]
    opt = LearnedOptimizer(params[:2], lr=1e-2, net=default_net)
    for extra in ({"lr": 1e-3}, {"betas": (0.8, 0.999)}, {"eps": 1e-6},
                  {"topk_fraction": 0.5}, {"lr": 0.01}, {"betas": [0.9, 0.999]}):
        opt.add_param_group({"params": [params[len(opt.param_groups) + 1]], **extra})
    plan = _whole_plan(opt)
    calls = opt._update_calls(plan)
    sizes = [len(params) for _, _, params in calls]
    # groups 0, 5 (lr 0.01 == 1e-2) and 6 (betas as a list) merge; 1-4 stay apart
    assert sizes == [4, 1, 1, 1, 1]
    assert calls[0][0] is opt.param_groups[0]


def test_colliding_positional_keys_get_their_group_index_and_names_are_kept(default_net):
    """Unnamed groups name their parameters by position ("0", "1", ...): merged, they
    get the group's index as a prefix; named parameters keep their names."""
    model = _model()
    params = list(model.parameters())
    unnamed = LearnedOptimizer([{"params": params[:2]}, {"params": params[2:4]}],
                               net=default_net)
    plan = _whole_plan(unnamed)
    ((_, keys, merged),) = unnamed._update_calls(plan)
    assert keys == ["0.0", "0.1", "1.0", "1.1"] and merged == params[:4]
    named = list(model.named_parameters())
    by_name = LearnedOptimizer([{"params": named[:2]}, {"params": named[2:]}], net=default_net)
    plan = _whole_plan(by_name)
    ((_, keys, _),) = by_name._update_calls(plan)
    assert keys == [name for name, _ in named]


def test_tensor_learning_rates_merge_only_when_they_are_one_tensor(default_net):
    """Two tensor learning rates of equal value may be changed apart later: merged only
    when both groups hold the very same tensor."""
    params = list(_model().parameters())
    lr = torch.tensor(1e-2)
    shared = LearnedOptimizer([{"params": params[:2], "lr": lr}, {"params": params[2:], "lr": lr}],
                              net=default_net)
    apart = LearnedOptimizer(
        [{"params": params[:2], "lr": torch.tensor(1e-2)},
         {"params": params[2:], "lr": torch.tensor(1e-2)}],
        net=default_net,
    )
    for opt, n_calls in ((shared, 1), (apart, 2)):
        plan = _whole_plan(opt)
        assert len(opt._update_calls(plan)) == n_calls


def test_groups_on_different_devices_are_not_merged(default_net):
    """One attention runs on one device: a group on the ``meta`` device (shapes only)
    stays apart from a CPU group with the same hyper-parameters, and both step."""
    cpu = nn.Linear(4, 3)
    meta = nn.Linear(4, 3, device="meta")
    opt = LearnedOptimizer([{"params": list(cpu.parameters())},
                            {"params": list(meta.parameters())}], net=default_net)
    for p in (*cpu.parameters(), *meta.parameters()):
        p.grad = torch.ones_like(p)
    plan = _whole_plan(opt)
    assert len(opt._update_calls(plan)) == 2
    before = cpu.weight.detach().clone()
    opt.step()
    assert not torch.equal(cpu.weight, before)
    assert meta.weight.device.type == "meta"
