"""The learned rule as a pure UpdateRule: Adam identity, gates, invariances, gradients."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call

from metaopt.learned import LearnedRuleNet, LearnedState, learned_rule, new_task, observe_loss
from metaopt.rules import adam, apply_updates, chain, clip_by_global_norm
from tests.learned.helpers import copy_params, mlp_params, perturbed_net


def _grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in params.items()}


@torch.no_grad()
def _run(rule, params, n_steps, seed=0, boundary_at=None, boundary=None):
    state = rule.init(params)
    for t in range(n_steps):
        if boundary_at is not None and t == boundary_at:
            state = boundary(state, params)
        updates, state = rule.update(_grads(params, seed + t), state, params)
        params = apply_updates(params, updates)
    return params, state


def test_fresh_net_is_adam_over_50_steps_float64():
    params = mlp_params(torch.float64)
    ours, _ = _run(learned_rule(LearnedRuleNet(), lr=1e-2), copy_params(params), 50)
    ref, _ = _run(adam(lr=1e-2), copy_params(params), 50)
    for k in params:
        torch.testing.assert_close(ours[k], ref[k], rtol=0, atol=1e-12)
        assert not torch.equal(ours[k], params[k])


def test_composes_with_clip_by_global_norm():
    params = mlp_params(torch.float64)
    ours, state = _run(
        chain(clip_by_global_norm(1.0), learned_rule(LearnedRuleNet(), lr=1e-2)),
        copy_params(params),
        10,
    )
    ref, _ = _run(chain(clip_by_global_norm(1.0), adam(lr=1e-2)), copy_params(params), 10)
    for k in params:
        torch.testing.assert_close(ours[k], ref[k], rtol=0, atol=1e-12)
    later = new_task(state)  # finds the learned leaf inside the chain's tuples
    assert all(float(s[1].task_index) == 1.0 for s in later.values())
    assert all(float(s[1].task_index) == 0.0 for s in state.values())  # pure


def test_identity_holds_after_task_boundaries_at_init():
    params = mlp_params(torch.float64)
    rule = learned_rule(LearnedRuleNet(), lr=1e-2)
    ours, state = _run(rule, copy_params(params), 30, boundary_at=15, boundary=new_task)
    ref, _ = _run(adam(lr=1e-2), copy_params(params), 30)
    for k in params:
        torch.testing.assert_close(ours[k], ref[k], rtol=0, atol=1e-12)
    assert all(float(s.importance.abs().sum()) > 0 for s in state.values())


def test_gate_zero_leaves_parameters_bit_identical():
    net = perturbed_net()
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.zero_()
        net.head.bias[4] = 2.0  # gate = clamp(1 - 2, 0, 1) = 0
        net.head.bias[0] = 1.0  # other coefficients non-zero
        net.head.bias[2] = 0.5
    params = mlp_params(torch.float32)
    rule = learned_rule(net, lr=1e-1)
    state = rule.init(params)
    for t in range(3):
        updates, state = rule.update(_grads(params, t), state, params)
        new = apply_updates(params, updates)
        for k in params:
            assert torch.equal(new[k], params[k])
        params = new


def test_reordering_and_renaming_parameters_changes_no_update():
    net = perturbed_net(dtype=torch.float64)
    params = mlp_params(torch.float64)
    rule = learned_rule(net, lr=1e-2)
    state = rule.init(params)
    state = new_task(observe_loss(state, 1.5), params)  # non-zero importance and loss stats
    grads = _grads(params, 1)
    updates, _ = rule.update(grads, state, params)
    order = list(reversed(params))
    rename = {k: f"p{i}" for i, k in enumerate(order)}
    p2 = {rename[k]: params[k] for k in order}
    g2 = {rename[k]: grads[k] for k in order}
    s2 = {rename[k]: state[k] for k in order}
    updates2, _ = rule.update(g2, s2, p2)
    for k in params:
        torch.testing.assert_close(updates2[rename[k]], updates[k], rtol=1e-10, atol=1e-14)


def test_updates_invariant_to_gradient_scale():
    net = perturbed_net(dtype=torch.float64)
    params = mlp_params(torch.float64)
    # float64 auxiliary buffers: bfloat16 rounding is not scale-invariant
    rule = learned_rule(net, lr=1e-2, eps=0.0, aux_dtype=None)
    results = []
    for factor in (1.0, 1e-3, 1e4):
        state = rule.init(params)
        p = copy_params(params)
        for t in range(5):
            grads = {k: factor * g for k, g in _grads(params, t).items()}
            if t == 3:
                state = new_task(state, p)
            updates, state = rule.update(grads, state, p)
            p = apply_updates(p, updates)
        results.append(p)
    for other in results[1:]:
        for k in params:
            torch.testing.assert_close(other[k], results[0][k], rtol=1e-9, atol=1e-12)


def test_pending_boundary_equals_boundary_with_params():
    net = perturbed_net(dtype=torch.float64)
    params = mlp_params(torch.float64)
    rule = learned_rule(net, lr=1e-2)
    with_params, s1 = _run(rule, copy_params(params), 8, boundary_at=4, boundary=new_task)
    deferred, s2 = _run(
        rule, copy_params(params), 8, boundary_at=4, boundary=lambda s, p: new_task(s)
    )
    for k in params:
        torch.testing.assert_close(deferred[k], with_params[k], rtol=0, atol=0)
        torch.testing.assert_close(s2[k].importance, s1[k].importance, rtol=0, atol=0)
        assert s2[k].pending.numel() == 0


def test_new_task_snapshots_anchor_and_folds_importance():
    params = mlp_params(torch.float32)
    rule = learned_rule(perturbed_net(), lr=1e-2)
    moved, state = _run(rule, copy_params(params), 5)
    after = new_task(state, moved, importance="path")
    for k, leaf in after.items():
        assert isinstance(leaf, LearnedState)
        torch.testing.assert_close(leaf.anchor, moved[k].to(torch.bfloat16), rtol=0, atol=0)
        expected = (moved[k] - state[k].anchor).abs() * state[k].exp_avg_sq.sqrt()
        torch.testing.assert_close(leaf.importance.float(), expected, rtol=1e-2, atol=1e-6)
        assert float(leaf.task_step) == 0.0 and float(leaf.task_index) == 1.0
        assert float(state[k].task_step) == 5.0  # input untouched


@pytest.mark.parametrize("importance", ["path", "weight_grad", "fisher"])
def test_a_boundary_after_no_update_adds_no_importance(importance):
    """A second boundary right after the first (two hooks calling new_task), or a task
    in which a parameter got no update (frozen), adds nothing: Adam's second moment still
    holds the earlier task's gradients, and "fisher" / "weight_grad" counted them again."""
    params = mlp_params(torch.float32)
    rule = learned_rule(perturbed_net(), lr=1e-2, importance=importance)
    moved, state = _run(rule, copy_params(params), 5)
    once = new_task(state, moved, importance=importance)
    twice = new_task(once, moved, importance=importance)
    for k in params:
        assert float(once[k].importance.float().abs().sum()) > 0
        assert torch.equal(twice[k].importance, once[k].importance)
        assert float(twice[k].task_index) == 2.0
    # the same with boundaries marked without parameters (folded at the next update)
    deferred_once = rule.update.fold_pending(new_task(state), moved)
    deferred_twice = rule.update.fold_pending(new_task(new_task(state)), moved)
    for k in params:
        torch.testing.assert_close(deferred_once[k].importance, once[k].importance, rtol=0, atol=0)
        assert torch.equal(deferred_twice[k].importance, deferred_once[k].importance)


