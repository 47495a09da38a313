"""The torch.optim behaviour of FunctionalOptimizer: schedulers, state_dict, errors, groups."""

from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch
from torch import nn

import metaopt
from tests.models import build


def _train(model, opt, x, y, steps, scheduler=None):
    lrs = []
    for _ in range(steps):
        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
        lrs.append(opt.param_groups[0].get("lr"))
        if scheduler is not None:
            scheduler.step()
    return lrs


SCHEDULERS = {
    "step": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5),
    "onecycle": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=30),
    "cosine": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=12),
}


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_lr_schedulers_drive_it_like_torch_adam(name):
    model, x, y = build("mlp", 6, seed=1)
    twin = copy.deepcopy(model)
    ours = metaopt.FunctionalOptimizer(model.parameters(), metaopt.rules.adam, lr=0.01)
    ref = torch.optim.Adam(twin.parameters(), lr=0.01)
    lrs_ours = _train(model, ours, x, y, 30, SCHEDULERS[name](ours))
    lrs_ref = _train(twin, ref, x, y, 30, SCHEDULERS[name](ref))
    assert lrs_ours == lrs_ref
    assert len(set(lrs_ours)) > 1  # the schedule really changed the lr
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-12)


def test_onecycle_momentum_cycling_reaches_betas():
    """OneCycleLR cycles betas[0]; the group value must reach the rule at every step."""
    model, x, y = build("mlp", 4, seed=2)
    twin = copy.deepcopy(model)
    ours = metaopt.FunctionalOptimizer(model.parameters(), metaopt.rules.adam, lr=0.01)
    ref = torch.optim.Adam(twin.parameters(), lr=0.01)
    sched = [torch.optim.lr_scheduler.OneCycleLR(o, 0.05, total_steps=20) for o in (ours, ref)]
    _train(model, ours, x, y, 20, sched[0])
    _train(twin, ref, x, y, 20, sched[1])
    assert ours.param_groups[0]["betas"] == ref.param_groups[0]["betas"]
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-12)


def test_closure_loss_is_returned():
    model, x, y = build("mlp", 4, seed=0)
    opt = metaopt.FunctionalOptimizer(model.parameters(), metaopt.rules.sgd, lr=0.1)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    first = opt.step(closure)
    second = opt.step(closure)
    assert isinstance(first, torch.Tensor) and second < first


def test_state_dict_round_trip_mid_training_continues_identically():
    model, x, y = build("cnn", 3, seed=4)
    opt = metaopt.FunctionalOptimizer(model.parameters(), metaopt.rules.adam, lr=0.01, amsgrad=True)
    _train(model, opt, x, y, 7)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _train(model, opt, x, y, 8)

    clone, _, _ = build("cnn", 3, seed=99)
    clone.load_state_dict(saved_model)
    opt2 = metaopt.FunctionalOptimizer(clone.parameters(), metaopt.rules.adam, lr=0.5)
    opt2.load_state_dict(saved_opt)
    assert opt2.param_groups[0]["lr"] == 0.01 and opt2.param_groups[0]["amsgrad"] is True
    _train(clone, opt2, x, y, 8)
    for p, q in zip(model.parameters(), clone.parameters(), strict=True):
        assert torch.equal(p, q)


def _snapshot(opt):
    return copy.deepcopy(opt.state_dict())


def _assert_unchanged(opt, before):
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert after["state"].keys() == before["state"].keys()
    for k in before["state"]:
        for name, v in before["state"][k].items():
            assert torch.equal(after["state"][k][name], v)


def test_bad_state_dicts_raise_and_change_nothing():
    model, x, y = build("mlp", 4, seed=0)
    opt = metaopt.FunctionalOptimizer(model.parameters(), metaopt.rules.adam, lr=0.01)
    _train(model, opt, x, y, 2)
    before = _snapshot(opt)

    other_model, _, _ = build("mlp", 5, seed=0)  # other shapes
    other = metaopt.FunctionalOptimizer(other_model.parameters(), metaopt.rules.adam)
    _train(other_model, other, *build("mlp", 5, seed=0)[1:], steps=1)
    with pytest.raises(ValueError, match="does not fit parameter"):
        opt.load_state_dict(other.state_dict())
    _assert_unchanged(opt, before)

    sgd = metaopt.FunctionalOptimizer(model.parameters(), metaopt.rules.sgd, lr=0.1, momentum=0.9)
    _train(model, sgd, x, y, 1)
    with pytest.raises(ValueError, match="does not fit parameter"):  # another rule
        opt.load_state_dict(sgd.state_dict())
    _assert_unchanged(opt, before)

    with pytest.raises(ValueError, match="parameter groups"):
        truncated = copy.deepcopy(before)
        truncated["param_groups"] = []
        opt.load_state_dict(truncated)
    with pytest.raises(ValueError, match="not an optimizer state_dict"):
        opt.load_state_dict({"weights": 1})
    _assert_unchanged(opt, before)


