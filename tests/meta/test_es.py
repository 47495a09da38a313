"""Evolution strategies: convergence to the true gradient on a quadratic, PES, no graph."""

from __future__ import annotations

import pytest
import torch

import metaopt
from metaopt.meta import ES, PES, Unrolled
from tests.meta.meta_helpers import QuadraticProblem


def rule_fn(mp):
    return metaopt.rules.sgd(lr=0.3)


def relative_error(estimate, exact):
    return float((estimate - exact).norm() / exact.norm())


@pytest.fixture(scope="module")
def quadratic():
    problem = QuadraticProblem(dim=4, steps=3)
    mp = {"w0": torch.tensor([0.5, -1.0, 2.0, 0.3], dtype=torch.float64)}
    exact = Unrolled(rule_fn)(mp, problem)
    return problem, mp, exact


@pytest.mark.parametrize("estimator_cls", [ES, PES])
def test_estimate_converges_to_true_gradient_as_samples_grow(quadratic, estimator_cls):
    problem, mp, exact = quadratic
    errors = []
    for pairs in (10, 100, 1000):
        kw = {"truncation": 1} if estimator_cls is PES else {}
        gen = torch.Generator().manual_seed(pairs)
        result = estimator_cls(rule_fn, sigma=0.1, num_pairs=pairs, generator=gen, **kw)(
            mp, problem
        )
        # the loss estimate is the smoothed loss: L + sigma^2/2 E[eps^T H eps]
        assert abs(float(result.loss - exact.loss)) < 0.01 * float(exact.loss)
        errors.append(relative_error(result.grads["w0"], exact.grads["w0"]))
    assert errors[0] > errors[2]
    assert errors[2] < 0.15  # ~ sqrt(dim / pairs)


def test_pes_matches_unrolled_on_a_learning_rate_over_windows():
    """PES over 3 windows estimates the full-horizon gradient w.r.t. a rule parameter."""
    problem = QuadraticProblem(dim=3, steps=6)
    mp = {"lr": torch.tensor(0.2, dtype=torch.float64)}
    w0 = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)

    class Fixed(QuadraticProblem):
        def init(self, meta_params):
            return {"w": w0.clone().requires_grad_(True)}, {}

    fixed = Fixed(dim=3, steps=6)
    fixed.A, fixed.b, fixed.c = problem.A, problem.b, problem.c

    def lr_rule(m):
        return metaopt.rules.sgd(lr=m["lr"])

    exact = Unrolled(lr_rule)(mp, fixed).grads["lr"]
    gen = torch.Generator().manual_seed(0)
    pes = PES(lr_rule, truncation=2, sigma=1e-3, num_pairs=2000, generator=gen)(mp, fixed)
    assert abs(float(pes.grads["lr"] - exact)) < 0.1 * abs(float(exact))


def test_es_keeps_no_graph(quadratic):
    problem, mp, _ = quadratic
    leaf = {"w0": mp["w0"].clone().requires_grad_(True)}
    result = ES(rule_fn, num_pairs=2, generator=torch.Generator().manual_seed(0))(leaf, problem)
    assert not result.loss.requires_grad
    assert not result.grads["w0"].requires_grad


def test_es_is_reproducible_with_a_seeded_generator(quadratic):
    problem, mp, _ = quadratic
    a = ES(rule_fn, num_pairs=3, generator=torch.Generator().manual_seed(7))(mp, problem)
    b = ES(rule_fn, num_pairs=3, generator=torch.Generator().manual_seed(7))(mp, problem)
    torch.testing.assert_close(a.grads["w0"], b.grads["w0"], rtol=0, atol=0)


@pytest.mark.parametrize("kwargs", [{"sigma": 0.0}, {"num_pairs": 0}])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        ES(rule_fn, **kwargs)
    with pytest.raises(ValueError):
        PES(rule_fn, **kwargs)
