"""Adversarial checks of the torch.optim contract for FunctionalOptimizer and LearnedOptimizer.

Where a behaviour is shared with ``torch.optim``, the two drop-ins are compared with
``torch.optim.Adam`` / ``torch.optim.SGD`` numerically: ``FunctionalOptimizer`` with
``metaopt.rules.adam`` / ``sgd``, and ``LearnedOptimizer`` with a fresh ``LearnedRuleNet()``
(whose rule is Adam's at init).
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings
from collections import defaultdict

import pytest
import torch
from torch import nn
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

import metaopt
from metaopt import FunctionalOptimizer, LearnedOptimizer
from metaopt.learned import LearnedRuleNet

S = torch.optim.lr_scheduler
F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------- helpers
def _model(seed: int = 0, dtype: torch.dtype = F64) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(dtype)


def _batch(dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(8, 3, generator=torch.Generator().manual_seed(123), dtype=dtype)


X = _batch()


def _loss(model: nn.Module, x: torch.Tensor = X) -> torch.Tensor:
    return (model(x) ** 2).sum()


def _step(model, opt, scheduler=None, metric=None):
    opt.zero_grad()
    _loss(model).backward()
    opt.step()
    if scheduler is not None:
        scheduler.step() if metric is None else scheduler.step(metric)


def _assert_same_params(a: nn.Module, b: nn.Module, atol: float = 1e-10) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=atol, msg=f"parameter {name}")


def _functional(params, lr=1e-2, **kw):
    return FunctionalOptimizer(params, metaopt.rules.adam, lr=lr, **kw)


def _learned(params, lr=1e-2, **kw):
    return LearnedOptimizer(params, lr=lr, net=LearnedRuleNet(), **kw)


ADAM_LIKE = {"functional": _functional, "learned": _learned}
"""Optimizers that equal ``torch.optim.Adam`` with the same hyper-parameters."""


def _saved(obj):
    """A detached copy of a state_dict through ``torch.save`` / ``torch.load(weights_only)``."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _snapshot(opt):
    """Everything observable about an optimizer's state and groups, deep-copied."""
    return copy.deepcopy(
        {
            "state": {id(p): dict(s) for p, s in opt.state.items()},
            "groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
            "params": [[id(p) for p in g["params"]] for g in opt.param_groups],
        }
    )


def _assert_snapshot_equal(a, b):
    assert a["groups"] == b["groups"] and a["params"] == b["params"]
    assert a["state"].keys() == b["state"].keys()
    for key in a["state"]:
        assert a["state"][key].keys() == b["state"][key].keys()
        for name in a["state"][key]:
            assert torch.equal(a["state"][key][name], b["state"][key][name]), name


# ---------------------------------------------------------------------------- param groups
@pytest.mark.parametrize("kind", sorted(ADAM_LIKE))
def test_add_param_group_after_steps_is_stepped_with_lazy_state(kind):
    ours_model, ref_model = _model(), _model()
    ours = ADAM_LIKE[kind](ours_model[0].parameters())
    ref = torch.optim.Adam(ref_model[0].parameters(), lr=1e-2)
    for i in range(6):
        if i == 3:
            ours.add_param_group({"params": ours_model[2].parameters(), "lr": 5e-2})
            ref.add_param_group({"params": ref_model[2].parameters(), "lr": 5e-2})
            assert all(not ours.state.get(p) for p in ours_model[2].parameters())
            assert ours.param_groups[1]["lr"] == 5e-2
            assert ours.param_groups[1]["betas"] == ref.param_groups[1]["betas"]
        _step(ours_model, ours)
        _step(ref_model, ref)
    _assert_same_params(ours_model, ref_model)
    assert all(ours.state[p] for p in ours_model[2].parameters())


@pytest.mark.parametrize("kind", sorted(ADAM_LIKE))
def test_params_without_grad_are_untouched_and_zero_grad_keeps_zeros(kind):
    ours_model, ref_model = _model(), _model()
    ours_extra = nn.Parameter(torch.ones(3, dtype=F64))
    ref_extra = nn.Parameter(torch.ones(3, dtype=F64))
    ours = ADAM_LIKE[kind]([*ours_model.parameters(), ours_extra])
    ref = torch.optim.Adam([*ref_model.parameters(), ref_extra], lr=1e-2)
    for i in range(5):
        for model, opt in ((ours_model, ours), (ref_model, ref)):
            opt.zero_grad(set_to_none=False)
            if i in (0, 3):  # other steps: zero (not None) grads, Adam still moves
                _loss(model).backward()
            opt.step()
    _assert_same_params(ours_model, ref_model)
    assert ours_extra.grad is None and torch.equal(ours_extra, torch.ones(3, dtype=F64))
    assert not ours.state.get(ours_extra)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in ours_model.parameters())


@pytest.mark.parametrize("kind", sorted(ADAM_LIKE))
def test_duplicate_and_shared_parameters_behave_like_torch(kind):
    p = nn.Parameter(torch.ones(3, dtype=F64))
    with pytest.warns(UserWarning, match="duplicate parameters"):
        ADAM_LIKE[kind]([p, p])
    with pytest.raises(ValueError, match="more than one parameter group"):
        ADAM_LIKE[kind]([{"params": [p]}, {"params": [p], "lr": 0.1}])
    opt = ADAM_LIKE[kind]([p])
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [p]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("kind", sorted(ADAM_LIKE))
def test_invalid_added_group_is_rejected_and_not_added(kind):
    model = _model()
    opt = ADAM_LIKE[kind](model[0].parameters())
    with pytest.raises(ValueError):
        opt.add_param_group({"params": model[2].parameters(), "lr": -1.0})
    assert len(opt.param_groups) == 1
    _step(model, opt)  # still usable


# ---------------------------------------------------------------------------- state_dict
@pytest.mark.parametrize("kind", ["functional", "learned-default-net"])
def test_state_dict_round_trip_after_add_param_group_through_weights_only(kind):
    def make(params):
        if kind == "functional":
            return _functional(params)
        return LearnedOptimizer(params, lr=1e-2)  # the shipped net: a non-trivial rule

    model = _model(dtype=torch.float32)
    x = _batch(torch.float32)
    opt = make(model[0].parameters())
    for i in range(4):
        if i == 2:
            opt.add_param_group({"params": model[2].parameters(), "lr": 3e-2})
        opt.zero_grad()
        _loss(model, x).backward()
        opt.step()
    if kind != "functional":
        opt.new_task()
    twin = _model(seed=9, dtype=torch.float32)
    twin.load_state_dict(model.state_dict())
    restored = make(twin[0].parameters())
    restored.add_param_group({"params": twin[2].parameters()})
    restored.load_state_dict(_saved(opt.state_dict()))
    assert [g["lr"] for g in restored.param_groups] == [1e-2, 3e-2]
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        for (k, a), (k2, b) in zip(opt.state[p].items(), restored.state[q].items(), strict=True):
            assert k == k2 and a.dtype == b.dtype and torch.equal(a, b), k
    for m, o in ((model, opt), (twin, restored)):
        for _ in range(3):
            o.zero_grad()
            _loss(m, x).backward()
            o.step()
    _assert_same_params(model, twin, atol=0)


