"""Unrolled meta-gradients: finite differences (float64), higher, truncation, buffers."""

from __future__ import annotations

import higher
import pytest
import torch

import metaopt
from metaopt.meta import PureModel, SupervisedProblem, Unrolled
from tests.meta.meta_helpers import classification_problem, tiny_mlp, toy_meta_params, toy_rule

RULES = {
    "sgd_momentum": (
        lambda mp: metaopt.rules.sgd(lr=mp["lr"], momentum=mp["momentum"]),
        {"lr": torch.tensor(0.3, dtype=torch.float64), "momentum": torch.tensor(0.6,
                                                                              dtype=torch.float64)},
    ),
    "adam": (
        lambda mp: metaopt.rules.adam(lr=mp["lr"], betas=(mp["b1"], 0.99)),
        {"lr": torch.tensor(0.05, dtype=torch.float64), "b1": torch.tensor(0.8,
                                                                         dtype=torch.float64)},
    ),
    "toy": (toy_rule, toy_meta_params()),
}


def finite_difference(estimator, mp, problem, h=1e-6):
    out = {}
    for k, v in mp.items():
        g = torch.zeros_like(v)
        for i in range(v.numel()):
            e = torch.zeros_like(v).reshape(-1)
            e[i] = h
            e = e.reshape(v.shape)
            plus = estimator({**mp, k: v + e}, problem).loss
            minus = estimator({**mp, k: v - e}, problem).loss
            g.reshape(-1)[i] = (plus - minus) / (2 * h)
        out[k] = g
    return out


@pytest.mark.parametrize("name", sorted(RULES))
@pytest.mark.parametrize("batchnorm", [False, True])
def test_unrolled_matches_finite_differences(name, batchnorm):
    rule_fn, mp = RULES[name]
    problem = classification_problem(steps=4, batchnorm=batchnorm, every_step=True)
    estimator = Unrolled(rule_fn)
    result = estimator(mp, problem)
    fd = finite_difference(estimator, mp, problem)
    for k in mp:
        assert result.grads[k].shape == mp[k].shape
        torch.testing.assert_close(result.grads[k], fd[k], rtol=1e-5, atol=1e-8)
    assert all(g.abs().sum() > 0 for g in result.grads.values())


def test_unrolled_matches_higher_sgd_momentum_maml():
    """Same problem, same K: gradients w.r.t. the learning rate AND the initial weights."""
    torch.manual_seed(0)
    model = tiny_mlp().double()
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (8,),
                                                                            generator=g))
        for _ in range(5)
    ]
    meta = (torch.randn(16, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (16,),
                                                                                generator=g))
    lr = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)

    inner_opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    with higher.innerloop_ctx(
        model, inner_opt, copy_initial_weights=False, override={"lr": [lr]}
    ) as (fmodel, diffopt):
        for x, y in batches:
            diffopt.step(torch.nn.functional.cross_entropy(fmodel(x), y))
        meta_loss = torch.nn.functional.cross_entropy(fmodel(meta[0]), meta[1])
    ref_grads = torch.autograd.grad(meta_loss, [lr, *model.parameters()])

    mp = {"lr": lr.detach(), **{"init." + k: p.detach() for k, p in model.named_parameters()}}
    problem = SupervisedProblem(model, batches, meta, init_prefix="init.")
    result = Unrolled(lambda m: metaopt.rules.sgd(lr=m["lr"], momentum=0.9))(mp, problem)
    torch.testing.assert_close(result.loss, meta_loss.detach())
    torch.testing.assert_close(result.grads["lr"], ref_grads[0], rtol=1e-9, atol=1e-12)
    for (k, _), ref in zip(model.named_parameters(), ref_grads[1:], strict=True):
        torch.testing.assert_close(result.grads["init." + k], ref, rtol=1e-9, atol=1e-12)


def test_truncation_one_window_equals_full_backprop():
    problem = classification_problem(steps=6, every_step=True)
    rule_fn, mp = RULES["toy"]
    full = Unrolled(rule_fn)(mp, problem)
    same = Unrolled(rule_fn, truncation=6)(mp, problem)
    cut = Unrolled(rule_fn, truncation=2)(mp, problem)
    torch.testing.assert_close(full.loss, cut.loss)  # the trajectory is the same
    for k in mp:
        torch.testing.assert_close(full.grads[k], same.grads[k])
    # truncation drops the long-range terms: the estimate differs from the full gradient
    assert any(not torch.allclose(full.grads[k], cut.grads[k]) for k in mp)


def test_pure_model_batchnorm_train_mode_updates_returned_buffers_only():
    model = tiny_mlp(batchnorm=True).train()
    pure = PureModel(model)
    params, buffers = pure.init()
    before = {k: b.clone() for k, b in buffers.items()}
    x = torch.randn(8, 3) * 3 + 1
    _, new = pure(params, buffers, x)
    for k in buffers:
        torch.testing.assert_close(buffers[k], before[k])  # caller's buffers untouched
    assert int(new["1.num_batches_tracked"]) == 1
    h = x @ params["0.weight"].T + params["0.bias"]
    torch.testing.assert_close(new["1.running_mean"], 0.9 * before["1.running_mean"]
                               + 0.1 * h.mean(0).detach())
    torch.testing.assert_close(model.get_buffer("1.running_mean"), before["1.running_mean"])


class _CountingLinear(torch.nn.Module):
    """Counts its calls in a buffer it reassigns (not updates in place)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls = self.calls + 1
        return self.lin(x)


@pytest.mark.parametrize("frozen", [False, True])
def test_pure_model_returns_buffers_the_forward_reassigns(frozen):
    model = _CountingLinear()
    model.lin.bias.requires_grad_(not frozen)
    pure = PureModel(model)
    params, buffers = pure.init()
    _, once = pure(params, buffers, torch.randn(4, 3))
    _, twice = pure(params, once, torch.randn(4, 3))
    assert float(buffers["calls"]) == 0.0 and float(model.calls) == 0.0
    assert float(once["calls"]) == 1.0 and float(twice["calls"]) == 2.0
    assert set(twice) == set(buffers)


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="truncation"):
        Unrolled(RULES["toy"][0], truncation=0)
    with pytest.raises(ValueError, match="empty"):
        Unrolled(RULES["toy"][0])({}, classification_problem())
    with pytest.raises(TypeError, match=r"nn\.Module"):
        PureModel(lambda x: x)
