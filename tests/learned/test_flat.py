"""The differentiable update over one concatenation of all tensors (``_flat_step``)
against the per-tensor path it replaces under autograd."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from metaopt.learned import learned_rule, new_task
from metaopt.learned import rule as rule_module
from metaopt.learned.features import layout_of, sample_columns
from tests.learned.helpers import mlp_params, perturbed_net


def _update_and_meta_grads(rule_kwargs, params, state, grads, flat: bool):
    """The update, new state and d(sum(update * weights))/d(net.head.weight), with the flat
    path allowed (``flat``) or forced off."""
    net = perturbed_net(dtype=torch.float64)
    head = net.head.weight.detach().clone().requires_grad_()
    meta = {**{k: v.detach() for k, v in net.named_parameters()}, "head.weight": head}
    rule = learned_rule(net, lr=1e-2, meta_params=meta, **rule_kwargs)
    allowed = rule_module._flattenable if flat else (lambda *args: False)
    with mock.patch.object(rule_module, "_flattenable", allowed), torch.enable_grad():
        updates, new_state = rule.update(grads, state, params)
        gen = torch.Generator().manual_seed(1)
        total = sum((u * torch.randn(u.shape, generator=gen, dtype=u.dtype)).sum()
                    for u in updates.values())
        (meta_grad,) = torch.autograd.grad(total, head)
    return updates, new_state, meta_grad


shapes = st.lists(
    st.lists(st.integers(1, 24), min_size=0, max_size=3).map(tuple), min_size=1, max_size=4
)


@settings(max_examples=25, deadline=None)
@given(
    shapes=shapes,
    max_block=st.sampled_from([3, 16, 65536]),
    sample_size=st.sampled_from([1, 5, 32]),
    seed=st.integers(0, 2**16),
)
def test_flat_path_equals_per_tensor_path(shapes, max_block, sample_size, seed):
    _check_flat_equals_per_tensor(shapes, max_block, sample_size, seed)


def test_flat_path_equals_per_tensor_path_with_shorter_last_tokens():
    shapes = [(23,), (29, 1), (1, 31), (4, 3)]  # at max_block 5: 4 x 5 + 3, 5 x 5 + 4, ...
    assert [layout_of(math.prod(s), 5, s[0]).tail for s in shapes] == [3, 4, 1, 0]
    _check_flat_equals_per_tensor(shapes, 5, 4, 0)


def _check_flat_equals_per_tensor(shapes, max_block, sample_size, seed):
    gen = torch.Generator().manual_seed(seed)
    params = {
        f"p{i}": torch.randn(shape, generator=gen, dtype=torch.float64)
        for i, shape in enumerate(shapes)
    }
    grads = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in params.items()}
    kwargs = {"max_block": max_block, "sample_size": sample_size, "aux_dtype": None}
    state = learned_rule(perturbed_net(dtype=torch.float64), **kwargs).init(params)
    # a finished task: anchors and importances that are not zero, so every term is used
    state = new_task(state, {k: v + 0.1 for k, v in params.items()})
    state = {k: s._replace(importance=torch.rand(s.importance.shape, generator=gen,
                                                 dtype=s.importance.dtype))
             for k, s in state.items()}
    flat = _update_and_meta_grads(kwargs, params, state, grads, flat=True)
    per_tensor = _update_and_meta_grads(kwargs, params, state, grads, flat=False)
    for k in params:  # the same formulas per element: the same numbers
        assert torch.equal(flat[0][k], per_tensor[0][k])
        assert flat[0][k].shape == params[k].shape
        for field in ("exp_avg", "exp_avg_sq", "step", "task_step"):
            assert torch.equal(getattr(flat[1][k], field), getattr(per_tensor[1][k], field))
        assert flat[1][k].exp_avg.shape == params[k].shape
    torch.testing.assert_close(flat[2], per_tensor[2], rtol=1e-10, atol=1e-14)
    assert flat[2].abs().sum() > 0


def test_flat_sample_index_points_at_each_tokens_sampled_columns():
    numels = [12, 7, 40, 1009]
    layouts = [layout_of(n, 5, 1) for n in numels]
    assert layouts[-1].tail  # a shorter last token too
    index = rule_module._flat_sample_index_cpu(tuple(layouts), 4).view(-1, 4)
    expected, start = [], 0
    for lay in layouts:
        for rows, length in lay.segments:
            columns = sample_columns(length, 4, torch.device("cpu"))
            for _ in range(rows):
                expected.append(start + columns)
                start += length
    assert start == sum(numels)
    assert torch.equal(index, torch.stack(expected))


@pytest.mark.parametrize(
    ("case", "flattenable"),
    [("one dtype", True), ("mixed dtypes", False), ("factored", False), ("mixed aux", False)],
)
def test_flattenable_needs_one_dtype_and_dense_moments(case, flattenable):
    params = mlp_params(torch.float64)
    if case == "mixed dtypes":
        params["0.bias"] = params["0.bias"].float()
    rule = learned_rule(perturbed_net(dtype=torch.float64), factored=case == "factored")
    state = rule.init(params)
    if case == "mixed aux":
        state["0.bias"] = state["0.bias"]._replace(importance=state["0.bias"].importance.half())
    grads = list(params.values())
    got = rule_module._flattenable(grads, grads, list(state.values()))
    assert got is flattenable


def test_mixed_dtypes_under_autograd_take_the_per_tensor_path():
    params = mlp_params(torch.float64)
    params["0.bias"] = params["0.bias"].float()
    net = perturbed_net(dtype=torch.float64)
    rule = learned_rule(net, lr=1e-2, max_block=16)
    state = new_task(rule.init(params), {k: v + 0.05 for k, v in params.items()})
    grads = {k: torch.ones_like(v) * (i + 1) for i, (k, v) in enumerate(params.items())}
    with torch.no_grad():
        expected, _ = rule.update(grads, state, params)
    with torch.enable_grad():
        got, _ = rule.update(grads, state, params)
    for k in params:
        assert got[k].dtype == params[k].dtype
        torch.testing.assert_close(got[k], expected[k])
    assert math.isfinite(sum(float(u.detach().sum()) for u in got.values()))