@pytest.mark.parametrize("kind", sorted(ADAM_LIKE))
def test_load_state_dict_of_another_model_raises_and_changes_nothing(kind):
    model = _model()
    opt = ADAM_LIKE[kind](model.parameters())
    _step(model, opt)
    before = _snapshot(opt)

    wider = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    other_shapes = ADAM_LIKE[kind](wider.parameters())
    _step(wider, other_shapes)
    fewer = ADAM_LIKE[kind](list(_model(1).parameters())[:3])
    two_groups = ADAM_LIKE[kind]([{"params": [p]} for p in _model(2).parameters()])
    torch_model = _model(3)
    foreign = torch.optim.Adam(torch_model.parameters())
    _step(torch_model, foreign)
    for source in (other_shapes, fewer, two_groups, foreign):
        with pytest.raises(ValueError):
            opt.load_state_dict(source.state_dict())
        _assert_snapshot_equal(before, _snapshot(opt))
    with pytest.raises(ValueError):
        opt.load_state_dict({"state": {}})
    _assert_snapshot_equal(before, _snapshot(opt))


@pytest.mark.parametrize("kind", sorted(ADAM_LIKE))
def test_state_dict_hooks_are_called(kind):
    model = _model()
    opt = ADAM_LIKE[kind](model.parameters())
    _step(model, opt)
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd_pre"))

    def post(o, sd):
        calls.append("sd_post")
        sd["extra"] = 1
        return sd

    opt.register_state_dict_post_hook(post)
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load_pre"))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load_post"))
    sd = opt.state_dict()
    assert sd["extra"] == 1
    opt.load_state_dict(_saved(sd))
    assert calls == ["sd_pre", "sd_post", "load_pre", "load_post"]


def test_load_state_dict_pre_hook_may_convert_the_state_dict():
    """Convert a torch.optim.Adam checkpoint into FunctionalOptimizer(adam)'s layout."""
    ref_model, ours_model = _model(), _model()
    ref = torch.optim.Adam(ref_model.parameters(), lr=1e-2)
    for _ in range(3):
        _step(ref_model, ref)
    ours_model.load_state_dict(ref_model.state_dict())
    ours = _functional(ours_model.parameters())

    def from_torch_adam(opt, sd):
        state = {}
        for i, s in sd["state"].items():
            state[i] = {f"[0].{k}": v for k, v in s.items()}
            state[i]["[0].max_exp_avg_sq"] = s["exp_avg"].new_zeros(0)
        return {**sd, "state": state}

    ours.register_load_state_dict_pre_hook(from_torch_adam)
    ours.load_state_dict(_saved(ref.state_dict()))
    for _ in range(3):
        _step(ref_model, ref)
        _step(ours_model, ours)
    _assert_same_params(ours_model, ref_model)


def test_learned_task_index_survives_a_state_dict_saved_before_any_step():
    """new_task() at the start of every task, the state saved before the first step:
    no parameter has state to carry the index, the groups do."""
    p = nn.Parameter(torch.ones(3))
    opt = _learned([p])
    opt.new_task()
    opt.new_task()
    fresh = _learned([nn.Parameter(torch.ones(3))])
    fresh.load_state_dict(_saved(opt.state_dict()))
    assert fresh.task_index == 2
    q = fresh.param_groups[0]["params"][0]
    q.grad = torch.ones(3)
    fresh.step()
    assert float(fresh.state[q][".task_index"]) == 2.0


def test_learned_load_state_dict_post_hook_sees_the_loaded_state():
    p = nn.Parameter(torch.randn(4))
    opt = LearnedOptimizer([p])
    p.grad = torch.ones(4)
    opt.step()
    opt.new_task()
    sd = _saved(opt.state_dict())
    fresh = LearnedOptimizer([p])
    seen = {}

    def post(o):
        seen["anchor"] = o.state[p][".anchor"].dtype
        seen["task_index"] = o.task_index

    fresh.register_load_state_dict_post_hook(post)
    fresh.load_state_dict(sd)
    assert fresh.state[p][".anchor"].dtype == torch.bfloat16 and fresh.task_index == 1
    assert seen == {"anchor": torch.bfloat16, "task_index": 1}


def test_functional_step_counter_keeps_counting_after_reload_in_bfloat16():
    p = nn.Parameter(torch.randn(4, dtype=torch.bfloat16))
    opt = _functional([p])
    p.grad = torch.ones_like(p)
    opt.step()
    sd = _saved(opt.state_dict())
    sd["state"][0]["[0].step"] = torch.tensor(300.0)  # as after 300 steps
    opt.load_state_dict(sd)
    opt.step()
    ref = torch.optim.Adam([nn.Parameter(p.detach().clone())])
    ref.load_state_dict(
        {
            "state": {0: {"step": torch.tensor(300.0)}},
            "param_groups": [{**ref.param_groups[0], "params": [0]}],
        }
    )
    assert ref.state[ref.param_groups[0]["params"][0]]["step"].dtype == torch.float32
    assert opt.state[p]["[0].step"].dtype == torch.float32
    assert float(opt.state[p]["[0].step"]) == 301.0


def test_learned_counters_keep_float32_after_reload_in_bfloat16():
    p = nn.Parameter(torch.randn(4, dtype=torch.bfloat16))
    opt = LearnedOptimizer([p])
    p.grad = torch.ones_like(p)
    opt.step()
    opt.load_state_dict(_saved(opt.state_dict()))
    assert opt.state[p][".step"].dtype == torch.float32
    assert opt.state[p][".exp_avg"].dtype == torch.bfloat16


# ---------------------------------------------------------------------------- hooks
@pytest.mark.parametrize("kind", ["torch", "functional"])
def test_functional_step_hooks_behave_like_torch(kind):
    model = _model()
    if kind == "torch":
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    else:
        opt = _functional(model.parameters())
    calls = []

    def closure():
        opt.zero_grad()
        loss = _loss(model)
        loss.backward()
        calls.append("closure")
        return loss

    def pre(o, args, kwargs):
        calls.append("pre")
        assert o is opt
        return (args[0],), {"closure": closure}  # swap in the closure

    handle = opt.register_step_pre_hook(pre)
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    loss = opt.step()
    assert calls == ["pre", "closure", "post"]
    assert loss is not None
    handle.remove()
    calls.clear()
    opt.step(closure)
    assert calls == ["closure", "post"]