def test_observe_loss_tracks_averages_and_task_start():
    state = learned_rule(LearnedRuleNet()).init(mlp_params(torch.float32))
    for value in (4.0, 2.0, 1.0):
        state = observe_loss(state, torch.tensor(value))
    fast, slow, start, count = next(iter(state.values())).loss_stats.tolist()
    assert start == 4.0 and count == 3.0
    # rates max(1/n, 0.1) and max(1/n, 0.01): the first three losses are averaged exactly
    assert abs(fast - 7.0 / 3.0) < 1e-6 and abs(slow - 7.0 / 3.0) < 1e-6


def test_observe_loss_updates_each_leaf_by_its_own_count_and_device():
    """All leaves are updated in one batched computation per device; each still follows
    its own count (a parameter added later has seen fewer losses), and leaves on other
    devices (here ``meta``) and outside the learned rule's state are handled too."""
    params = mlp_params(torch.float32)
    state = learned_rule(LearnedRuleNet()).init(params)
    for value in (4.0, 2.0):
        state = observe_loss(state, value)
    late = learned_rule(LearnedRuleNet()).init({"late": torch.zeros(3)})["late"]
    on_meta = learned_rule(LearnedRuleNet()).init({"m": torch.zeros(3, device="meta")})["m"]
    mixed = {**state, "late": late, "m": on_meta, "other": {"not_learned": torch.ones(1)}}
    after = observe_loss(mixed, torch.tensor(1.0))
    old_key = next(iter(state))
    assert after[old_key].loss_stats.tolist() == pytest.approx([7 / 3, 7 / 3, 4.0, 3.0])
    assert after["late"].loss_stats.tolist() == [1.0, 1.0, 1.0, 1.0]
    assert after["m"].loss_stats.device.type == "meta" and after["m"].loss_stats.shape == (4,)
    assert torch.equal(after["other"]["not_learned"], torch.ones(1))


