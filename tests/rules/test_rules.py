"""Pure functional rules: purity, differentiability, composition, schedules, pytrees."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import metaopt
from metaopt import rules
from metaopt.rules import schedules


def _quadratic_problem(seed: int = 0, n: int = 4):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=gen, dtype=torch.float64)
    hess = a @ a.T / n + torch.eye(n, dtype=torch.float64)
    target = torch.randn(n, generator=gen, dtype=torch.float64)

    def loss(p):
        d = p["w"] - target
        return 0.5 * d @ hess @ d + p["b"].pow(2).sum()

    return loss


def _unroll(rule, params, loss, steps):
    state = rule.init(params)
    for _ in range(steps):
        grads = dict(zip(params, torch.autograd.grad(loss(params), list(params.values()),
                                                     create_graph=True), strict=True))
        updates, state = rule.update(grads, state, params)
        params = metaopt.apply_updates(params, updates)
    return loss(params)


@pytest.mark.parametrize(
    "make",
    [
        lambda lr: rules.sgd(lr=lr, momentum=0.9, nesterov=True, weight_decay=0.01),
        lambda lr: rules.adam(lr=lr, eps_root=1e-12, weight_decay=0.01),
        lambda lr: rules.adamw(lr=lr, eps_root=1e-12),
        lambda lr: rules.rmsprop(lr=lr, momentum=0.5, centered=True, eps_root=1e-12),
        lambda lr: rules.chain(rules.clip_by_global_norm(1.0), rules.sgd(lr=lr, momentum=0.5)),
    ],
    ids=["sgd", "adam", "adamw", "rmsprop", "clip+sgd"],
)
def test_gradcheck_through_k_steps_wrt_lr_and_initial_params(make):
    loss = _quadratic_problem()
    w0 = torch.randn(4, dtype=torch.float64, requires_grad=True)
    b0 = torch.randn(2, dtype=torch.float64, requires_grad=True)
    lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)

    def final_loss(lr, w, b):
        return _unroll(make(lr), {"w": w, "b": b}, loss, steps=5)

    assert torch.autograd.gradcheck(final_loss, (lr, w0, b0), eps=1e-6, atol=1e-5)


def test_eps_root_keeps_second_derivatives_finite_at_zero_gradient():
    p = {"w": torch.zeros(3, dtype=torch.float64, requires_grad=True)}
    for eps_root, finite in ((0.0, False), (1e-8, True)):
        rule = rules.adam(lr=0.1, eps_root=eps_root)
        g = {"w": p["w"] * 0.0}  # exactly zero gradient, still a function of w
        updates, _ = rule.update(g, rule.init(p), p)
        (dw,) = torch.autograd.grad(updates["w"].sum(), p["w"])
        assert bool(torch.isfinite(dw).all()) is finite


def test_rules_never_mutate_their_inputs():
    params = {"w": torch.randn(5), "b": torch.randn(2)}
    grads = {"w": torch.randn(5), "b": torch.randn(2)}
    rule = rules.chain(rules.clip_by_global_norm(0.1), rules.adamw(lr=0.1), rules.trace(0.9))
    state = rule.init(params)
    copies = [{k: v.clone() for k, v in t.items()} for t in (params, grads)]
    state_copy = torch.utils._pytree.tree_map(torch.clone, state)
    for _ in range(3):
        _, new_state = rule.update(grads, state, params)
    for original, copy in zip((params, grads), copies, strict=True):
        assert all(torch.equal(original[k], copy[k]) for k in original)
    flat_a = torch.utils._pytree.tree_leaves(state)
    flat_b = torch.utils._pytree.tree_leaves(state_copy)
    assert all(torch.equal(a, b) for a, b in zip(flat_a, flat_b, strict=True))
    assert new_state is not state


def test_clip_by_global_norm_matches_torch():
    grads = {"a": torch.randn(3, 4) * 10, "b": torch.randn(7)}
    rule = rules.clip_by_global_norm(1.5)
    clipped, _ = rule.update(grads, rule.init(grads))
    tensors = [g.clone() for g in grads.values()]
    for t in tensors:
        t.grad = t.clone()
    torch.nn.utils.clip_grad_norm_(tensors, 1.5)
    for ours, t in zip(clipped.values(), tensors, strict=True):
        torch.testing.assert_close(ours, t.grad)
    assert math.isclose(float(metaopt.tree.global_norm(clipped)), 1.5, rel_tol=1e-5)


@given(st.integers(0, 200), st.floats(1e-4, 1.0), st.integers(1, 100))
@settings(max_examples=25)
def test_schedules_match_torch_formulas(count, init, steps):
    c = torch.tensor(float(count))
    cos = schedules.cosine_decay(init, steps)(c)
    frac = min(count / steps, 1.0)
    assert math.isclose(float(cos), init * 0.5 * (1 + math.cos(math.pi * frac)), rel_tol=1e-5,
                        abs_tol=1e-9)
    step = schedules.step_decay(init, steps, gamma=0.5)(c)
    assert math.isclose(float(step), init * 0.5 ** (count // steps), rel_tol=1e-5, abs_tol=1e-30)
    warm = schedules.linear_warmup(init, steps)(c)
    assert math.isclose(float(warm), init * frac, rel_tol=1e-5, abs_tol=1e-9)
    assert float(schedules.constant(init)(c)) == pytest.approx(init)


def test_callable_learning_rate_is_evaluated_at_the_step_count():
    rule = rules.sgd(lr=lambda count: 0.1 * (count + 1))
    params = {"w": torch.zeros(2)}
    state = rule.init(params)
    got = []
    for _ in range(3):
        updates, state = rule.update({"w": torch.ones(2)}, state, params)
        got.append(float(updates["w"][0]))
    assert got == pytest.approx([-0.1, -0.2, -0.3])


def test_tensor_hyper_parameters_receive_gradients():
    lr = torch.tensor(0.1, requires_grad=True)
    b1 = torch.tensor(0.8, requires_grad=True)
    rule = rules.adam(lr=lr, betas=(b1, 0.99))
    params = {"w": torch.ones(3)}
    state = rule.init(params)
    # gradients that change between steps: with a constant gradient Adam's bias-corrected
    # direction does not depend on b1 at all
    for i in range(2):
        g = torch.tensor([1.0, -2.0, 3.0]) * (1 + 2 * i)
        updates, state = rule.update({"w": g}, state, params)
        params = metaopt.apply_updates(params, updates)
    g_lr, g_b1 = torch.autograd.grad(params["w"].pow(2).sum(), (lr, b1))
    assert float(g_lr) != 0.0 and float(g_b1) != 0.0


def test_tensor_learning_rate_changed_in_place_takes_effect():
    lr = torch.tensor(0.1)
    rule = rules.sgd(lr=lr)
    params = {"w": torch.zeros(2)}
    state = rule.init(params)
    first, state = rule.update({"w": torch.ones(2)}, state, params)
    lr.fill_(0.5)
    second, _ = rule.update({"w": torch.ones(2)}, state, params)
    assert float(first["w"][0]) == pytest.approx(-0.1)
    assert float(second["w"][0]) == pytest.approx(-0.5)


def test_rules_work_on_arbitrary_pytrees():
    params = [torch.ones(2), {"inner": torch.ones(3)}]
    grads = [torch.ones(2), {"inner": -torch.ones(3)}]
    rule = rules.adam(lr=0.1)
    state = rule.init(params)
    assert sorted(state) == ["[0]", "[1]['inner']"]
    updates, state = rule.update(grads, state, params)
    new = metaopt.apply_updates(params, updates)
    assert isinstance(new, list) and torch.allclose(new[0], torch.full((2,), 0.9))
    assert torch.allclose(new[1]["inner"], torch.full((3,), 1.1))


def test_mismatched_state_and_updates_give_clear_errors():
    rule = rules.adam()
    state = rule.init({"a": torch.zeros(2)})
    with pytest.raises(ValueError, match="state does not match"):
        rule.update({"b": torch.zeros(2)}, state)
    with pytest.raises(ValueError, match="apply_updates"):
        metaopt.apply_updates({"a": torch.zeros(2)}, {"b": torch.zeros(2)})
    r = rules.add_decayed_weights(0.1)
    for params in (None, [torch.zeros(2)], {"x.a": torch.zeros(2)}):  # none, or keyed otherwise
        with pytest.raises(ValueError, match="needs the parameter of every gradient"):
            r.update({"a": torch.zeros(2)}, r.init({"a": torch.zeros(2)}), params)
    with pytest.raises(TypeError, match="not an UpdateRule"):
        rules.chain(rules.sgd(), "adam")
    with pytest.raises(ValueError, match="Nesterov"):
        rules.sgd(momentum=0.0, nesterov=True)
    for factory in (rules.adam, rules.adamw):  # was "too many values to unpack"
        for betas in ((0.9, 0.99, 0.9), (0.9,), 0.9):
            with pytest.raises(ValueError, match="betas must be two values"):
                factory(betas=betas)


def test_tree_helpers():
    a = {"x": torch.tensor([3.0, 0.0]), "y": torch.tensor([4.0])}
    assert float(metaopt.tree.global_norm(a)) == pytest.approx(5.0)
    assert float(metaopt.tree.tree_dot(a, a)) == pytest.approx(25.0)
    zeros = metaopt.tree.zeros_like(a)
    assert all(torch.equal(zeros[k], torch.zeros_like(v)) for k, v in a.items())
    keyed = metaopt.tree.map_with_keys(lambda k, v: v * (2 if k == "x" else 3), a)
    assert torch.equal(keyed["y"], torch.tensor([12.0]))


_DECAYED = {
    "sgd": lambda wd: rules.sgd(lr=0.1, momentum=0.9, weight_decay=wd),
    "sgd-no-momentum": lambda wd: rules.sgd(lr=0.1, weight_decay=wd),
    "adam": lambda wd: rules.adam(lr=0.1, weight_decay=wd),
    "adam-amsgrad": lambda wd: rules.adam(lr=0.1, weight_decay=wd, amsgrad=True),
    "adamw": lambda wd: rules.adamw(lr=0.1, weight_decay=wd),
    "rmsprop": lambda wd: rules.rmsprop(lr=0.1, weight_decay=wd, momentum=0.5, centered=True),
}


@pytest.mark.parametrize("name", sorted(_DECAYED))
def test_state_layout_does_not_depend_on_weight_decay(name):
    """A weight decay of 0 and a non-zero one give the same state tree (same pytree spec,
    same tensors), so the state of one continues under the other (FunctionalOptimizer with
    a group["weight_decay"] that changes between steps)."""
    from torch.utils import _pytree as pytree

    params = {"w": torch.randn(3, dtype=torch.float64), "b": torch.randn(2, dtype=torch.float64)}
    layouts = []
    for wd in (0.0, 0, 0.1, torch.tensor(0.1)):
        state = _DECAYED[name](wd).init(params)
        leaves, spec = pytree.tree_flatten_with_path(state)
        layouts.append((spec, [(pytree.keystr(k), tuple(v.shape)) for k, v in leaves]))
    assert all(layout == layouts[0] for layout in layouts)


@pytest.mark.parametrize("name", ["adam", "adamw", "rmsprop", "sgd"])
def test_weight_decay_changed_between_updates_continues_the_state(name):
    """The state of a weight_decay=0 rule fed to a weight_decay=0.1 rule and back equals
    one rule whose decay is a tensor changed in place (the same arithmetic)."""
    params = {"w": torch.randn(4, dtype=torch.float64)}
    wd = torch.tensor(0.0, dtype=torch.float64)
    reference = _DECAYED[name](wd)
    ref_params, ref_state = params, reference.init(params)
    ours_params, ours_state = params, _DECAYED[name](0.0).init(params)
    for i, value in enumerate([0.0, 0.1, 0.1, 0.0, 0.2]):
        grads = {"w": torch.full((4,), float(i + 1), dtype=torch.float64)}
        wd.fill_(value)
        updates, ref_state = reference.update(grads, ref_state, ref_params)
        ref_params = metaopt.apply_updates(ref_params, updates)
        updates, ours_state = _DECAYED[name](value).update(grads, ours_state, ours_params)
        ours_params = metaopt.apply_updates(ours_params, updates)
    torch.testing.assert_close(ours_params["w"], ref_params["w"], rtol=0, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_adam_with_float64_tensor_hyper_parameters_equals_adam_with_numbers(dtype):
    """FunctionalOptimizer(compile=True) passes float hyper-parameters as float64 0-d tensors
    (graph inputs); the update must round as with the numbers (the bias correction too).
    (Not bfloat16: eager bfloat16 ops cast a 0-d tensor operand to bfloat16, and a
    compiled bfloat16 update rounds once at the end anyway.)"""
    params = {"w": torch.randn(5, generator=torch.Generator().manual_seed(0)).to(dtype)}
    as_numbers = rules.adam(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)

    def f64(x):
        return torch.tensor(x, dtype=torch.float64)

    as_tensors = rules.adam(
        lr=f64(1e-2), betas=(f64(0.9), f64(0.999)), eps=f64(1e-8), weight_decay=f64(0.1)
    )
    s_num, s_ten = as_numbers.init(params), as_tensors.init(params)
    for i in range(3):
        grads = {"w": torch.linspace(-1, 1, 5).to(dtype) * (i + 1)}
        u_num, s_num = as_numbers.update(grads, s_num, params)
        u_ten, s_ten = as_tensors.update(grads, s_ten, params)
        assert u_ten["w"].dtype == dtype
        torch.testing.assert_close(u_ten["w"], u_num["w"], rtol=0, atol=0)


@pytest.mark.parametrize(
    "steps", [torch.tensor(3.0), torch.tensor([1.0, 2.0, 40.0])], ids=["0-d", "per-tensor"]
)
def test_bias_corrections_equal_the_direct_formula_in_the_steps_dtype(steps):
    b2 = torch.tensor(0.999, dtype=torch.float64, requires_grad=True)
    bc1, bc2 = rules.base.bias_corrections(0.9, b2, steps)
    assert bc1.shape == bc2.shape == steps.shape
    assert bc1.dtype == bc2.dtype == steps.dtype
    # in float64, rounded once to the steps' dtype (as torch.optim's Python floats)
    wide = steps.double()
    torch.testing.assert_close(bc1, (1 - 0.9**wide).to(steps.dtype), rtol=0, atol=0)
    torch.testing.assert_close(bc2, (1 - b2.detach() ** wide).to(steps.dtype), rtol=0, atol=0)
    (g,) = torch.autograd.grad(bc2.sum(), b2)  # a tensor beta stays differentiable
    assert float(g) < 0.0