def test_learned_step_hooks_run_once_per_step():
    _functional([nn.Parameter(torch.ones(1))])  # any FunctionalOptimizer in the process
    model = _model()
    opt = _learned(model.parameters())
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    _step(model, opt)
    assert calls == ["pre", "post"]


# ---------------------------------------------------------------------------- schedulers
SCHEDULERS = {
    "onecycle": lambda o: S.OneCycleLR(o, max_lr=0.1, total_steps=10),
    "plateau": lambda o: S.ReduceLROnPlateau(o, patience=0, factor=0.5),
    "sequential": lambda o: S.SequentialLR(
        o,
        [S.LinearLR(o, start_factor=0.1, total_iters=3), S.ExponentialLR(o, gamma=0.9)],
        milestones=[3],
    ),
}
PAIRS = {
    "functional-adam": (_functional, lambda ps: torch.optim.Adam(ps, lr=1e-2)),
    "functional-sgd": (
        lambda ps: FunctionalOptimizer(ps, metaopt.rules.sgd, lr=1e-2, momentum=0.9),
        lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9),
    ),
    "learned": (_learned, lambda ps: torch.optim.Adam(ps, lr=1e-2)),
}


@pytest.mark.parametrize("pair", sorted(PAIRS))
@pytest.mark.parametrize("sched", sorted(SCHEDULERS))
def test_lr_schedulers_match_torch(pair, sched):
    make_ours, make_ref = PAIRS[pair]
    ours_model, ref_model = _model(), _model()
    ours, ref = make_ours(ours_model.parameters()), make_ref(ref_model.parameters())
    s_ours, s_ref = SCHEDULERS[sched](ours), SCHEDULERS[sched](ref)
    metric = 1.0 if sched == "plateau" else None
    for _ in range(10):
        _step(ours_model, ours, s_ours, metric)
        _step(ref_model, ref, s_ref, metric)
    _assert_same_params(ours_model, ref_model)
    for key in ("lr", "betas", "momentum"):
        assert ours.param_groups[0].get(key) == ref.param_groups[0].get(key), key


@pytest.mark.parametrize("kind", sorted(ADAM_LIKE))
def test_tensor_lr_with_a_scheduler_matches_torch(kind):
    ours_model, ref_model = _model(), _model()
    ours = ADAM_LIKE[kind](ours_model.parameters(), lr=torch.tensor(1e-2))
    ref = torch.optim.Adam(ref_model.parameters(), lr=torch.tensor(1e-2))
    s_ours, s_ref = S.StepLR(ours, 2, 0.5), S.StepLR(ref, 2, 0.5)
    for _ in range(6):
        _step(ours_model, ours, s_ours)
        _step(ref_model, ref, s_ref)
    _assert_same_params(ours_model, ref_model, atol=1e-8)
    assert isinstance(ours.param_groups[0]["lr"], torch.Tensor)
    assert float(ours.param_groups[0]["lr"]) == pytest.approx(float(ref.param_groups[0]["lr"]))


def test_functional_weight_decay_schedule_between_nonzero_values_matches_torch():
    ours_p = nn.Parameter(torch.ones(3, dtype=F64))
    ref_p = nn.Parameter(torch.ones(3, dtype=F64))
    ours = _functional([ours_p], weight_decay=0.04)
    ref = torch.optim.Adam([ref_p], lr=1e-2, weight_decay=0.04)
    for i in range(4):
        for p, o in ((ours_p, ours), (ref_p, ref)):
            o.param_groups[0]["weight_decay"] = 0.04 * (i + 1)  # a DINO-style wd schedule
            p.grad = torch.tensor([1.0, -2.0, 3.0], dtype=F64) * (i + 1)
            o.step()
    torch.testing.assert_close(ours_p, ref_p, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("before", "after"), [(0.0, 0.1), (0.1, 0.0)])
def test_functional_weight_decay_may_change_to_and_from_zero(before, after):
    ours_p = nn.Parameter(torch.ones(3, dtype=F64))
    ref_p = nn.Parameter(torch.ones(3, dtype=F64))
    ours = _functional([ours_p], weight_decay=before)
    ref = torch.optim.Adam([ref_p], lr=1e-2, weight_decay=before)
    for i in range(3):
        for p, o in ((ours_p, ours), (ref_p, ref)):
            if i == 1:
                o.param_groups[0]["weight_decay"] = after
            p.grad = torch.tensor([1.0, -2.0, 3.0], dtype=F64) * (i + 1)
            o.step()
    torch.testing.assert_close(ours_p, ref_p, rtol=0, atol=1e-12)


def test_maximize_is_rejected_clearly():
    p = nn.Parameter(torch.ones(2))
    with pytest.raises(TypeError, match="maximize"):
        FunctionalOptimizer([p], metaopt.rules.adam, maximize=True)
    with pytest.raises(TypeError, match="maximize"):
        LearnedOptimizer([p], maximize=True)


