"""Contract tests of ``metaopt.meta``'s public API, written the way a researcher uses it in
place of ``higher`` / TorchOpt: estimators on models with dropout or frozen parameters,
edge arguments, implicit differentiation on singular Hessians, trainer checkpoints that
are corrupt or mismatched, bad command-line arguments. Every number is compared with a
closed form, finite differences or a plain PyTorch loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import metaopt
from metaopt.meta import ES, PES, SupervisedProblem, Unrolled
from tests.meta.meta_helpers import classification_problem

F64 = torch.float64


def lr_rule(mp):
    """Plain SGD whose learning rate is the meta-parameter ``lr``."""
    return metaopt.rules.sgd(lr=mp["lr"])


def dropout_problem(steps: int = 3) -> SupervisedProblem:
    """A float64 MLP with dropout in train mode: every inner loss is random."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 2)).double()
    batches = [
        (torch.randn(8, 3, generator=gen, dtype=F64), torch.randint(0, 2, (8,), generator=gen))
        for _ in range(steps)
    ]
    meta = (torch.randn(16, 3, generator=gen, dtype=F64), torch.randint(0, 2, (16,), generator=gen))
    return SupervisedProblem(model, batches, meta)


# ---------------------------------------------------------------- ES / PES


def _es(cls, sigma: float, seed: int = 1, **kw):
    if cls is PES:
        kw.setdefault("truncation", 1)
    return cls(lr_rule, sigma=sigma, num_pairs=4, generator=torch.Generator().manual_seed(seed),
               **kw)


@pytest.mark.parametrize("cls", [ES, PES])
def test_es_with_dropout_is_reproducible_and_antithetic_pairs_share_the_masks(cls):
    """A seeded generator must make the estimate reproducible even when the inner model
    draws dropout masks, and the two runs of an antithetic pair must see the same masks
    (common random numbers): otherwise ``(L+ - L-) / 2 sigma`` is dominated by the mask
    difference and grows like ``1 / sigma``."""
    problem = dropout_problem()
    mp = {"lr": torch.tensor(0.3, dtype=F64)}
    a = _es(cls, 1e-4)(mp, problem).grads["lr"]
    b = _es(cls, 1e-4)(mp, problem).grads["lr"]
    assert torch.equal(a, b)
    # same noise, ten times smaller sigma: a smooth estimate barely moves
    c = _es(cls, 1e-5)(mp, problem).grads["lr"]
    assert float(c) == pytest.approx(float(a), rel=1e-2)


@pytest.mark.parametrize("cls", [ES, PES])
def test_es_refuses_empty_meta_params_before_running(cls):
    calls = []

    def rule_fn(mp):
        calls.append(1)
        return metaopt.rules.sgd(lr=0.1)

    kw = {"truncation": 1} if cls is PES else {}
    with pytest.raises(ValueError, match="empty"):
        cls(rule_fn, num_pairs=1, **kw)({}, classification_problem())
    assert not calls


@pytest.mark.parametrize(
    "make",
    [
        lambda: Unrolled(lr_rule, truncation=2.5),
        lambda: PES(lr_rule, truncation=2.5),
        lambda: ES(lr_rule, num_pairs=2.5),
        lambda: PES(lr_rule, num_pairs=1.5),
    ],
)
def test_fractional_window_or_pair_counts_are_refused(make):
    with pytest.raises(TypeError, match="integer"):
        make()