def test_nonfinite_gradient_raises_and_leaves_everything_untouched():
    model, x, y = build("mlp", 4, seed=0)
    opt = metaopt.FunctionalOptimizer(model.parameters(), metaopt.rules.adam, lr=0.01)
    _train(model, opt, x, y, 2)
    params_before = [p.detach().clone() for p in model.parameters()]
    state_before = _snapshot(opt)
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    last = list(model.parameters())[-1]
    last.grad[0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite gradient"):
        opt.step()
    for p, q in zip(model.parameters(), params_before, strict=True):
        assert torch.equal(p, q)
    _assert_unchanged(opt, state_before)

    last.grad[0] = float("inf")
    opt.check_finite = False  # documented opt-out: the inf flows into the parameter
    opt.step()
    assert not torch.isfinite(last).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_finite_check_finds_a_bad_value_among_gradients_of_several_dtypes(bad):
    params = {
        name: nn.Parameter(torch.ones(5, dtype=dtype))
        for name, dtype in (("a", torch.float64), ("b", torch.bfloat16), ("c", torch.float32))
    }
    opt = metaopt.FunctionalOptimizer(params.items(), metaopt.rules.sgd, lr=0.1)
    for p in params.values():
        p.grad = torch.full_like(p, 0.5)
    params["b"].grad[3] = bad
    with pytest.raises(FloatingPointError, match="'b'"):
        opt.step()
    assert all(torch.equal(p, torch.ones_like(p)) for p in params.values())
    params["b"].grad[3] = 0.5
    opt.step()
    assert all(torch.equal(p, torch.full_like(p, 0.95)) for p in params.values())


def test_finite_check_accepts_large_finite_half_precision_gradients():
    """Their norm (about 134,000) is beyond float16's range; the check accumulates in
    float32, so the norm is finite and the exact per-tensor pass does not run."""
    p = nn.Parameter(torch.zeros(5, dtype=torch.float16))
    opt = metaopt.FunctionalOptimizer([p], metaopt.rules.sgd, lr=1e-4)
    p.grad = torch.full_like(p, 60000.0)
    with mock.patch.object(torch, "isfinite", wraps=torch.isfinite) as isfinite:
        opt.step()
    assert isfinite.call_count == 1  # the norms only
    torch.testing.assert_close(p, torch.full_like(p, -6.0))


def test_params_without_grad_are_skipped_and_keep_no_state():
    model, x, y = build("mlp", 4, seed=0)
    frozen = model[0].weight
    frozen.requires_grad_(False)
    opt = metaopt.FunctionalOptimizer(model.parameters(), metaopt.rules.adam, lr=0.01)
    before = frozen.detach().clone()
    _train(model, opt, x, y, 3)
    assert torch.equal(frozen, before)
    assert len(opt.state[frozen]) == 0
    assert all(len(opt.state[p]) > 0 for p in model.parameters() if p.requires_grad)


def test_sparse_gradients_are_rejected():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = metaopt.FunctionalOptimizer(emb.parameters(), metaopt.rules.sgd, lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


def test_param_groups_have_their_own_hyper_parameters():
    model, x, y = build("mlp", 4, seed=0)
    twin = copy.deepcopy(model)
    groups = lambda m: [  # noqa: E731
        {"params": m[0].parameters(), "lr": 0.1, "momentum": 0.9},
        {"params": list(m[2].parameters()) + list(m[4].parameters())},
    ]
    ours = metaopt.FunctionalOptimizer(groups(model), metaopt.rules.sgd, lr=0.01)
    ref = torch.optim.SGD(groups(twin), lr=0.01)
    _train(model, ours, x, y, 10)
    _train(twin, ref, x, y, 10)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-12)


def test_add_param_group_and_emptied_state_reinitialise_lazily():
    model, x, y = build("mlp", 4, seed=0)
    head = model[4]
    body = [p for n, p in model.named_parameters() if not n.startswith("4.")]
    opt = metaopt.FunctionalOptimizer(body, metaopt.rules.adam, lr=0.01)
    _train(model, opt, x, y, 2)
    opt.add_param_group({"params": head.parameters(), "lr": 0.001})
    _train(model, opt, x, y, 1)
    assert float(opt.state[head.weight]["[0].step"]) == 1.0
    assert float(opt.state[body[0]]["[0].step"]) == 3.0
    opt.state.clear()  # what continual-learning frameworks do between experiences
    _train(model, opt, x, y, 1)
    assert float(opt.state[body[0]]["[0].step"]) == 1.0


def test_state_is_stored_under_its_key_paths_at_every_step_and_when_its_layout_changes():
    model, x, y = build("mlp", 4, seed=0)
    w = next(model.parameters())
    base = metaopt.rules.adam(lr=0.01)
    extra = {"on": False}

    def update(grads, state, params=None):  # from the third step, one more state tensor
        updates, new = base.update(grads, {k: s[0] for k, s in state.items()}, params)
        return updates, {k: (s, torch.ones(())) if extra["on"] else (s,) for k, s in new.items()}

    rule = metaopt.UpdateRule(lambda p: {k: (s,) for k, s in base.init(p).items()}, update)
    opt = metaopt.FunctionalOptimizer(model.parameters(), rule)
    adam_keys = ["[0][0].step", "[0][0].exp_avg", "[0][0].exp_avg_sq", "[0][0].max_exp_avg_sq"]
    for step in range(1, 5):
        extra["on"] = step >= 3
        _train(model, opt, x, y, 1)
        assert list(opt.state[w]) == adam_keys + (["[1]"] if step >= 3 else [])
        assert float(opt.state[w]["[0][0].step"]) == step


def test_a_rule_state_leaf_that_is_no_tensor_is_rejected_at_any_step():
    model, x, y = build("mlp", 4, seed=0)
    base = metaopt.rules.sgd(lr=0.1, momentum=0.9)
    calls = []

    def update(grads, state, params=None):
        calls.append(1)
        updates, new = base.update(grads, state, params)
        if len(calls) == 2:  # a number where a tensor was
            new = {k: (s[0], 1.0) if isinstance(s, tuple) else s for k, s in new.items()}
        return updates, new

    opt = metaopt.FunctionalOptimizer(model.parameters(), metaopt.UpdateRule(base.init, update))
    _train(model, opt, x, y, 1)
    with pytest.raises(TypeError, match="rule state leaves must be tensors, got float"):
        _train(model, opt, x, y, 1)


def test_named_parameters_give_named_keys():
    model, x, y = build("mlp", 4, seed=0)
    seen = []
    base = metaopt.rules.sgd(lr=0.1)

    def update(grads, state, params=None):
        seen.append(sorted(grads))
        return base.update(grads, state, params)

    rule = metaopt.UpdateRule(base.init, update)
    opt = metaopt.FunctionalOptimizer(model.named_parameters(), rule)
    _train(model, opt, x, y, 1)
    assert seen == [sorted(n for n, _ in model.named_parameters())]


def test_bad_hyper_parameters_give_clear_errors():
    params = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(TypeError, match="no hyper-parameter"):
        metaopt.FunctionalOptimizer(params, metaopt.rules.adam, learning_rate=0.1)
    with pytest.raises(TypeError, match="need a rule factory"):
        metaopt.FunctionalOptimizer(params, metaopt.rules.adam(), lr=0.1)
    with pytest.raises(TypeError, match="UpdateRule or a factory"):
        metaopt.FunctionalOptimizer(params, "adam")
    with pytest.raises(ValueError, match="invalid learning rate"):
        metaopt.FunctionalOptimizer(params, metaopt.rules.adam, lr=-1.0)
    opt = metaopt.FunctionalOptimizer(params, metaopt.rules.adam, lr=1.0)
    with pytest.raises(ValueError, match="invalid beta1"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "betas": (1.5, 0.9)})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("optimizer", ["functional", "learned"])