# ---------------------------------------------------------------------------- closures
@pytest.mark.parametrize("kind", sorted(ADAM_LIKE))
def test_closure_runs_with_grad_enabled_and_its_loss_is_returned(kind):
    ours_model, ref_model = _model(), _model()
    ours = ADAM_LIKE[kind](ours_model.parameters())
    ref = torch.optim.Adam(ref_model.parameters(), lr=1e-2)
    for model, opt in ((ours_model, ours), (ref_model, ref)):

        def closure(model=model, opt=opt):
            opt.zero_grad()
            loss = _loss(model)
            loss.backward()
            return loss

        for _ in range(3):
            with torch.no_grad():  # step must re-enable grad for the closure
                loss = opt.step(closure)
            assert isinstance(loss, torch.Tensor) and loss.requires_grad
    _assert_same_params(ours_model, ref_model)


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kind", sorted(ADAM_LIKE))
def test_sparse_gradients_raise_clearly_and_change_nothing(kind):
    emb = nn.Embedding(5, 3, sparse=True)
    before = emb.weight.detach().clone()
    opt = ADAM_LIKE[kind](emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert torch.equal(emb.weight, before) and not opt.state.get(emb.weight)


def test_complex_parameters_with_functional_sgd_match_torch():
    ours_p = nn.Parameter(torch.randn(4, dtype=torch.complex128))
    ref_p = nn.Parameter(ours_p.detach().clone())
    ours = FunctionalOptimizer([ours_p], metaopt.rules.sgd, lr=0.1, momentum=0.9)
    ref = torch.optim.SGD([ref_p], lr=0.1, momentum=0.9)
    for _ in range(3):
        for p, o in ((ours_p, ours), (ref_p, ref)):
            o.zero_grad()
            (p.abs() ** 2).sum().backward()
            o.step()
    torch.testing.assert_close(ours_p, ref_p, rtol=0, atol=1e-12)


def test_complex_parameters_are_rejected_clearly_by_the_learned_optimizer():
    """At construction, and by add_param_group (the group is not added, so no later step
    updates some groups before failing on it); a parameter made complex afterwards is
    rejected by the step, before anything changes."""
    z = nn.Parameter(torch.randn(4, dtype=torch.complex64))
    with pytest.raises(TypeError, match="complex64"):
        LearnedOptimizer([z])
    r = nn.Parameter(torch.randn(4))
    opt = LearnedOptimizer([r])
    with pytest.raises(TypeError, match="complex64"):
        opt.add_param_group({"params": [z], "lr": 1e-2})
    assert len(opt.param_groups) == 1
    p = nn.Parameter(torch.randn(4))
    opt = LearnedOptimizer([p])
    p.data = torch.randn(4, dtype=torch.complex64)
    before = p.detach().clone()
    (p.abs() ** 2).sum().backward()
    with pytest.raises(TypeError, match="complex64"):
        opt.step()
    assert torch.equal(p, before)


@pytest.mark.parametrize("flag", ["maximize", "amsgrad", "decoupled_weight_decay"])
def test_group_flags_the_rule_does_not_take_are_rejected(flag):
    """torch.optim honours these per group; a rule without them would silently compute
    something else, so the group is refused (and not added)."""
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    makers = {
        "functional-adam": lambda g: _functional(g),
        "functional-sgd": lambda g: FunctionalOptimizer(g, metaopt.rules.sgd, lr=0.1),
        "learned": lambda g: _learned(g),
    }
    for name, make in makers.items():
        takes = flag == "amsgrad" and name == "functional-adam"
        opt = make([a])
        if takes:
            opt.add_param_group({"params": [b], flag: True})
            assert len(opt.param_groups) == 2
            continue
        with pytest.raises(ValueError, match=flag):
            opt.add_param_group({"params": [b], flag: True})
        assert len(opt.param_groups) == 1, name
        with pytest.raises(ValueError, match=flag):
            make([{"params": [a], flag: True}])
        opt.add_param_group({"params": [b], flag: False, "my_framework_tag": "head"})


def test_group_weight_decay_needs_a_rule_that_takes_it():
    p = nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="weight_decay"):
        FunctionalOptimizer([{"params": [p], "weight_decay": 0.1}], metaopt.rules.adam(lr=0.1))
    FunctionalOptimizer([{"params": [p], "weight_decay": 0.0}], metaopt.rules.adam(lr=0.1))


def test_learned_optimizer_accepts_zero_weight_decay_only():
    p = nn.Parameter(torch.ones(2))
    LearnedOptimizer([p], net=LearnedRuleNet(), weight_decay=0.0)
    with pytest.raises(ValueError, match="weight_decay"):
        LearnedOptimizer([p], net=LearnedRuleNet(), weight_decay=0.01)


def test_a_loaded_group_with_a_flag_the_rule_does_not_take_is_refused():
    p = nn.Parameter(torch.ones(2))
    opt = _functional([p])
    sd = opt.state_dict()
    sd["param_groups"][0]["maximize"] = True
    before = _snapshot(opt)
    with pytest.raises(ValueError, match="maximize"):
        opt.load_state_dict(sd)
    _assert_snapshot_equal(before, _snapshot(opt))


@pytest.mark.parametrize("bad", ["0.1", None, 1j])
def test_a_learning_rate_that_is_no_real_number_is_refused_at_construction(bad):
    p = nn.Parameter(torch.ones(2))
    for make in (_functional, _learned):
        with pytest.raises(TypeError, match="real number"):
            make([p], lr=bad)


def test_complex_parameters_with_functional_adam_match_torch_or_raise():
    ours_p = nn.Parameter(torch.randn(4, dtype=torch.complex128))
    ref_p = nn.Parameter(ours_p.detach().clone())
    ours = _functional([ours_p])
    ref = torch.optim.Adam([ref_p], lr=1e-2)
    for _ in range(3):
        for p, o in ((ours_p, ours), (ref_p, ref)):
            o.zero_grad()
            (p.abs() ** 2).sum().backward()
            try:
                o.step()
            except (TypeError, ValueError, RuntimeError) as e:  # a clear refusal is fine
                assert "complex" in str(e)
                return
    torch.testing.assert_close(ours_p, ref_p, rtol=0, atol=1e-12)


def test_functional_steps_meta_parameters_without_the_finite_check():
    p = nn.Parameter(torch.empty(3, device="meta"))
    opt = _functional([p], check_finite=False)
    p.grad = torch.empty(3, device="meta")
    opt.step()
    assert all(v.device.type == "meta" for v in opt.state[p].values())


@pytest.mark.parametrize("kind", sorted(ADAM_LIKE))
def test_meta_parameters_step_like_torch(kind):
    ref_p = nn.Parameter(torch.empty(3, device="meta"))
    ref = torch.optim.Adam([ref_p])
    ref_p.grad = torch.empty(3, device="meta")
    ref.step()
    p = nn.Parameter(torch.empty(3, device="meta"))
    opt = ADAM_LIKE[kind]([p])
    p.grad = torch.empty(3, device="meta")
    opt.step()
    assert opt.state[p]


# ---------------------------------------------------------------------------- copies
@pytest.mark.parametrize("kind", sorted(ADAM_LIKE))
def test_deepcopy_of_the_optimizer_steps_like_the_original(kind):
    model = _model()
    opt = ADAM_LIKE[kind](model.parameters())
    _step(model, opt)
    twin_model = copy.deepcopy(model)
    both = copy.deepcopy({"model": model, "opt": opt})
    twin_model, twin = both["model"], both["opt"]
    for m, o in ((model, opt), (twin_model, twin)):
        _step(m, o)
    _assert_same_params(model, twin_model, atol=0)


def test_pickled_functional_optimizer_steps_like_the_original():
    model = _model()
    opt = _functional(model.parameters())
    _step(model, opt)
    both = pickle.loads(pickle.dumps({"model": model, "opt": opt}))
    for m, o in ((model, opt), (both["model"], both["opt"])):
        _step(m, o)
    _assert_same_params(model, both["model"], atol=0)


# ---------------------------------------------------------------------------- frameworks
@pytest.mark.parametrize("kind", sorted(ADAM_LIKE))
@pytest.mark.parametrize("how", ["reassign", "clear", "pop"])
def test_state_emptied_between_steps_restarts_like_torch(kind, how):
    ours_model, ref_model = _model(), _model()
    ours = ADAM_LIKE[kind](ours_model.parameters())
    ref = torch.optim.Adam(ref_model.parameters(), lr=1e-2)
    for i in range(5):
        if i == 2:
            for opt in (ours, ref):
                if how == "reassign":  # Avalanche's reset_optimizer
                    opt.state = defaultdict(dict)
                elif how == "clear":
                    opt.state.clear()
                else:
                    opt.state.pop(opt.param_groups[0]["params"][0])
        _step(ours_model, ours)
        _step(ref_model, ref)
    _assert_same_params(ours_model, ref_model)