def test_topk_fraction_moves_only_selected_tokens():
    params = mlp_params(torch.float32)
    rule = learned_rule(perturbed_net(), lr=1e-2, topk_fraction=0.5)
    state = rule.init(params)
    updates, _ = rule.update(_grads(params, 0), state, params)
    moved = [k for k, u in updates.items() if bool(u.abs().sum() > 0)]
    assert len(moved) == math.ceil(0.5 * len(params))  # one token per tensor here


def test_topk_selection_does_not_depend_on_parameter_order():
    """Gates saturate at exactly 1, so several tokens tie at the k-th largest gate; all of
    them move, whatever the order of the parameters."""
    net = perturbed_net(dtype=torch.float64)
    params = mlp_params(torch.float64)
    rule = learned_rule(net, lr=1e-2, topk_fraction=0.5)
    state = rule.init(params)
    grads = _grads(params, 2)
    updates, _ = rule.update(grads, state, params)
    order = list(reversed(params))
    reordered, _ = rule.update(
        {k: grads[k] for k in order}, {k: state[k] for k in order}, {k: params[k] for k in order}
    )
    moved = {k for k, u in updates.items() if bool(u.abs().sum() > 0)}
    assert 0 < len(moved) < len(params)
    for k in params:
        torch.testing.assert_close(reordered[k], updates[k], rtol=1e-10, atol=1e-14)


def test_gradcheck_wrt_network_parameters_float64():
    net = perturbed_net(dtype=torch.float64)
    params = {"w": torch.randn(3, 2, dtype=torch.float64), "b": torch.randn(3, dtype=torch.float64)}
    rule_state = learned_rule(net).init(params)
    rule_state = new_task(rule_state, {k: v + 0.1 for k, v in params.items()})
    grads = _grads(params, 0)
    names = ["head.weight", "head.bias", "token_embed.bias"]
    fixed = {k: v.detach() for k, v in net.named_parameters() if k not in names}

    def updates_of(*tensors):
        meta = {**fixed, **dict(zip(names, tensors, strict=True))}
        rule = learned_rule(net, lr=0.1, meta_params=meta)
        updates, _ = rule.update(grads, rule_state, params)
        return tuple(updates.values())

    inputs = tuple(dict(net.named_parameters())[n].detach().clone().requires_grad_() for n in names)
    assert torch.autograd.gradcheck(updates_of, inputs, eps=1e-6, atol=1e-7)


def test_meta_params_flow_through_functional_call():
    net = perturbed_net()
    params = mlp_params(torch.float32)
    meta = {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters()}
    rule = learned_rule(net, lr=1e-2, meta_params=meta)
    state = rule.init(params)
    updates, _ = rule.update(_grads(params, 0), state, params)
    direct, _ = learned_rule(net, lr=1e-2).update(_grads(params, 0), state, params)
    for k in params:
        torch.testing.assert_close(updates[k], direct[k])
    sum(u.sum() for u in updates.values()).backward()
    assert meta["head.weight"].grad is not None and meta["head.weight"].grad.abs().sum() > 0
    assert all(p.grad is None for p in net.parameters())
    with torch.no_grad():  # same numbers as calling the net's forward through torch.func
        tokens = torch.randn(3, net.token_embed.in_features)
        task = torch.randn(net.task_embed.in_features)
        torch.testing.assert_close(functional_call(net, meta, (tokens, task)), net(tokens, task))


