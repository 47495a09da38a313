"""Implicit meta-gradients: ridge regression closed form, decorator, agreement with unrolling."""

from __future__ import annotations

import pytest
import torch

import metaopt
from metaopt.meta import Implicit, InnerProblem, Unrolled, conjugate_gradient, implicit_root

torch.set_default_dtype(torch.float64)
G = torch.Generator().manual_seed(0)
X = torch.randn(30, 5, generator=G, dtype=torch.float64)
Y = X @ torch.randn(5, generator=G, dtype=torch.float64) + 0.5 * torch.randn(30, generator=G,
                                                                            dtype=torch.float64)
XV = torch.randn(20, 5, generator=G, dtype=torch.float64)
YV = XV @ torch.randn(5, generator=G, dtype=torch.float64)
torch.set_default_dtype(torch.float32)


def ridge_inner(params, mp):
    w = params["w"]
    return 0.5 * ((X @ w - Y) ** 2).sum() + 0.5 * mp["lam"] * (w @ w)


def ridge_outer(params, mp):
    w = params["w"]
    return 0.5 * ((XV @ w - YV) ** 2).sum()


def closed_form(lam):
    a = X.T @ X + lam * torch.eye(5, dtype=torch.float64)
    w = torch.linalg.solve(a, X.T @ Y)
    dw = -torch.linalg.solve(a, w)  # d w / d lam
    return w, (XV.T @ (XV @ w - YV)) @ dw


class Ridge:
    def solve(self, mp):
        return {"w": closed_form(mp["lam"])[0]}

    inner_loss = staticmethod(ridge_inner)
    meta_loss = staticmethod(ridge_outer)