@pytest.mark.parametrize("kind", sorted(ADAM_LIKE))
def test_param_data_replaced_between_steps(kind):
    ours_model, ref_model = _model(), _model()
    ours = ADAM_LIKE[kind](ours_model.parameters())
    ref = torch.optim.Adam(ref_model.parameters(), lr=1e-2)
    for i in range(5):
        if i in (2, 3):
            for model in (ours_model, ref_model):
                for p in model.parameters():
                    p.data = p.data.clone() * 0.5  # new storage, as module.to(...) makes
        _step(ours_model, ours)
        _step(ref_model, ref)
    _assert_same_params(ours_model, ref_model)


# ---------------------------------------------------------------------------- compile=True
def test_compiled_functional_add_param_group_after_steps_matches_adam():
    ours_model, ref_model = _model(dtype=torch.float32), _model(dtype=torch.float32)
    x = _batch(torch.float32)
    ours = _functional(ours_model[0].parameters(), compile=True)
    ref = torch.optim.Adam(ref_model[0].parameters(), lr=1e-2)
    for i in range(4):
        if i == 2:
            ours.add_param_group({"params": ours_model[2].parameters(), "lr": 5e-2})
            ref.add_param_group({"params": ref_model[2].parameters(), "lr": 5e-2})
        for m, o in ((ours_model, ours), (ref_model, ref)):
            o.zero_grad()
            _loss(m, x).backward()
            o.step()
    _assert_same_params(ours_model, ref_model, atol=1e-6)


def _one_cycle_against_adam(make_ours, steps, edit_at=None, **adam_kwargs):
    """Train a float32 model with ``make_ours(params)`` and another with
    ``torch.optim.Adam(lr=1e-2, **adam_kwargs)``, both under ``OneCycleLR`` (which cycles
    ``betas``), calling ``edit_at[1](optimizer)`` on both before step ``edit_at[0]``; check
    that both end with the same ``betas`` and parameters (1e-5) and return Dynamo's
    unique-graph count after each step."""
    from torch._dynamo.utils import counters

    ours_model, ref_model = _model(dtype=torch.float32), _model(dtype=torch.float32)
    x = _batch(torch.float32)
    ours = make_ours(ours_model.parameters())
    ref = torch.optim.Adam(ref_model.parameters(), lr=1e-2, **adam_kwargs)
    scheds = [S.OneCycleLR(o, max_lr=0.1, total_steps=12) for o in (ours, ref)]
    graphs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(steps):
            for m, o, s in zip((ours_model, ref_model), (ours, ref), scheds, strict=True):
                if edit_at is not None and i == edit_at[0]:
                    edit_at[1](o)
                o.zero_grad()
                _loss(m, x).backward()
                o.step()
                s.step()
            graphs.append(counters["stats"]["unique_graphs"])
    assert ours.param_groups[0]["betas"] == ref.param_groups[0]["betas"]
    _assert_same_params(ours_model, ref_model, atol=1e-5)
    return graphs


def test_compiled_functional_with_cycling_betas_matches_adam():
    _one_cycle_against_adam(lambda params: _functional(params, compile=True), steps=5)


# ---------------------------------------------------------------------------- fixes pinned
# Checks beyond the cases above for the fixes of the bugs those cases found.


# copies
def test_pickled_learned_optimizer_keeps_its_net_and_task_index():
    model = _model()
    opt = LearnedOptimizer(model.parameters(), lr=1e-2)  # the shipped net: a non-trivial rule
    _step(model, opt)
    opt.new_task()
    _step(model, opt)
    both = pickle.loads(pickle.dumps({"model": model, "opt": opt}))
    twin_model, twin = both["model"], both["opt"]
    assert twin.task_index == 1 and twin.net is not opt.net
    for a, b in zip(opt.net.parameters(), twin.net.parameters(), strict=True):
        assert torch.equal(a, b)
    for m, o in ((model, opt), (twin_model, twin)):
        for _ in range(2):
            _step(m, o)
    _assert_same_params(model, twin_model, atol=0)


def test_deepcopy_of_a_compiled_functional_optimizer_compiles_its_own_update():
    model, x = _model(dtype=torch.float32), _batch(torch.float32)
    opt = _functional(model.parameters(), compile=True)
    for m, o in ((model, opt),):
        o.zero_grad()
        _loss(m, x).backward()
        o.step()
    both = copy.deepcopy({"model": model, "opt": opt})
    assert both["opt"]._updates == {} and len(opt._updates) == 1  # rebuilt, not copied
    for m, o in ((model, opt), (both["model"], both["opt"])):
        o.zero_grad()
        _loss(m, x).backward()
        o.step()
    assert not set(map(id, both["opt"]._updates.values())) & set(map(id, opt._updates.values()))
    _assert_same_params(model, both["model"], atol=0)


def test_compiled_functional_groups_of_many_layouts_stay_compiled(monkeypatch):
    """Per-layer learning rates: 10 groups of other shapes. One compiled function for
    all groups hit Dynamo's recompile limit (8) and ran the rest eagerly; one per layout
    compiles each once (Dynamo with its eager backend here: the graphs are what counts)."""
    from torch._dynamo.utils import counters

    import metaopt.optim.functional as functional
    from metaopt._own_cache import with_own_cache

    monkeypatch.setattr(
        functional,
        "compile_own",
        lambda fn: torch.compile(with_own_cache(fn), backend="eager", fullgraph=True),
    )
    layers = [nn.Linear(3 + i, 2 + i) for i in range(10)]
    ref_layers = copy.deepcopy(layers)

    def groups(mods):
        return [{"params": m.parameters(), "lr": 1e-2 * (i + 1)} for i, m in enumerate(mods)]

    ours, ref = _functional(groups(layers), compile=True), torch.optim.Adam(groups(ref_layers))
    counters.clear()
    for _ in range(2):
        for mods, opt in ((layers, ours), (ref_layers, ref)):
            opt.zero_grad()
            sum(m(torch.ones(1, m.in_features)).square().sum() for m in mods).backward()
            opt.step()
    assert counters["stats"]["unique_graphs"] == 10
    assert len(ours._updates) == 10
    for a, b in zip(layers, ref_layers, strict=True):
        torch.testing.assert_close(a.weight, b.weight, rtol=1e-5, atol=1e-6)


def test_deepcopy_of_an_optimizer_with_a_ready_rule_steps_like_the_original():
    model = _model()
    opt = FunctionalOptimizer(model.parameters(), metaopt.rules.adam(lr=1e-2))
    _step(model, opt)
    both = copy.deepcopy({"model": model, "opt": opt})
    for m, o in ((model, opt), (both["model"], both["opt"])):
        _step(m, o)
    _assert_same_params(model, both["model"], atol=0)