@pytest.mark.parametrize("factored", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_no_grad_fast_path_equals_differentiable_path(dtype, factored):
    net = perturbed_net()
    params = mlp_params(dtype)
    pure = learned_rule(net, lr=1e-2, max_block=16, factored=factored)  # several tokens
    fast = learned_rule(net, lr=1e-2, max_block=16, inplace_state=True, factored=factored)
    state = new_task(pure.init(params), {k: v + 0.05 for k, v in params.items()})
    grads = _grads(params, 3)
    with torch.enable_grad():
        expected, expected_state = pure.update(grads, state, params)
    with torch.no_grad():
        copied = {
            k: s._replace(exp_avg=s.exp_avg.clone(), exp_avg_sq=s.exp_avg_sq.clone())
            for k, s in state.items()
        }
        got, got_state = fast.update(grads, copied, params)
    for k in params:
        torch.testing.assert_close(got[k], expected[k].detach())
        torch.testing.assert_close(got_state[k].exp_avg, expected_state[k].exp_avg.detach())
        assert got_state[k].exp_avg is copied[k].exp_avg  # updated in place


@pytest.mark.parametrize("grad_enabled", [False, True])
def test_pull_back_never_overshoots_the_anchor(grad_enabled):
    net = LearnedRuleNet()
    with torch.no_grad():
        net.head.bias[4] = 2.0  # gate 0: only the pull-back moves parameters
        net.head.bias[6] = 1e8  # rho = 1e6: pull fraction min(1, rho * imp) = 1 if imp > 0
    params = mlp_params(torch.float32)
    rule = learned_rule(net, lr=1e-2, aux_dtype=None)
    anchor, state = _run(learned_rule(LearnedRuleNet(), lr=0.1, aux_dtype=None), params, 5)
    state = new_task(state, anchor)  # anchor snapshot, importance from the moves so far
    moved = {k: v + 0.01 * torch.randn_like(v) for k, v in anchor.items()}
    with torch.set_grad_enabled(grad_enabled):
        updates, _ = rule.update(_grads(moved, 9), state, moved)
    for k in params:
        before = (moved[k] - anchor[k]).abs()
        after = (moved[k] + updates[k].detach() - anchor[k]).abs()
        assert bool((after <= before + 1e-6).all())
        home = state[k].importance > 1e-6 * state[k].importance.max()
        assert bool(home.any()) and float(after[home].max()) < 1e-6


def test_importance_free_skips_only_terms_that_vanish():
    net = perturbed_net(dtype=torch.float64)
    params = mlp_params(torch.float64)
    general = learned_rule(net, lr=1e-2, max_block=16)
    fast = learned_rule(net, lr=1e-2, max_block=16, importance_free=True)
    state = general.init(params)
    grads = _grads(params, 4)
    for grad_enabled in (False, True):
        with torch.set_grad_enabled(grad_enabled):
            expected, _ = general.update(grads, state, params)
            got, _ = fast.update(grads, state, params)
        for k in params:
            assert torch.equal(got[k], expected[k])
    marked = new_task(state)  # a pending boundary folds importance: the flag is ignored
    moved = {k: v + 0.1 for k, v in params.items()}
    expected, _ = general.update(grads, marked, moved)
    got, _ = fast.update(grads, marked, moved)
    for k in params:
        assert torch.equal(got[k], expected[k])


def test_observe_loss_ignores_non_finite_losses():
    state = learned_rule(LearnedRuleNet()).init(mlp_params(torch.float32))
    state = observe_loss(state, 2.0)
    for bad in (float("nan"), float("inf")):
        after = observe_loss(state, bad)
        for k in state:
            assert torch.equal(after[k].loss_stats, state[k].loss_stats)


def test_token_owner_spreads_tensors_over_their_tokens():
    from metaopt.learned.rule import _token_owner_cpu

    assert _token_owner_cpu((2, 1, 3)).tolist() == [0, 0, 1, 2, 2, 2]
    assert _token_owner_cpu((1,)).tolist() == [0]


@pytest.mark.parametrize("importance", ["path", "weight_grad", "fisher"])
def test_fold_pending_is_the_fold_the_next_update_does(importance):
    from metaopt.learned.tasks import IMPORTANCE_KINDS

    assert importance in IMPORTANCE_KINDS
    rule = learned_rule(perturbed_net(dtype=torch.float64), lr=1e-2, importance=importance)
    params, state = _run(rule, mlp_params(torch.float64), 4)  # a task with some drift
    marked = new_task(state)
    grads = _grads(params, 7)
    expected, expected_state = rule.update(grads, marked, params)
    folded = rule.update.fold_pending(marked, params)
    assert all(not leaf.pending.numel() for leaf in folded.values())
    assert any(float(leaf.importance.abs().sum()) > 0 for leaf in folded.values())
    got, got_state = rule.update(grads, folded, params)
    for k in params:
        assert torch.equal(got[k], expected[k])
        for field in ("anchor", "importance", "exp_avg", "step", "task_index"):
            assert torch.equal(getattr(got_state[k], field), getattr(expected_state[k], field))
    untouched = rule.update.fold_pending(marked, {})  # no parameters: nothing folded
    assert all(untouched[k] is marked[k] for k in marked)