@pytest.mark.parametrize("lam", [0.1, 2.0, 30.0])
def test_implicit_matches_ridge_closed_form(lam):
    mp = {"lam": torch.tensor(lam, dtype=torch.float64)}
    result = Implicit(cg_iters=50)(mp, Ridge())
    w, grad = closed_form(mp["lam"])
    torch.testing.assert_close(result.grads["lam"], grad, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(result.loss, ridge_outer({"w": w}, mp))


def test_implicit_root_decorator_around_a_user_solver():
    """The user's solver is plain gradient descent (no graph); gradients still flow."""

    @implicit_root(ridge_inner, cg_iters=50)
    def solve(mp):
        w = torch.zeros(5, dtype=torch.float64)
        step = 1.0 / (torch.linalg.matrix_norm(X, 2) ** 2 + mp["lam"])
        for _ in range(3000):
            w = w - step * (X.T @ (X @ w - Y) + mp["lam"] * w)
        return {"w": w}

    lam = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    params = solve({"lam": lam})
    ridge_outer(params, None).backward()
    torch.testing.assert_close(lam.grad, closed_form(lam.detach())[1], rtol=1e-6, atol=1e-8)


def test_damping_shrinks_the_implicit_gradient():
    mp = {"lam": torch.tensor(1.0, dtype=torch.float64)}
    exact = Implicit()(mp, Ridge()).grads["lam"]
    damped = Implicit(damping=100.0)(mp, Ridge()).grads["lam"]
    assert 0 < damped.abs() < exact.abs()


class RidgeByGradientDescent(InnerProblem):
    """The same ridge problem solved by GD; lam enters through the rule's weight decay."""

    num_steps = 400

    def init(self, mp):
        return {"w": torch.zeros(5, dtype=torch.float64, requires_grad=True)}, {}

    def inner_loss(self, params, buffers, step):
        return 0.5 * ((X @ params["w"] - Y) ** 2).sum(), buffers

    def meta_loss(self, params, buffers, step):
        return ridge_outer(params, None) if step == self.num_steps - 1 else None


def test_implicit_matches_unrolled_at_convergence():
    mp = {"lam": torch.tensor(3.0, dtype=torch.float64)}
    lr = 1.0 / (torch.linalg.matrix_norm(X, 2) ** 2 + 3.0).item()
    unrolled = Unrolled(lambda m: metaopt.rules.sgd(lr=lr, weight_decay=m["lam"]))(
        mp, RidgeByGradientDescent()
    )
    implicit = Implicit()(mp, Ridge())
    torch.testing.assert_close(unrolled.loss, implicit.loss, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(unrolled.grads["lam"], implicit.grads["lam"], rtol=1e-4, atol=1e-6)


def test_conjugate_gradient_solves_spd_system():
    q = torch.randn(6, 6, generator=G, dtype=torch.float64)
    a = q @ q.T + torch.eye(6, dtype=torch.float64)
    b = {"x": torch.randn(6, generator=G, dtype=torch.float64)}
    x = conjugate_gradient(lambda v: {"x": a @ v["x"]}, b, max_iters=20)
    torch.testing.assert_close(x["x"], torch.linalg.solve(a, b["x"]))


def test_bad_arguments():
    with pytest.raises(ValueError, match="damping"):
        Implicit(damping=-1.0)
    with pytest.raises(ValueError, match="cg_iters"):
        Implicit(cg_iters=0)
    with pytest.raises(ValueError, match="damping"):
        implicit_root(ridge_inner, damping=-1.0)


def test_conjugate_gradient_warns_when_it_stops_short_of_the_tolerance(caplog):
    """Too few iterations: the last iterate comes back and a warning names the relative
    residual reached; enough iterations: no warning."""
    q = torch.randn(6, 6, generator=G, dtype=torch.float64)
    a = q @ q.T + 0.1 * torch.eye(6, dtype=torch.float64)
    b = {"x": torch.randn(6, generator=G, dtype=torch.float64)}
    with caplog.at_level("WARNING", logger="metaopt.meta.implicit"):
        x = conjugate_gradient(lambda v: {"x": a @ v["x"]}, b, max_iters=2)
    (record,) = caplog.records
    residual = float(torch.linalg.vector_norm(b["x"] - a @ x["x"]) / b["x"].norm())
    assert "max_iters=2" in record.getMessage() and f"{residual:.3g}" in record.getMessage()
    assert residual > 1e-3
    caplog.clear()
    with caplog.at_level("WARNING", logger="metaopt.meta.implicit"):
        conjugate_gradient(lambda v: {"x": a @ v["x"]}, b, max_iters=50)
    assert not caplog.records


def _sgd_ridge_solver(mp):
    w = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.SGD([w], lr=1e-3, momentum=0.9)
    for _ in range(3000):
        optimizer.zero_grad()
        ridge_inner({"w": w}, mp).backward()
        optimizer.step()
    return {"w": w.detach()}


def test_a_solver_of_torch_optim_steps_works_in_both_forms():
    """The solver runs with autograd on (a loop of torch.optim steps failed under the
    no_grad it ran in), on detached meta-parameters, and leaves no graph behind."""
    lam = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    expected = closed_form(lam.detach())[1]
    params = implicit_root(ridge_inner, cg_iters=50)(_sgd_ridge_solver)({"lam": lam})
    ridge_outer(params, None).backward()
    torch.testing.assert_close(lam.grad, expected, rtol=1e-6, atol=1e-8)

    class SGDRidge(Ridge):
        def solve(self, mp):
            assert not mp["lam"].requires_grad
            return _sgd_ridge_solver(mp)

    result = Implicit(cg_iters=50)({"lam": lam.detach()}, SGDRidge())
    torch.testing.assert_close(result.grads["lam"], expected, rtol=1e-6, atol=1e-8)
    with torch.no_grad():  # the caller's grad mode does not reach the solver
        params = implicit_root(ridge_inner)(_sgd_ridge_solver)({"lam": lam})
    assert not params["w"].requires_grad


def test_implicit_root_treats_non_float_meta_params_as_constants():
    @implicit_root(ridge_inner, cg_iters=50)
    def solve(mp):
        w = torch.zeros(5, dtype=torch.float64)
        step = 1.0 / (torch.linalg.matrix_norm(X, 2) ** 2 + mp["lam"])
        for _ in range(int(mp["iters"])):
            w = w - step * (X.T @ (X @ w - Y) + mp["lam"] * w)
        return {"w": w}

    lam = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    params = solve({"iters": torch.tensor(3000), "lam": lam})
    ridge_outer(params, None).backward()
    torch.testing.assert_close(lam.grad, closed_form(lam.detach())[1], rtol=1e-6, atol=1e-8)


def test_implicit_root_refuses_a_solver_result_that_is_not_floating_point():
    solve = implicit_root(ridge_inner)(lambda mp: {"w": torch.zeros(5, dtype=torch.int64)})
    with pytest.raises(TypeError, match=r"floating-point.*int64"):
        solve({"lam": torch.tensor(1.0, dtype=torch.float64, requires_grad=True)})