# step hooks
@pytest.mark.parametrize("kind", sorted(ADAM_LIKE))
def test_global_and_closure_step_hooks_run_once_per_step(kind):
    for other in ADAM_LIKE.values():  # both classes' step wrapped by torch.optim
        other([nn.Parameter(torch.ones(1))])
    model = _model()
    opt = ADAM_LIKE[kind](model.parameters())
    calls = []

    def closure():
        opt.zero_grad()
        loss = _loss(model)
        loss.backward()
        return loss

    handles = [
        register_optimizer_step_pre_hook(lambda o, a, k: calls.append("global_pre")),
        register_optimizer_step_post_hook(lambda o, a, k: calls.append("global_post")),
        opt.register_step_pre_hook(lambda o, a, k: calls.append("pre")),
        opt.register_step_post_hook(lambda o, a, k: calls.append("post")),
    ]
    try:
        opt.step(closure)
        opt.step()
    finally:
        for handle in handles:
            handle.remove()
    assert calls == ["global_pre", "pre", "post", "global_post"] * 2


# load_state_dict
@pytest.mark.parametrize("kind", sorted(ADAM_LIKE))
def test_a_bad_state_dict_from_a_pre_hook_raises_and_changes_nothing(kind):
    model = _model()
    opt = ADAM_LIKE[kind](model.parameters())
    _step(model, opt)
    sd = _saved(opt.state_dict())
    before = _snapshot(opt)
    calls = []

    def drop_a_tensor(o, state_dict):
        state = {i: dict(list(s.items())[1:]) for i, s in state_dict["state"].items()}
        return {**state_dict, "state": state}

    opt.register_load_state_dict_pre_hook(drop_a_tensor)
    opt.register_load_state_dict_post_hook(lambda o: calls.append("post"))
    with pytest.raises(ValueError, match="does not fit"):
        opt.load_state_dict(sd)
    _assert_snapshot_equal(before, _snapshot(opt))
    assert calls == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_functional_reload_keeps_float32_counters_and_casts_moments_like_torch(dtype):
    """A float32 checkpoint loaded for low-precision parameters: moments in the
    parameters' dtype (as torch.optim casts them), the counter float32, and the post-hook
    sees it so."""
    src = nn.Parameter(torch.randn(4))
    src_opt = _functional([src])
    src.grad = torch.ones(4)
    src_opt.step()
    p = nn.Parameter(src.detach().to(dtype))
    opt = _functional([p])
    seen = []
    opt.register_load_state_dict_post_hook(lambda o: seen.append(o.state[p]["[0].step"].dtype))
    opt.load_state_dict(_saved(src_opt.state_dict()))
    assert seen == [torch.float32]
    assert {k: v.dtype for k, v in opt.state[p].items()} == {
        "[0].step": torch.float32,
        "[0].exp_avg": dtype,
        "[0].exp_avg_sq": dtype,
        "[0].max_exp_avg_sq": dtype,
    }
    for _ in range(3):
        p.grad = torch.ones_like(p)
        opt.step()
    assert float(opt.state[p]["[0].step"]) == 4.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", sorted(ADAM_LIKE))
def test_reload_in_low_precision_keeps_float32_state_exact(kind, dtype):
    """torch.optim's loader casts every floating state but "step" to the parameter's
    dtype: a float32 counter of 1001 read 1000 in bfloat16, a loss statistic of 1e5
    became inf in float16 (and the next step NaN). The reloaded state is the saved one,
    and the optimizer continues as if never saved."""
    torch.manual_seed(0)
    a = nn.Parameter(torch.randn(4, dtype=dtype))
    b = nn.Parameter(a.detach().clone())
    opt_a, opt_b = ADAM_LIKE[kind]([a]), ADAM_LIKE[kind]([b])
    loss = torch.tensor(1e5)  # feeds the learned rule's loss statistics (float32)
    for p, o in ((a, opt_a), (b, opt_b)):
        p.grad = torch.ones_like(p)
        o.step(lambda: loss)
    for o in (opt_a, opt_b):  # counters past what bfloat16 holds exactly
        for k, v in o.state[o.param_groups[0]["params"][0]].items():
            if k.endswith("step"):
                v.fill_(1001.0)
    saved = _saved(opt_b.state_dict())
    opt_b.load_state_dict(saved)
    for k, v in opt_a.state[a].items():
        assert opt_b.state[b][k].dtype == v.dtype, k
        assert torch.equal(opt_b.state[b][k], v), k
    for i in range(3):
        for p, o in ((a, opt_a), (b, opt_b)):
            p.grad = torch.full_like(p, 0.5 - i)
            o.step(lambda: loss)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)


@pytest.mark.parametrize("kind", sorted(ADAM_LIKE))
def test_state_is_read_by_key_not_by_position(kind):
    """A state dict, or a framework, may hold a parameter's state keys in another order
    (torch.optim reads state by key): the next steps are those of the ordered state."""
    torch.manual_seed(0)
    a = nn.Parameter(torch.randn(3, dtype=F64))
    b = nn.Parameter(a.detach().clone())
    c = nn.Parameter(a.detach().clone())
    opts = [ADAM_LIKE[kind]([p]) for p in (a, b, c)]
    for p, o in zip((a, b, c), opts, strict=True):
        p.grad = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
        o.step()
    sd = opts[1].state_dict()
    sd["state"][0] = dict(reversed(list(sd["state"][0].items())))
    opts[1].load_state_dict(sd)
    opts[2].state[c] = dict(reversed(list(opts[2].state[c].items())))  # in place
    for i in range(3):
        for p, o in zip((a, b, c), opts, strict=True):
            p.grad = torch.tensor([0.3, 1.0, -1.0], dtype=F64) * (i + 1)
            o.step()
    assert torch.equal(a, b) and torch.equal(a, c)


def test_state_with_missing_or_extra_keys_raises_clearly():
    p = nn.Parameter(torch.ones(3))
    opt = _functional([p])
    p.grad = torch.ones(3)
    opt.step()
    opt.state[p] = {**opt.state[p], "extra": torch.zeros(())}
    with pytest.raises(RuntimeError, match="the rule expects"):
        opt.step()


