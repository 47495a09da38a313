"""Implicit differentiation of an inner problem solved to a fixed point.

When the inner parameters ``theta*`` minimise ``L_in(theta, phi)`` (so
``grad_theta L_in(theta*, phi) = 0``), the implicit function theorem gives

    d theta* / d phi = -H^{-1} d^2 L_in / d theta d phi,   H = d^2 L_in / d theta^2,

and the meta-gradient of ``L_out(theta*(phi), phi)`` is

    dL_out/dphi = dL_out/dphi|_direct - (d^2 L_in / d phi d theta) v,
    (H + lambda I) v = dL_out/dtheta.

``v`` comes from conjugate gradient on Hessian-vector products computed with
:mod:`torch.func` (forward-over-reverse), never forming ``H``. ``lambda`` (``damping``)
regularises an ill-conditioned or indefinite ``H``. The result does not depend on how
``theta*`` was found: any inner solver works (see :func:`implicit_root`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch.func import grad, jvp, vjp
from torch.utils import _pytree as pytree

from metaopt.meta.functional import detach_tree
from metaopt.meta.problem import MetaGradient, check_count
from metaopt.tree import Params

__all__ = ["Implicit", "ImplicitProblem", "conjugate_gradient", "implicit_root"]

logger = logging.getLogger(__name__)

InnerLoss = Callable[[Params, Params], torch.Tensor]
"""``(params, meta_params) -> 0-d loss``; must be :mod:`torch.func`-transformable (pure)."""


class ImplicitProblem(Protocol):
    """A task sample for :class:`Implicit`."""

    def solve(self, meta_params: Params) -> Any:
        """Inner parameters at (or near) the minimiser of ``inner_loss`` for ``meta_params``:
        any pytree of tensors (a dict, a tuple, one tensor), passed as such to
        ``inner_loss`` and ``meta_loss``."""
        ...

    def inner_loss(self, params: Any, meta_params: Params) -> torch.Tensor: ...

    def meta_loss(self, params: Any, meta_params: Params) -> torch.Tensor: ...


def _dot(a: Params, b: Params) -> torch.Tensor:
    return sum((a[k] * b[k]).sum() for k in a)


def conjugate_gradient(
    matvec: Callable[[Params], Params],
    b: Params,
    max_iters: int = 100,
    tol: float = 1e-10,
) -> Params:
    """Solve ``A x = b`` for a symmetric positive-definite ``A`` given as ``matvec``.

    Args:
        matvec: ``x -> A x`` on trees shaped like ``b``.
        b: right-hand side tree.
        max_iters: iteration cap (``>= 1``).
        tol: stop when ``||r||^2 <= tol * ||b||^2`` (finite, ``>= 0``).

    Returns:
        ``x`` (same tree structure as ``b``), starting from zero. When ``max_iters``
        iterations end above the tolerance, the last iterate is returned and a warning
        logged (logger ``metaopt.meta.implicit``) with the relative residual reached.

    Raises:
        torch.linalg.LinAlgError: a search direction ``p`` with ``p^T A p <= 0`` (or not
            finite) before convergence: ``A`` is singular or indefinite, and the next
            step would divide by zero or move uphill (NaN or a wrong solution). Also
            when ``p^T A p / p^T p`` falls below the dtype's machine epsilon times the
            largest such quotient seen: ``A`` is singular in that precision (its
            condition number exceeds ``1 / eps``), and the steps along that direction
            would grow without bound (rounding makes ``p^T A p`` a tiny positive number
            rather than zero).
    """
    check_count("max_iters", max_iters)
    _check_tol(tol)
    eps = min(torch.finfo(v.dtype).eps for v in b.values())
    largest = 0.0
    x = {k: torch.zeros_like(v) for k, v in b.items()}
    r = {k: v.clone() for k, v in b.items()}
    p = {k: v.clone() for k, v in b.items()}
    rs = initial = _dot(r, r)
    threshold = tol * rs
    for iteration in range(max_iters):
        if rs <= threshold or rs == 0:
            break
        ap = matvec(p)
        curvature = _dot(p, ap)
        rayleigh = float(curvature / _dot(p, p))
        largest = max(largest, rayleigh)
        if not curvature > 0 or rayleigh <= eps * largest:
            raise torch.linalg.LinAlgError(
                "conjugate_gradient: the operator is not positive definite along a search "
                f"direction (p^T A p / p^T p = {rayleigh:.3g} at iteration {iteration}, "
                f"largest seen {largest:.3g}); for implicit differentiation through a "
                "singular or indefinite Hessian, pass damping > 0"
            )
        alpha = rs / curvature
        x = {k: x[k] + alpha * p[k] for k in x}
        r = {k: r[k] - alpha * ap[k] for k in r}
        rs_new = _dot(r, r)
        p = {k: r[k] + (rs_new / rs) * p[k] for k in p}
        rs = rs_new
    if not (rs <= threshold or rs == 0):
        logger.warning(
            "conjugate_gradient stopped after max_iters=%d iterations at relative residual "
            "||r|| / ||b|| = %.3g (tolerance %.3g): the solution, and an implicit "
            "meta-gradient from it, is approximate; raise cg_iters, or damping for an "
            "ill-conditioned Hessian",
            max_iters,
            math.sqrt(float(rs / initial)),
            math.sqrt(tol),
        )
    return x


def _check_tol(tol: float) -> None:
    """``tol`` must be finite and ``>= 0``: with NaN or a negative tolerance the residual
    test never passes, and every solve ran its ``max_iters`` and warned."""
    if not 0 <= tol < math.inf:
        raise ValueError(f"tol must be finite and >= 0, got {tol}")


def _check_solver(cg_iters: int, damping: float, tol: float) -> int:
    """``cg_iters`` as an int ``>= 1``; ``damping`` must be finite and ``>= 0`` (NaN gave
    NaN gradients, infinity dropped the implicit term); ``tol`` as in
    :func:`_check_tol`."""
    if not 0 <= damping < math.inf:
        raise ValueError(f"damping must be finite and >= 0, got {damping}")
    _check_tol(tol)
    return check_count("cg_iters", cg_iters)


def _tensor_leaves(tree: Any, what: str) -> tuple[list[torch.Tensor], pytree.TreeSpec]:
    """The leaves of ``tree`` (any :mod:`torch.utils._pytree` structure), all tensors."""
    leaves, spec = pytree.tree_flatten(tree)
    bad = sorted({type(x).__name__ for x in leaves if not isinstance(x, torch.Tensor)})
    if not leaves or bad:
        raise TypeError(f"{what} must be a tensor or a pytree of tensors, got leaves {bad}")
    return leaves, spec


def _implicit_vjp(
    inner_loss: InnerLoss,
    params: Any,
    meta_params: Any,
    cotangent: Any,
    damping: float,
    cg_iters: int,
    tol: float,
) -> Any:
    """``-(d^2 L_in / d phi d theta) (H + damping I)^{-1} cotangent`` at ``params``.

    ``params`` and ``cotangent`` share one pytree structure (a dict, a tuple, nested
    containers, one tensor); the result has ``meta_params``' structure, ``None`` at its
    leaves that are not floating point (constants).
    """
    params, meta_params = detach_tree(params), detach_tree(meta_params)
    leaves, spec = pytree.tree_flatten(params)
    grad_theta = grad(inner_loss, argnums=0)

    def as_tree(v: Params) -> Any:
        return pytree.tree_unflatten([v[str(i)] for i in range(len(leaves))], spec)

    def as_dict(tree: Any) -> Params:
        return {str(i): x for i, x in enumerate(pytree.tree_leaves(tree))}

    def hvp(v: Params) -> Params:
        _, out = jvp(lambda p: grad_theta(p, meta_params), (params,), (as_tree(v),))
        return {k: x + damping * v[k] for k, x in as_dict(out).items()}

    v = conjugate_gradient(hvp, as_dict(detach_tree(cotangent)), cg_iters, tol)
    meta_leaves, meta_spec = pytree.tree_flatten(meta_params)
    varying = [i for i, x in enumerate(meta_leaves) if x.is_floating_point()]

    def with_varying(*values: torch.Tensor) -> Any:
        full = list(meta_leaves)
        for i, value in zip(varying, values, strict=True):
            full[i] = value
        return pytree.tree_unflatten(full, meta_spec)

    _, pullback = vjp(
        lambda *values: grad_theta(params, with_varying(*values)),
        *(meta_leaves[i] for i in varying),
    )
    mixed: list[torch.Tensor | None] = [None] * len(meta_leaves)
    for i, g in zip(varying, pullback(as_tree(v)), strict=True):
        mixed[i] = -g
    return pytree.tree_unflatten(mixed, meta_spec)


class Implicit:
    """Implicit-function-theorem meta-gradient (the shared estimator interface).

    Args:
        cg_iters: conjugate-gradient iterations.
        damping: ``lambda`` added to the Hessian (``>= 0``).
        tol: CG relative tolerance on the squared residual (finite, ``>= 0``).

    ``Implicit()(meta_params, problem)`` solves the inner problem with
    ``problem.solve`` and returns the meta-loss at the solution and its gradient.
    """

    def __init__(self, cg_iters: int = 100, damping: float = 0.0, tol: float = 1e-12) -> None:
        self.cg_iters, self.damping, self.tol = _check_solver(cg_iters, damping, tol), damping, tol

    def __call__(self, meta_params: Params, problem: ImplicitProblem) -> MetaGradient:
        meta_params = detach_tree(meta_params)
        with torch.enable_grad():  # a solver may take torch.optim steps; its input is detached
            params = detach_tree(problem.solve(meta_params))
        _tensor_leaves(params, "problem.solve's result")
        loss = problem.meta_loss(params, meta_params)
        d_theta, d_phi = grad(problem.meta_loss, argnums=(0, 1))(params, meta_params)
        indirect = _implicit_vjp(
            problem.inner_loss, params, meta_params, d_theta, self.damping, self.cg_iters, self.tol
        )
        grads = {k: d_phi[k] + indirect[k] for k in meta_params}
        return MetaGradient(loss.detach(), grads)


class _ImplicitRoot(torch.autograd.Function):
    """Returns the solver's solution; its backward is the implicit VJP (first order only:
    differentiating the backward again raises instead of dropping the implicit part, see
    :class:`_FirstOrderOnly`)."""

    @staticmethod
    def forward(ctx: Any, config: dict[str, Any], *tensors: torch.Tensor) -> Any:
        n = config["n_params"]
        ctx.config = config
        ctx.save_for_backward(*tensors)
        return tuple(t.detach().clone() for t in tensors[:n])

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor) -> Any:
        config = ctx.config
        n = config["n_params"]
        tensors = ctx.saved_tensors
        params = pytree.tree_unflatten(list(tensors[:n]), config["param_spec"])
        meta = pytree.tree_unflatten(list(tensors[n:]), config["meta_spec"])
        cotangent = pytree.tree_unflatten(
            [
                g if g is not None else torch.zeros_like(p)
                for g, p in zip(grad_outputs, tensors[:n], strict=True)
            ],
            config["param_spec"],
        )
        with torch.enable_grad():
            out = _implicit_vjp(
                config["inner_loss"],
                params,
                meta,
                cotangent,
                config["damping"],
                config["cg_iters"],
                config["tol"],
            )
        grads = pytree.tree_flatten(out, is_leaf=lambda x: x is None)[0]  # None: constants
        anchors = [t for t in (*tensors[n:], *grad_outputs) if t is not None and t.requires_grad]
        if torch.is_grad_enabled() and anchors:  # backward(create_graph=True)
            grads = [g if g is None else _FirstOrderOnly.apply(g, *anchors) for g in grads]
        return (None, *([None] * n), *grads)


class _FirstOrderOnly(torch.autograd.Function):
    """The identity on ``value``, attached to ``anchors`` (the tensors an implicit
    gradient depends on): differentiating through it raises, so a second derivative
    through :func:`implicit_root` fails instead of silently missing the implicit part."""

    @staticmethod
    def forward(ctx: Any, value: torch.Tensor, *anchors: torch.Tensor) -> torch.Tensor:
        return value.clone()

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor) -> Any:
        raise RuntimeError(
            "implicit_root's gradient is first-order only: it cannot be differentiated "
            "again (second derivatives through the implicit solve are not implemented)"
        )


def implicit_root(
    inner_loss: InnerLoss, cg_iters: int = 100, damping: float = 0.0, tol: float = 1e-12
) -> Callable[[Callable[..., Params]], Callable[..., Params]]:
    """Decorator: make a user's inner solver differentiable by implicit differentiation.

    The decorated ``solver(meta_params, *args, **kwargs) -> params`` may be anything
    (a loop of ``torch.optim`` steps, a closed form, L-BFGS); it runs with gradients
    enabled on detached ``meta_params``, and its result is detached (no graph through
    the solver is kept). ``params`` and ``meta_params`` may be any pytree of tensors (a
    dict, a tuple, nested containers, one tensor); ``inner_loss`` receives them in the
    same structure. ``params`` must be floating point (``TypeError`` otherwise);
    ``meta_params`` leaves that are not (an iteration count) are constants and get no
    gradient.
    The returned parameters carry gradients to the tensors in ``meta_params`` as if the
    solver had been differentiated through at its fixed point
    ``grad_theta inner_loss(params, meta_params) = 0``. First order only: a second
    derivative through the result (``create_graph=True`` then another backward) raises.

    Example:
        >>> @implicit_root(lambda w, mp: ((X @ w["w"] - y) ** 2).mean() + mp["l2"] * ...)
        ... def solve(mp):
        ...     return {"w": closed_form(mp["l2"])}
        >>> w = solve(meta_params)            # differentiable w.r.t. meta_params
    """
    cg_iters = _check_solver(cg_iters, damping, tol)

    def decorate(solver: Callable[..., Any]) -> Callable[..., Any]:
        def solve(meta_params: Any, *args: Any, **kwargs: Any) -> Any:
            meta_leaves, meta_spec = _tensor_leaves(meta_params, "meta_params")
            with torch.enable_grad():  # a loop of torch.optim steps needs autograd
                params = detach_tree(solver(detach_tree(meta_params), *args, **kwargs))
            leaves, spec = _tensor_leaves(params, "the solver's result")
            not_float = [
                f"leaf {i}: {x.dtype}" for i, x in enumerate(leaves) if not x.is_floating_point()
            ]
            if not_float:
                raise TypeError(
                    "the solver's result must hold floating-point tensors (the fixed point "
                    f"is differentiated), got {not_float}"
                )
            config = {
                "n_params": len(leaves),
                "param_spec": spec,
                "meta_spec": meta_spec,
                "inner_loss": inner_loss,
                "damping": damping,
                "cg_iters": cg_iters,
                "tol": tol,
            }
            out = _ImplicitRoot.apply(config, *leaves, *meta_leaves)
            return pytree.tree_unflatten(list(out), spec)

        solve.__doc__ = solver.__doc__
        solve.__name__ = getattr(solver, "__name__", "solve")
        return solve

    return decorate
