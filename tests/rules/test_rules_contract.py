"""Adversarial contract tests of the pure rules and the tree helpers: torch.optim
semantics on numbers (complex parameters, missing gradients), trees whose keys come in
another order, empty trees."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import metaopt
from metaopt import rules
from metaopt.tree import global_norm, named_leaves, tree_dot, zeros_like


def _torch_run(
    make: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
    params: dict[str, torch.Tensor],
    grads: list[dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """``params`` after one ``torch.optim`` step per entry of ``grads``."""
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = make(list(leaves.values()))
    for g in grads:
        for k, p in leaves.items():
            p.grad = g[k].clone()
        opt.step()
    return {k: v.detach() for k, v in leaves.items()}


def _rule_run(
    rule: rules.UpdateRule,
    params: dict[str, torch.Tensor],
    grads: list[dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """``params`` after one ``rule.update`` per entry of ``grads``."""
    state = rule.init(params)
    for g in grads:
        updates, state = rule.update(g, state, params)
        params = metaopt.apply_updates(params, updates)
    return params


def _complex_problem(steps: int = 4) -> tuple[dict, list[dict]]:
    gen = torch.Generator().manual_seed(0)

    def c(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.complex128)

    params = {"w": c(3, 2), "b": c(2)}
    grads = [{k: c(*v.shape) for k, v in params.items()} for _ in range(steps)]
    return params, grads


_COMPLEX_CASES = {
    "adam": (
        lambda: rules.adam(lr=0.1),
        lambda ps: torch.optim.Adam(ps, lr=0.1, foreach=False),
    ),
    "adam-amsgrad-wd": (
        lambda: rules.adam(lr=0.1, amsgrad=True, weight_decay=0.1),
        lambda ps: torch.optim.Adam(ps, lr=0.1, amsgrad=True, weight_decay=0.1, foreach=False),
    ),
    "adamw": (
        lambda: rules.adamw(lr=0.1),
        lambda ps: torch.optim.AdamW(ps, lr=0.1, foreach=False),
    ),
    "rmsprop-centered-momentum": (
        lambda: rules.rmsprop(lr=0.05, centered=True, momentum=0.5),
        lambda ps: torch.optim.RMSprop(ps, lr=0.05, centered=True, momentum=0.5, foreach=False),
    ),
    "sgd-nesterov": (
        lambda: rules.sgd(lr=0.1, momentum=0.9, nesterov=True),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, foreach=False),
    ),
}


@pytest.mark.parametrize("name", list(_COMPLEX_CASES))
def test_complex_parameters_step_like_torch_optim(name: str) -> None:
    """torch.optim treats a complex parameter as its real and imaginary parts
    (``view_as_real``); the pure rules must too (``g * g`` is not a second moment of a
    complex gradient)."""
    make_rule, make_torch = _COMPLEX_CASES[name]
    params, grads = _complex_problem()
    ours = _rule_run(make_rule(), params, grads)
    ref = _torch_run(make_torch, params, grads)
    for k in params:
        assert ours[k].dtype == torch.complex128
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-10, atol=1e-12)


def test_complex_adam_state_stays_complex_and_differentiable() -> None:
    params, grads = _complex_problem(steps=1)
    lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    rule = rules.adam(lr=lr, eps_root=1e-12)
    updates, state = rule.update(grads[0], rule.init(params), params)
    adam_state = state["w"][0]
    assert adam_state.exp_avg.dtype == torch.complex128
    assert adam_state.exp_avg_sq.dtype == torch.complex128
    g = grads[0]["w"]  # as torch.optim: the moments of the real and imaginary parts
    expected = torch.complex(g.real.square(), g.imag.square()) * (1 - 0.999)
    torch.testing.assert_close(adam_state.exp_avg_sq, expected, rtol=1e-12, atol=0)
    (dlr,) = torch.autograd.grad(sum(u.abs().sum() for u in updates.values()), lr)
    assert torch.isfinite(dlr) and float(dlr) > 0


def test_clip_by_global_norm_of_an_empty_tree_is_empty() -> None:
    """An empty parameter tree (a frozen model) is a no-op for every rule, clipping too."""
    for rule in (
        rules.clip_by_global_norm(1.0),
        rules.chain(rules.clip_by_global_norm(1.0), rules.adam()),
    ):
        state = rule.init({})
        assert rule.update({}, state, {}) == ({}, {})
        assert rule.update([], rule.init([]), []) == ([], {})


def _reordered(tree: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: tree[k] for k in reversed(tree)}


def test_gradients_given_in_another_key_order_update_the_same_parameters() -> None:
    """A state is keyed by parameter name: gradients built in another dict order (e.g. a
    comprehension over ``reversed(...)``) are the same gradients. (Equal up to float32
    rounding: the global norm adds the tensors' norms in the gradients' order.)"""
    params = {"w": torch.randn(3, 2), "b": torch.randn(2), "c": torch.randn(4)}
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    rule = rules.chain(rules.clip_by_global_norm(0.5), rules.adamw(lr=0.1))
    state = rule.init(params)
    expected, expected_state = rule.update(grads, state, params)
    updates, new_state = rule.update(_reordered(grads), state, params)
    assert set(updates) == set(params) and set(new_state) == set(params)
    rounding = {"rtol": 1e-6, "atol": 1e-7}
    for k in params:
        torch.testing.assert_close(updates[k], expected[k], **rounding)
        torch.testing.assert_close(new_state[k], expected_state[k], **rounding)
    new = metaopt.apply_updates(params, _reordered(updates))
    assert list(new) == list(params)
    for k in params:
        torch.testing.assert_close(new[k], params[k] + updates[k], rtol=0, atol=0)


def test_mismatched_keys_still_raise_and_name_the_difference() -> None:
    rule = rules.adam()
    state = rule.init({"a": torch.zeros(2), "b": torch.zeros(2)})
    with pytest.raises(ValueError, match="state does not match"):
        rule.update({"a": torch.zeros(2)}, state)
    with pytest.raises(ValueError, match="apply_updates"):
        metaopt.apply_updates({"a": torch.zeros(2)}, {"a": torch.zeros(2), "b": torch.zeros(2)})


def test_tree_dot_pairs_leaves_by_key() -> None:
    a = {"x": torch.ones(2), "y": torch.zeros(2)}
    b = {"y": torch.zeros(2), "x": torch.ones(2)}
    assert float(tree_dot(a, b)) == 2.0
    with pytest.raises(ValueError, match="tree_dot"):
        tree_dot(a, {"x": torch.ones(2), "z": torch.zeros(2)})


def _assert_same_tree(a: object, b: object) -> None:
    """``a`` and ``b`` have the same structure and equal tensors."""
    leaves_a, spec_a = torch.utils._pytree.tree_flatten(a)
    leaves_b, spec_b = torch.utils._pytree.tree_flatten(b)
    assert spec_a == spec_b
    assert all(torch.equal(x, y) for x, y in zip(leaves_a, leaves_b, strict=True))


_NONE_RULES = {
    "sgd-momentum": lambda: rules.sgd(lr=0.1, momentum=0.9, weight_decay=0.1),
    "adam": lambda: rules.adam(lr=0.1),
    "adamw-amsgrad": lambda: rules.adamw(lr=0.1, amsgrad=True),
    "rmsprop": lambda: rules.rmsprop(lr=0.1, centered=True, momentum=0.5),
    "clip+adam": lambda: rules.chain(rules.clip_by_global_norm(0.1), rules.adam(lr=0.1)),
    "schedule": lambda: rules.sgd(lr=rules.schedules.cosine_decay(0.1, 10)),
    "empty chain": lambda: rules.chain(),
}


@pytest.mark.parametrize("name", list(_NONE_RULES))
def test_a_missing_gradient_skips_its_parameter_like_torch_optim(name: str) -> None:
    """``torch.autograd.grad(..., allow_unused=True)`` gives ``None`` for an unused
    parameter. As ``torch.optim`` skips a parameter whose ``.grad`` is ``None``, the rule
    gives it a ``None`` update, keeps its state and updates the others as if it were not
    there (its absence from the global norm included)."""
    rule = _NONE_RULES[name]()
    params = {"a": torch.randn(3), "b": torch.randn(2)}
    g = torch.randn(3)
    state = rule.init(params)
    _, state = rule.update({"a": torch.randn(3), "b": torch.randn(2)}, state, params)
    updates, new_state = rule.update({"a": g, "b": None}, state, params)
    assert updates["b"] is None
    _assert_same_tree(new_state["b"], state["b"])
    alone = rules.chain(rule)  # the same rule on "a" alone
    ref, ref_state = alone.update({"a": g}, {"a": (state["a"],)}, {"a": params["a"]})
    torch.testing.assert_close(updates["a"], ref["a"], rtol=0, atol=0)
    torch.testing.assert_close(new_state["a"], ref_state["a"][0], rtol=0, atol=0)
    new = metaopt.apply_updates(params, updates)
    assert torch.equal(new["b"], params["b"])
    assert not torch.equal(new["a"], params["a"]) or name == "empty chain"


def test_missing_gradients_in_nested_trees_and_tree_helpers() -> None:
    params = [torch.randn(2), {"inner": torch.randn(3)}]
    rule = rules.adam(lr=0.1)
    updates, state = rule.update([None, {"inner": torch.ones(3)}], rule.init(params), params)
    assert updates[0] is None and updates[1]["inner"].shape == (3,)
    assert float(state["[0]"][0].step) == 0.0 and float(state["[1]['inner']"][0].step) == 1.0
    new = metaopt.apply_updates(params, updates)
    assert torch.equal(new[0], params[0])
    tree = {"x": torch.tensor([3.0, 0.0]), "y": None, "z": torch.tensor([4.0])}
    assert [k for k, _ in named_leaves(tree)] == ["x", "y", "z"]
    assert float(global_norm(tree)) == pytest.approx(5.0)
    assert float(tree_dot(tree, tree)) == pytest.approx(25.0)
    zeros = zeros_like(tree)
    assert zeros["y"] is None and torch.equal(zeros["z"], torch.zeros(1))


def _one_element(value: float) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.float64)


_HYPER_RULES = {
    "sgd": lambda h: rules.sgd(h(0.1), momentum=h(0.9), dampening=h(0.1), weight_decay=h(0.01)),
    "adam": lambda h: rules.adam(h(0.1), (h(0.9), h(0.99)), h(1e-3), h(0.01), eps_root=h(1e-9)),
    "adamw": lambda h: rules.adamw(h(0.1), (h(0.9), h(0.99)), h(1e-3), h(0.01), amsgrad=True),
    "rmsprop": lambda h: rules.rmsprop(h(0.1), h(0.9), h(1e-3), h(0.01), h(0.5), True, h(1e-9)),
    "clip+scale": lambda h: rules.chain(rules.clip_by_global_norm(h(0.5)), rules.scale(h(-0.1))),
    "schedule": lambda h: rules.scale_by_learning_rate(lambda count: h(0.1)),
}


@pytest.mark.parametrize("name", list(_HYPER_RULES))
def test_one_element_tensor_hyper_parameters_keep_parameter_shapes(name: str) -> None:
    """``torch.optim`` accepts a one-element tensor ``lr`` of shape ``[1]``. Broadcast
    against a 0-d parameter it turned the update (and, through ``apply_updates``, the
    parameter) into shape ``[1]``; the rule must give what the numbers give."""
    make = _HYPER_RULES[name]
    params = {"t": torch.tensor(1.5, dtype=torch.float64), "v": torch.randn(3).double()}
    ours, ref = dict(params), dict(params)
    rule, ref_rule = make(_one_element), make(float)
    state, ref_state = rule.init(params), ref_rule.init(params)
    for step in range(3):
        grads = {k: torch.full_like(v, 0.3 * step - 0.2) for k, v in params.items()}
        updates, state = rule.update(grads, state, ours)
        ref_updates, ref_state = ref_rule.update(grads, ref_state, ref)
        assert updates["t"].shape == ()
        ours, ref = metaopt.apply_updates(ours, updates), metaopt.apply_updates(ref, ref_updates)
    for k in params:
        assert ours[k].shape == params[k].shape
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-12, atol=1e-15)


def test_one_element_tensor_hyper_parameters_are_read_at_every_update() -> None:
    lr = torch.tensor([0.1], requires_grad=True)
    rule = rules.sgd(lr=lr)
    params = {"t": torch.tensor(1.0)}
    updates, _ = rule.update({"t": torch.tensor(2.0)}, rule.init(params), params)
    (dlr,) = torch.autograd.grad(updates["t"], lr)
    assert dlr.shape == (1,) and float(dlr[0]) == -2.0
    with torch.no_grad():
        lr.fill_(0.5)
    updates, _ = rule.update({"t": torch.tensor(2.0)}, rule.init(params), params)
    assert float(updates["t"].detach()) == -1.0


def test_hyper_parameter_tensors_with_several_elements_are_rejected() -> None:
    with pytest.raises(ValueError, match="learning rate must be a number or a one-element"):
        rules.adam(lr=torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="momentum must be a number or a one-element"):
        rules.sgd(momentum=torch.zeros(2))
    rule = rules.sgd(lr=lambda count: torch.full((2,), 0.1))
    with pytest.raises(ValueError, match="schedule must return a number or a one-element"):
        rule.update({"t": torch.tensor(1.0)}, rule.init({"t": torch.tensor(1.0)}))


def test_functional_optimizer_with_a_one_element_lr_steps_a_0d_parameter() -> None:
    p = torch.nn.Parameter(torch.tensor(1.0))
    opt = metaopt.FunctionalOptimizer([p], rules.sgd, lr=torch.tensor([0.1]))
    p.grad = torch.tensor(1.0)
    opt.step()
    assert p.shape == () and float(p.detach()) == pytest.approx(0.9)


def test_states_saved_with_torch_save_load_with_weights_only(tmp_path) -> None:
    """A rule's state is tensors in NamedTuples: ``torch.load``'s default
    ``weights_only=True`` must read it back (it refused the NamedTuple classes)."""
    params = {"w": torch.randn(3, 2), "b": torch.randn(2)}
    rule = rules.chain(
        rules.adam(lr=0.1, amsgrad=True),
        rules.rmsprop(lr=0.1, momentum=0.5, centered=True),
        rules.sgd(lr=rules.schedules.cosine_decay(0.1, 10), momentum=0.9),
    )
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    _, state = rule.update(grads, rule.init(params), params)
    torch.save(state, tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)
    _assert_same_tree(loaded, state)
    ours, _ = rule.update(grads, loaded, params)
    ref, _ = rule.update(grads, state, params)
    for k in params:
        torch.testing.assert_close(ours[k], ref[k], rtol=0, atol=0)


def test_apply_updates_rejects_updates_that_would_reshape_a_parameter() -> None:
    """``p + u`` broadcasts: an update of another shape silently turned a 0-d parameter
    into ``[1]`` or a ``[3]`` one into ``[2, 3]``."""
    params = {"t": torch.tensor(1.0), "v": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"update of 't' has shape \(1,\)"):
        metaopt.apply_updates(params, {"t": torch.ones(1), "v": torch.ones(3)})
    with pytest.raises(ValueError, match=r"update of 'v' has shape \(2, 3\)"):
        metaopt.apply_updates(params, {"t": torch.tensor(1.0), "v": torch.ones(2, 3)})
    new = metaopt.apply_updates(params, {"t": torch.tensor(1.0), "v": None})
    assert float(new["t"]) == 2.0 and new["v"] is params["v"]
    with pytest.raises(ValueError, match="the parameter is None"):
        metaopt.apply_updates({"t": None}, {"t": torch.tensor(1.0)})


@pytest.mark.parametrize(
    "fill", [0.0, float("inf"), float("nan"), 1e30], ids=["zero", "inf", "nan", "huge"]
)
def test_clip_by_global_norm_on_degenerate_gradients_matches_clip_grad_norm(fill: float) -> None:
    """Zero, infinite, NaN and overflowing gradients are clipped exactly as
    ``torch.nn.utils.clip_grad_norm_`` clips them (no error, same values)."""
    grads = {"a": torch.tensor([fill, 1.0]), "b": torch.zeros(2), "c": torch.ones(3) * 0.5}
    if fill == 0.0:
        grads = {k: torch.zeros_like(v) for k, v in grads.items()}
    rule = rules.clip_by_global_norm(1.0)
    ours, _ = rule.update(grads, rule.init(grads))
    ref = [g.clone().requires_grad_(True) for g in grads.values()]
    for p, g in zip(ref, grads.values(), strict=True):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(ref, 1.0, foreach=False)
    for (k, g), p in zip(ours.items(), ref, strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-6, atol=0, equal_nan=True, msg=k)


def test_adam_first_step_is_the_sign_of_the_gradient_times_lr() -> None:
    """Bias correction at step 1: ``m_hat = g`` and ``v_hat = g^2``, so Adam's first update
    is ``-lr * g / (|g| + eps)`` whatever the betas (float64, bfloat16 and complex)."""
    for dtype in (torch.float64, torch.bfloat16):
        g = torch.tensor([3.0, -1e-3, 0.25], dtype=dtype)
        for betas in ((0.9, 0.999), (0.0, 0.5), (0.99, 0.9999)):
            rule = rules.adam(lr=0.1, betas=betas, eps=0.0)
            updates, _ = rule.update({"p": g}, rule.init({"p": g}), {"p": g})
            assert updates["p"].dtype == dtype
            torch.testing.assert_close(updates["p"], -0.1 * g.sign(), rtol=1e-2, atol=0)
    z = torch.tensor([3 - 4j, 1e-3 + 2j], dtype=torch.complex128)
    rule = rules.adam(lr=0.1, eps=0.0)
    updates, _ = rule.update({"p": z}, rule.init({"p": z}), {"p": z})
    expected = -0.1 * torch.complex(z.real.sign(), z.imag.sign())
    torch.testing.assert_close(updates["p"], expected, rtol=1e-12, atol=0)