# weight decay and momentum changed between steps
@pytest.mark.parametrize(
    ("factory", "reference", "hyper"),
    [
        (metaopt.rules.adamw, torch.optim.AdamW, {}),
        (metaopt.rules.rmsprop, torch.optim.RMSprop, {"momentum": 0.5, "centered": True}),
        (metaopt.rules.sgd, torch.optim.SGD, {"momentum": 0.9}),
        (metaopt.rules.adam, torch.optim.Adam, {"amsgrad": True}),
    ],
    ids=["adamw", "rmsprop", "sgd", "adam-amsgrad"],
)
def test_weight_decay_may_change_to_and_from_zero_for_every_alias(factory, reference, hyper):
    ours_p = nn.Parameter(torch.ones(3, dtype=F64))
    ref_p = nn.Parameter(torch.ones(3, dtype=F64))
    ours = FunctionalOptimizer([ours_p], factory, lr=1e-2, weight_decay=0.0, **hyper)
    ref = reference([ref_p], lr=1e-2, weight_decay=0.0, **hyper)
    for i, wd in enumerate([0.0, 0.1, 0.1, 0.0, 0.2]):
        for p, o in ((ours_p, ours), (ref_p, ref)):
            o.param_groups[0]["weight_decay"] = wd
            p.grad = torch.tensor([1.0, -2.0, 3.0], dtype=F64) * (i + 1)
            o.step()
    torch.testing.assert_close(ours_p, ref_p, rtol=0, atol=1e-12)


def test_sgd_momentum_may_change_to_and_from_zero_like_torch():
    """torch.optim.SGD keeps the momentum buffer while momentum is 0 and continues it."""
    ours_p = nn.Parameter(torch.ones(3, dtype=F64))
    ref_p = nn.Parameter(torch.ones(3, dtype=F64))
    ours = FunctionalOptimizer([ours_p], metaopt.rules.sgd, lr=1e-2)
    ref = torch.optim.SGD([ref_p], lr=1e-2)
    for i, momentum in enumerate([0.0, 0.9, 0.9, 0.0, 0.0, 0.5]):
        for p, o in ((ours_p, ours), (ref_p, ref)):
            o.param_groups[0]["momentum"] = momentum
            p.grad = torch.tensor([1.0, -2.0, 3.0], dtype=F64) * (i + 1)
            o.step()
    torch.testing.assert_close(ours_p, ref_p, rtol=0, atol=1e-12)


# complex parameters
COMPLEX_PAIRS = {
    "adam-amsgrad-wd": (
        lambda ps: _functional(ps, amsgrad=True, weight_decay=0.1),
        lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True, weight_decay=0.1),
    ),
    "adamw": (
        lambda ps: FunctionalOptimizer(ps, metaopt.rules.adamw, lr=1e-2),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2),
    ),
    "rmsprop": (
        lambda ps: FunctionalOptimizer(
            ps, metaopt.rules.rmsprop, lr=1e-2, centered=True, momentum=0.5
        ),
        lambda ps: torch.optim.RMSprop(ps, lr=1e-2, centered=True, momentum=0.5),
    ),
}


