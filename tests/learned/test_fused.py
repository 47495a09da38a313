"""The fused in-place step (LearnedOptimizer(compile=True)'s path), run eagerly here: the
same numbers as the pure rule, written into the given tensors."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from metaopt.learned import learned_rule, new_task, observe_loss
from metaopt.learned.fused import fusable, fused_learned_step_
from metaopt.learned.rule import net_dtype_of, run_on_net_device
from metaopt.learned.tasks import fold_task
from tests.learned.helpers import mlp_params, perturbed_net


def _grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in params.items()}


def _fused(
    net, keys, params, state, grads, *, max_block, topk_fraction=None, free=False, view_cache=None
):
    """One fused step over the dicts; returns the new state dict (params mutated)."""
    leaves = [state[k] for k in keys]
    new = fused_learned_step_(
        [grads[k] for k in keys],
        [params[k] for k in keys],
        leaves,
        functools.partial(run_on_net_device, net, None),
        lr=torch.tensor(1e-2, dtype=torch.float64),
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        max_block=max_block,
        sample_size=8,
        topk_fraction=topk_fraction,
        net_dtype=net_dtype_of(net, None),
        importance_free=free,
        view_cache=view_cache,
    )
    return dict(zip(keys, new, strict=True))


@settings(max_examples=12, deadline=None)
@given(
    max_block=st.sampled_from([4, 16, 10_000]),
    factored=st.booleans(),
    boundary=st.booleans(),
    topk=st.sampled_from([None, 0.5]),
)
def test_fused_step_equals_pure_rule_in_place(max_block, factored, boundary, topk):
    """Float64, several steps: parameters, moments and counters equal the pure rule's
    within 1e-10; the parameters and moments are updated in their own storage."""
    _check_fused_equals_pure(
        lambda: mlp_params(torch.float64), max_block, factored, boundary, topk
    )


@pytest.mark.parametrize("factored", [False, True])
def test_fused_step_equals_pure_rule_with_shorter_last_tokens(factored):
    """Tensors whose sizes fit no equal tokens (a shorter last one, two views of one
    tensor) are updated in place like the others."""

    def params():
        gen = torch.Generator().manual_seed(0)
        shapes = {"w": (1, 31), "v": (29, 1), "b": (23,), "m": (4, 3)}
        return {k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in shapes.items()}

    _check_fused_equals_pure(params, 5, factored, True, None)


@settings(max_examples=15, deadline=None)
@given(
    sizes=st.lists(
        st.sampled_from([1, 2, 3, 7, 23, 29, 31, 46, 58, 97, 101, 202]), min_size=1, max_size=3
    ).map(tuple),
    rows=st.sampled_from([1, 2, 3]),
    max_block=st.sampled_from([3, 5, 8]),
    factored=st.booleans(),
)
def test_fused_step_equals_pure_rule_for_any_token_layout(sizes, rows, max_block, factored):
    """Sizes with and without fitting divisors (primes, 2 x primes) at small block
    sizes, so that tensors get equal tokens, a shorter last one, or a single token."""

    def params():
        gen = torch.Generator().manual_seed(len(sizes) + rows)
        return {
            f"p{i}": torch.randn((rows, n), generator=gen, dtype=torch.float64)
            for i, n in enumerate(sizes)
        }

    _check_fused_equals_pure(params, max_block, factored, True, None)


def _check_fused_equals_pure(make_params, max_block, factored, boundary, topk):
    net = perturbed_net(dtype=torch.float64)
    params = make_params()
    rule = learned_rule(
        net, lr=1e-2, max_block=max_block, sample_size=8, factored=factored, topk_fraction=topk
    )
    state = rule.init(params)
    if boundary:  # importance and anchor non-trivial
        state = new_task(state, {k: v + 0.05 for k, v in params.items()})
    ref_params = {k: v.clone() for k, v in params.items()}
    ref_state = state
    fused_state = {
        k: s._replace(exp_avg=s.exp_avg.clone(), exp_avg_sq=s.exp_avg_sq.clone())
        for k, s in state.items()
    }
    keys = list(params)
    storage = {k: params[k].data_ptr() for k in keys}
    with torch.no_grad():
        for t in range(4):
            grads = _grads(params, t)
            updates, ref_state = rule.update(grads, ref_state, ref_params)
            ref_params = {k: ref_params[k] + updates[k] for k in keys}
            fused_state = _fused(
                net,
                keys,
                params,
                fused_state,
                grads,
                max_block=max_block,
                topk_fraction=topk,
                free=not boundary,
            )
    for k in keys:
        assert params[k].data_ptr() == storage[k]
        torch.testing.assert_close(params[k], ref_params[k], rtol=0, atol=1e-10)
        for field in ("exp_avg", "exp_avg_sq", "step", "task_step"):
            torch.testing.assert_close(
                getattr(fused_state[k], field), getattr(ref_state[k], field), rtol=0, atol=1e-10
            )
    start = make_params()
    moved = [not torch.equal(params[k], start[k]) for k in keys]
    assert all(moved) if topk is None else any(moved)  # top-k: the selected tokens


def test_fusable_and_clear_error_when_not():
    net = perturbed_net()
    params = mlp_params(torch.float32)
    state = learned_rule(net).init(params)
    keys = list(params)
    leaves = [state[k] for k in keys]
    assert fusable([params[k] for k in keys], leaves)
    weight = params["0.weight"]
    strided = weight.t().contiguous().t()  # same values, transposed strides
    assert not strided.is_contiguous()
    assert not fusable([strided], [state["0.weight"]])
    pending = new_task({"0.weight": state["0.weight"]})["0.weight"]  # boundary without params
    assert not fusable([weight], [pending])
    before = weight.clone()
    with pytest.raises(ValueError, match="contiguous"):
        _fused(
            net,
            ["0.weight"],
            {"0.weight": strided},
            {"0.weight": state["0.weight"]},
            {"0.weight": torch.ones_like(weight)},
            max_block=16,
        )
    torch.testing.assert_close(strided, before)
    folded = fold_task(pending, weight)
    assert fusable([weight], [folded])


def _without_and_with_cache():
    """``(net, keys, cache, params, state)`` twice: without a view cache, then with one."""
    net = perturbed_net(dtype=torch.float64)
    keys = list(mlp_params(torch.float64))
    for cache in (None, {}):
        params = mlp_params(torch.float64)
        yield net, keys, cache, params, learned_rule(net, max_block=16).init(params)


def test_view_cache_gives_the_same_steps_and_follows_replaced_buffers():
    """With a view cache: same numbers as without; a replaced buffer (new anchors at a
    task boundary) or new parameters are seen, not the cached views of the old ones."""
    runs = []
    for net, keys, cache, params, state in _without_and_with_cache():
        with torch.no_grad():
            for t in range(5):
                if t == 2:  # new anchor and importance tensors
                    state = new_task(state, params)
                state = _fused(
                    net,
                    keys,
                    params,
                    state,
                    _grads(params, t),
                    max_block=16,
                    free=t < 2,
                    view_cache=cache,
                )
        runs.append(params)
        if cache is not None:
            held = cache["held"]
            assert any(x is state[k].anchor for k in keys for x in held)  # the new anchors
            # another set of parameters: the cache is rebuilt for them
            other = {k: v.clone() for k, v in params.items()}
            before = {k: v.clone() for k, v in params.items()}
            _fused(net, keys, other, state, _grads(params, 9), max_block=16, view_cache=cache)
            assert any(x is other[keys[0]] for x in cache["held"])
            assert not torch.equal(other[keys[0]], before[keys[0]])  # the step wrote there
            assert all(torch.equal(params[k], before[k]) for k in keys)  # not here
    for k in keys:
        torch.testing.assert_close(runs[1][k], runs[0][k], rtol=0, atol=0)


def test_view_cache_follows_storage_swapped_under_the_same_tensor():
    """``p.data = x`` (``module.to(...)`` does this) keeps the tensor object but not its
    storage: the cached views of the old storage must not be written instead."""
    runs = []
    for net, keys, cache, params, state in _without_and_with_cache():
        with torch.no_grad():
            for t in range(4):
                if t == 2:
                    params[keys[0]].data = params[keys[0]].data.clone()
                    state[keys[1]].exp_avg.data = state[keys[1]].exp_avg.data.clone()
                state = _fused(
                    net, keys, params, state, _grads(params, t), max_block=16, view_cache=cache
                )
        runs.append((params, state))
    (p0, s0), (p1, s1) = runs
    for k in keys:
        torch.testing.assert_close(p1[k], p0[k], rtol=0, atol=0)
        torch.testing.assert_close(s1[k].exp_avg, s0[k].exp_avg, rtol=0, atol=0)


def test_cached_field_stacks_follow_replaced_and_edited_counters():
    """The per-tensor fields stacked once and reused: the same numbers as stacking them at
    every step, through a loss observed, a task boundary, an in-place edit of a counter
    in the state and a counter replaced by a new tensor."""
    runs = []
    for net, keys, cache, params, state in _without_and_with_cache():
        with torch.no_grad():
            for t in range(7):
                if t == 1:
                    state = observe_loss(state, torch.tensor(2.5))
                if t == 2:
                    state = new_task(state, params)
                if t == 4:  # in place, as code holding optimizer.state[p] might do
                    state[keys[0]].task_index.fill_(5.0)
                    state[keys[1]].step.add_(10.0)
                if t == 5:
                    state[keys[2]] = state[keys[2]]._replace(task_step=torch.tensor(0.0))
                    state[keys[3]].task_index.data = torch.tensor(7.0)  # same object
                descriptors = cache.get("fields", {}).get("descriptor") if cache else None
                state = _fused(
                    net, keys, params, state, _grads(params, t), max_block=16, view_cache=cache
                )
                if cache is not None and t in (1, 6):  # plain steps reuse the static stack
                    assert cache["fields"]["descriptor"][0] is descriptors[0]
        runs.append((params, state))
    (p0, s0), (p1, s1) = runs
    for k in keys:
        torch.testing.assert_close(p1[k], p0[k], rtol=0, atol=0)
        for name in ("step", "task_step", "task_index", "loss_stats"):
            torch.testing.assert_close(getattr(s1[k], name), getattr(s0[k], name))
    assert float(s1[keys[0]].task_index) == 5.0
    assert float(s1[keys[3]].task_index) == 7.0
    assert float(s1[keys[1]].step) == float(s1[keys[3]].step) + 10.0


@pytest.mark.parametrize(
    ("device_type", "kwargs", "expected_options"),
    [
        ("cpu", {}, {"cpp_wrapper": True, "size_asserts": False}),
        ("cuda", {}, {"size_asserts": False}),  # compile_own's defaults
        ("cpu", {"options": {"max_autotune": True}}, {"max_autotune": True}),
        ("cpu", {"mode": "max-autotune"}, None),
        ("cpu", {"backend": "eager"}, None),
    ],
)
def test_compiled_fused_step_picks_cpp_wrapper_on_cpu_only(
    monkeypatch, device_type, kwargs, expected_options
):
    from metaopt.learned.fused import compiled_fused_step

    seen = {}
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.update(kw) or fn)
    compiled_fused_step(device_type, **kwargs)
    assert seen["fullgraph"] is True
    assert seen.get("options") == expected_options


def test_compiled_fused_step_passes_tensor_adam_hypers_as_one_input(monkeypatch):
    """0-d ``b1``, ``b2``, ``eps`` reach the compiled function stacked into one ``[3]``
    tensor (Dynamo re-traced the step for 0-d float64 inputs), numbers as they are; the
    step is the same either way (run eagerly here: ``torch.compile`` is the identity)."""
    from metaopt.learned.fused import compiled_fused_step

    seen = []

    def spy_compile(fn, **kw):
        def run(*args, adam, **kwargs):
            seen.append(adam)
            return fn(*args, adam=adam, **kwargs)

        return run

    monkeypatch.setattr(torch, "compile", spy_compile)
    net = perturbed_net(dtype=torch.float64)
    results = []
    for hypers in (
        {"b1": 0.9, "b2": 0.999, "eps": 1e-8},
        {k: torch.tensor(v, dtype=torch.float64) for k, v in
         {"b1": 0.9, "b2": 0.999, "eps": 1e-8}.items()},
    ):
        params = mlp_params(torch.float64)
        keys = list(params)
        state = learned_rule(net, max_block=16).init(params)
        new = compiled_fused_step("cpu")(
            [_grads(params, 0)[k] for k in keys],
            [params[k] for k in keys],
            [state[k] for k in keys],
            functools.partial(run_on_net_device, net, None),
            lr=torch.tensor(1e-2, dtype=torch.float64),
            max_block=16,
            sample_size=8,
            topk_fraction=None,
            net_dtype=net_dtype_of(net, None),
            importance_free=True,
            **hypers,
        )
        results.append((params, new))
    assert seen[0] == (0.9, 0.999, 1e-8)
    assert isinstance(seen[1], torch.Tensor) and seen[1].shape == (3,)
    torch.testing.assert_close(seen[1], torch.tensor([0.9, 0.999, 1e-8], dtype=torch.float64))
    (p_num, s_num), (p_ten, s_ten) = results
    for k in p_num:
        torch.testing.assert_close(p_ten[k], p_num[k], rtol=0, atol=1e-12)
    for a, b in zip(s_num, s_ten, strict=True):
        torch.testing.assert_close(b.exp_avg_sq, a.exp_avg_sq, rtol=0, atol=1e-12)