def test_invalid_hyper_parameter_in_a_later_group_changes_nothing(optimizer):
    """A value edited into ``param_groups`` after construction is checked when ``step``
    builds the rule; no group is stepped before every group's rule is valid."""
    first, second = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    groups = [{"params": [first]}, {"params": [second]}]
    if optimizer == "learned":
        opt = metaopt.LearnedOptimizer(groups, lr=0.1)
    else:
        opt = metaopt.FunctionalOptimizer(groups, metaopt.rules.adam, lr=0.1)
    (first.sum() + second.sum()).backward()
    opt.param_groups[1]["lr"] = -1.0
    with pytest.raises(ValueError, match="invalid learning rate"):
        opt.step()
    assert torch.equal(first.detach(), torch.ones(3))
    assert torch.equal(second.detach(), torch.ones(2))
    assert not opt.state
    opt.param_groups[1]["lr"] = 0.1
    opt.step()
    assert (first < 1).all() and (second < 1).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_params_keep_their_dtype(dtype):
    p = torch.nn.Parameter(torch.ones(4, dtype=dtype))
    opt = metaopt.FunctionalOptimizer([p], metaopt.rules.adam, lr=0.1)
    p.grad = torch.ones(4, dtype=dtype)
    opt.step()
    assert p.dtype == dtype and opt.state[p]["[0].exp_avg"].dtype == dtype
    assert torch.all(p < 1)