@pytest.mark.parametrize("pair", sorted(COMPLEX_PAIRS))
def test_complex_parameters_match_torch_with_a_real_one_in_the_group(pair):
    make_ours, make_ref = COMPLEX_PAIRS[pair]
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, dtype=torch.complex128, generator=gen)
    r = torch.randn(3, dtype=F64, generator=gen)
    ours_ps = [nn.Parameter(z.clone()), nn.Parameter(r.clone())]
    ref_ps = [nn.Parameter(z.clone()), nn.Parameter(r.clone())]
    ours, ref = make_ours(ours_ps), make_ref(ref_ps)
    for _ in range(4):
        for ps, o in ((ours_ps, ours), (ref_ps, ref)):
            o.zero_grad()
            ((ps[0].abs() ** 2).sum() * ps[1].sum() + (ps[0] * ps[0]).real.sum()).backward()
            o.step()
    for a, b in zip(ours_ps, ref_ps, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # the state stays complex where the parameter is, as torch.optim's
    assert all(v.is_complex() for k, v in ours.state[ours_ps[0]].items() if v.ndim)


def test_complex_state_round_trips_through_a_state_dict():
    z = torch.randn(4, dtype=torch.complex64, generator=torch.Generator().manual_seed(1))
    p, q = nn.Parameter(z.clone()), nn.Parameter(z.clone())
    opt, twin = _functional([p]), _functional([q])
    for x, o in ((p, opt), (q, twin)):
        o.zero_grad()
        (x.abs() ** 2).sum().backward()
        o.step()
    twin.load_state_dict(_saved(opt.state_dict()))
    assert {k: v.dtype for k, v in twin.state[q].items()} == {
        k: v.dtype for k, v in opt.state[p].items()
    }
    for x, o in ((p, opt), (q, twin)):
        for _ in range(2):
            o.zero_grad()
            (x.abs() ** 2).sum().backward()
            o.step()
    assert torch.equal(p, q)


def test_compiled_functional_adam_on_complex_parameters_matches_torch():
    z = torch.randn(4, dtype=torch.complex64, generator=torch.Generator().manual_seed(2))
    ours_p, ref_p = nn.Parameter(z.clone()), nn.Parameter(z.clone())
    ours = _functional([ours_p], compile=True)
    ref = torch.optim.Adam([ref_p], lr=1e-2)
    for _ in range(3):
        for p, o in ((ours_p, ours), (ref_p, ref)):
            o.zero_grad()
            (p.abs() ** 2).sum().backward()
            o.step()
    torch.testing.assert_close(ours_p, ref_p, rtol=0, atol=1e-6)


# meta parameters
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compile"])
@pytest.mark.parametrize("kind", sorted(ADAM_LIKE))
def test_meta_parameters_through_steps_task_boundaries_and_state_dicts(kind, compile):
    p = nn.Parameter(torch.empty(4, 3, device="meta"))
    opt = ADAM_LIKE[kind]([p], compile=compile)
    for _ in range(2):
        p.grad = torch.empty(4, 3, device="meta")
        opt.step()
        if kind == "learned":
            opt.new_task()
    opt.load_state_dict(opt.state_dict())
    p.grad = torch.empty(4, 3, device="meta")
    opt.step()
    assert p.device.type == "meta"
    assert opt.state[p] and all(v.device.type == "meta" for v in opt.state[p].values())


def test_finite_check_still_checks_real_gradients_next_to_meta_ones():
    p = nn.Parameter(torch.empty(3, device="meta"))
    q = nn.Parameter(torch.ones(3))
    opt = _functional([p, q])
    p.grad = torch.empty(3, device="meta")
    q.grad = torch.tensor([1.0, float("nan"), 0.0])
    with pytest.raises(FloatingPointError, match="'1'"):
        opt.step()
    assert not opt.state.get(q) and torch.equal(q, torch.ones(3))


# compile=True: float hyper-parameters are graph inputs
def test_compiled_functional_hyper_parameter_schedules_do_not_recompile():
    def edit(optimizer):  # any float hyper-parameter, not only the scheduled ones
        optimizer.param_groups[0]["eps"] = 1e-6
        optimizer.param_groups[0]["weight_decay"] = 2e-3

    graphs = _one_cycle_against_adam(
        lambda params: _functional(params, compile=True, weight_decay=1e-3), steps=6,
        edit_at=(3, edit), weight_decay=1e-3,
    )
    assert graphs[-1] == graphs[0], f"recompiled: unique graphs after each step {graphs}"


def test_compiled_functional_gives_numbers_to_a_factory_that_refuses_tensors():
    def strict_sgd(lr: float = 0.1, momentum: float = 0.5):
        if not isinstance(momentum, float):
            raise TypeError("momentum must be a float")
        return metaopt.rules.sgd(lr, momentum)

    ours_p, ref_p = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    ours = FunctionalOptimizer([ours_p], strict_sgd, compile=True)
    ref = torch.optim.SGD([ref_p], lr=0.1, momentum=0.5)
    for i in range(3):
        for p, o in ((ours_p, ours), (ref_p, ref)):
            p.grad = torch.tensor([1.0, -2.0, 3.0]) * (i + 1)
            o.step()
    torch.testing.assert_close(ours_p, ref_p, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_compiled_learned_with_cycling_betas_matches_adam_without_recompiling():
    graphs = _one_cycle_against_adam(lambda params: _learned(params, compile=True), steps=5)
    assert graphs[-1] == graphs[0], f"recompiled: unique graphs after each step {graphs}"


def test_compiled_functional_builds_its_rule_once_while_nothing_changes():
    calls = []

    def counted_adam(**hyper):
        calls.append(sorted(type(v).__name__ for v in hyper.values()))
        return metaopt.rules.adam(**hyper)

    ours_p, ref_p = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    ours = FunctionalOptimizer([ours_p], counted_adam, compile=True, lr=1e-2)
    ref = torch.optim.Adam([ref_p], lr=1e-2)
    built = len(calls)  # the defaults and the group's rule
    for i in range(4):
        if i == 2:
            for o in (ours, ref):
                o.param_groups[0]["lr"] = 5e-3
        for p, o in ((ours_p, ours), (ref_p, ref)):
            p.grad = torch.tensor([1.0, -2.0, 3.0]) * (i + 1)
            o.step()
    # steps 0 and 2: the rule with numbers and the one with tensors; 1 and 3: cached
    assert len(calls) == built + 3, calls
    assert "Tensor" in calls[-1]
    torch.testing.assert_close(ours_p, ref_p, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_compiled_learned_fallback_step_records_the_closure_loss():
    """Non-contiguous parameters take the compiled functional update instead of the fused
    step; the loss of step(closure) must reach the rule there too (task token)."""

    def make():
        torch.manual_seed(0)
        return [nn.Parameter(torch.randn(6, 4).t()), nn.Parameter(torch.randn(6))]

    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    results = []
    for compile in (False, True):
        ps = make()
        opt = LearnedOptimizer(ps, lr=1e-2, compile=compile)  # the shipped net reads the loss
        for i in range(3):

            def closure(ps=ps, opt=opt, i=i):
                opt.zero_grad()
                loss = ((x @ ps[0] + ps[1]) ** 2).mean() * 10**i
                loss.backward()
                return loss

            opt.step(closure)
        results.append((ps, opt.state[ps[0]][".loss_stats"]))
    (eager, eager_stats), (compiled, compiled_stats) = results
    assert bool(eager_stats.abs().sum() > 0)
    torch.testing.assert_close(compiled_stats, eager_stats)
    for p, q in zip(compiled, eager, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("b2", [0.999, 0.99999])
@pytest.mark.parametrize("kind", sorted(ADAM_LIKE))
def test_bias_corrections_are_as_exact_as_torch(kind, b2):
    """Adam's first steps are ``lr`` exactly, up to float32 rounding, as torch.optim
    computes them (bias corrections in Python floats). In float32 they were off by 6.4e-6
    (beta2 0.999) and 6.8e-4 (beta2 0.99999)."""
    p = nn.Parameter(torch.zeros(4))
    opt = ADAM_LIKE[kind]([p], lr=1.0, betas=(0.9, b2))
    for _ in range(3):
        before = p.detach().clone()
        p.grad = torch.ones(4)
        opt.step()
        torch.testing.assert_close(before - p.detach(), torch.ones(4), rtol=0, atol=3e-7)


def test_building_the_learned_optimizer_leaves_the_global_rng_alone():
    """Swapping torch.optim.Adam for the shipped rule must not change later random draws
    (data order, dropout, heads made afterwards): its net's random initialisation, at
    once overwritten by the checkpoint, comes from a forked generator."""
    p = nn.Parameter(torch.ones(3))
    for build in (
        lambda: LearnedOptimizer([p]),
        lambda: LearnedOptimizer.from_pretrained("default", [p]),
    ):
        torch.manual_seed(0)
        build()
        after = torch.rand(4)
        torch.manual_seed(0)
        assert torch.equal(after, torch.rand(4))


def _learned_rule_factory(lr=1e-2):
    return metaopt.learned.learned_rule(metaopt.learned.load_pretrained("default"), lr)


LEARNED_SHELLS = {
    "LearnedOptimizer": lambda params: LearnedOptimizer(params, lr=1e-2),
    # the functional shell around the same rule (it ran the net under autocast)
    "FunctionalOptimizer": lambda params: FunctionalOptimizer(params, _learned_rule_factory),
}


@pytest.mark.parametrize("shell", sorted(LEARNED_SHELLS))
def test_learned_step_inside_autocast_equals_the_step_outside(shell):
    """A loop that calls opt.step() inside ``torch.autocast`` must not run the rule's net
    in bfloat16 (the shipped rule's step differed by 1e-4 on updates of 8e-2); a
    closure still runs under the caller's autocast."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    results = []
    for inside in (False, True):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        opt = LEARNED_SHELLS[shell](model.named_parameters())
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()  # outside autocast
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=inside):
                opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
    seen = []

    def closure():
        opt.zero_grad()
        out = model(x)
        seen.append(out.dtype)
        loss = nn.functional.cross_entropy(out.float(), y)
        loss.backward()
        return loss

    with torch.autocast("cpu", dtype=torch.bfloat16):
        opt.step(closure)
    assert seen == [torch.bfloat16]


@pytest.mark.parametrize("kind", sorted(ADAM_LIKE))
def test_a_parameter_removed_from_the_groups_is_freed_like_with_torch(kind):
    """Frameworks replace a group's parameter list between tasks; the optimizer's caches
    must not keep the removed tensors (and their gradients) alive."""
    import gc
    import weakref

    keep, old = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    opt = ADAM_LIKE[kind]([keep, old])
    keep.grad, old.grad = torch.ones(3), torch.ones(3)
    opt.step()
    opt.state.pop(old)
    opt.param_groups[0]["params"] = [keep]
    gone = weakref.ref(old)
    del old
    keep.grad = torch.ones(3)
    opt.step()
    gc.collect()
    assert gone() is None
