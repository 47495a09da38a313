"""The learned rule as one in-place pass per tensor: the fast path of
``LearnedOptimizer(compile=True)``.

:func:`fused_learned_step_` computes exactly what :func:`metaopt.learned.learned_rule`
computes, but writes the new parameters and Adam moments into the given tensors instead
of returning new ones, and takes the token statistics from Adam's moments updated *at the
sampled positions only*. Under ``torch.compile`` every parameter tensor is then read and
written once per step: Inductor fuses moment update, direction, gate, pull-back and the
parameter write into one loop, the way ``torch.optim.Adam(fused=True)`` does in C++.
Eagerly it runs too (the tests use that), only slower than the unfused eager rule.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from typing import Any

import torch

from metaopt._own_cache import INDUCTOR_OPTIONS, compile_own
from metaopt.learned.features import sample_columns, token_pieces
from metaopt.learned.network import TokenCoefficients
from metaopt.learned.rule import (
    TensorFields,
    TokenViews,
    coefficient_lists,
    direction_of,
    factored_moment,
    merged,
    pieces_of,
    token_views,
    updated_second_moment,
    wide_dtype,
)
from metaopt.learned.state import LearnedState, is_factored
from metaopt.rules.base import Scalar

__all__ = [
    "CPU_FUSED_OPTIONS",
    "compiled_fused_step",
    "fusable",
    "fused_core_",
    "fused_learned_step_",
]

CPU_FUSED_OPTIONS = {**INDUCTOR_OPTIONS, "cpp_wrapper": True}
"""Inductor options of :func:`compiled_fused_step` on CPU. ``cpp_wrapper``: the code that
calls the kernels is C++ too, not Python; the step is a few hundred small tensors and
views (every parameter, gradient and state buffer, their token views, the attention
network's ops), and building those in Python cost 0.3-0.4 ms per step, 14-21 % of a
compiled step at 100k-1M parameters (``docs/learned.md``). The cold compile time was
measured the same (kernels and wrapper go to one compiler call)."""


_CoreResult = list[torch.Tensor | None]
"""What :func:`fused_core_` returns: per tensor, the new row and column means of a
factored second moment, ``None`` for a dense one."""


def fusable(params: list[torch.Tensor], leaves: list[LearnedState]) -> bool:
    """Whether :func:`fused_learned_step_` can update these tensors in place: contiguous,
    non-empty parameters and moments (their ``[n_tokens, length]`` views must alias them;
    an empty tensor has no token, see :func:`metaopt.learned.learned_rule`) and no pending
    task boundary (fold it eagerly first, see :func:`metaopt.learned.fold_task`)."""
    if len(params) != len(leaves):
        raise ValueError(f"{len(params)} parameters but {len(leaves)} leaf states")
    # C-level maps: this runs at every step, over every tensor
    return (
        all(map(_numel, params))
        and all(map(_contiguous, params))
        and all(map(_contiguous, map(_EXP_AVG, leaves)))
        and all(map(_contiguous, map(_EXP_AVG_SQ, leaves)))
        and not any(map(_numel, map(_PENDING, leaves)))
    )


_numel = torch.Tensor.numel
_contiguous = torch.Tensor.is_contiguous
_data_ptr = torch.Tensor.data_ptr
_EXP_AVG = operator.attrgetter("exp_avg")
_EXP_AVG_SQ = operator.attrgetter("exp_avg_sq")
_PENDING = operator.attrgetter("pending")


def _sampled(x: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    return x.index_select(1, columns)


def fused_learned_step_(
    grads: list[torch.Tensor],
    params: list[torch.Tensor],
    leaves: list[LearnedState],
    run_net: Callable[[torch.Tensor, torch.Tensor], TokenCoefficients],
    *,
    lr: Scalar,
    b1: Scalar,
    b2: Scalar,
    eps: Scalar,
    max_block: int,
    sample_size: int,
    topk_fraction: float | None,
    net_dtype: torch.dtype,
    importance_free: bool,
    core: Callable[..., _CoreResult] | None = None,
    view_cache: dict[str, Any] | None = None,
) -> list[LearnedState]:
    """One learned-rule update written into ``params`` and the leaves' moments in place.

    Args:
        grads: the gradients, one per parameter (shapes of the parameters).
        params: the parameters (contiguous, see :func:`fusable`); updated in place.
        leaves: their :class:`LearnedState` (contiguous moments, no pending boundary);
            ``exp_avg`` and a dense ``exp_avg_sq`` are updated in place, and so are the
            ``step`` and ``task_step`` counters that are rows of a field stack kept in
            ``view_cache`` (those of the leaves this function returned, as
            ``torch.optim.Adam`` increments its ``step`` tensors in place).
        run_net: ``(tokens [T, F], task [F_task]) -> TokenCoefficients``.
        lr: learning rate (a number or a 0-d tensor).
        b1: Adam's first-moment decay rate (a number or a 0-d tensor).
        b2: Adam's second-moment decay rate (a number or a 0-d tensor).
        eps: Adam's denominator constant (a number or a 0-d tensor). Under
            ``torch.compile`` a number is a constant of the graph, a tensor an input:
            ``LearnedOptimizer`` passes tensors, so schedulers that change ``betas``
            (``OneCycleLR``) do not recompile.
        max_block: target elements per token (see :func:`metaopt.learned.learned_rule`).
        sample_size: elements sampled per token for its statistics.
        topk_fraction: hard selection of the fraction of tokens that move, or ``None``.
        net_dtype: the dtype the net computes in.
        importance_free: every importance buffer is zero (skip its terms).
        core: the arithmetic on the ``[n_tokens, length]`` views, ``fused_core_`` or a
            ``torch.compile`` of it (see :func:`compiled_fused_step`). The views are made
            here, outside it, so that a compiled core sees them as its inputs and loops
            over tokens and their elements (each token's coefficients then load once per
            token, not once per element).
        view_cache: a dict owned by the caller, reused across calls: the views of the
            parameters and state buffers are kept there and reused while those are the
            same tensors (a reshape per tensor and buffer costs more than the check).

    Returns:
        The leaves after the update: the given ones where nothing was stacked anew and
        the second moment is dense; otherwise with counters that are rows of a new
        field stack (the given counters are not changed) and a factored second moment's
        new row and column means.
    """
    if not fusable(params, leaves):
        raise ValueError(
            "fused_learned_step_ needs non-empty contiguous parameters and moments and no "
            "pending task boundary"
        )
    views, v_dense = _views(grads, params, leaves, max_block, view_cache)
    # the core sees each buffer once, as a view, and the small per-tensor fields stacked:
    # fewer inputs, cheaper guards and wrappers
    fields, leaves = _stacked_fields(leaves, view_cache)
    row_col = [s.exp_avg_sq if is_factored(s) else None for s in leaves]
    factored_sq = (core or fused_core_)(
        views,
        v_dense,
        row_col,
        fields,
        [tuple(p.shape) for p in params],
        run_net,
        lr=lr,
        b1=b1,
        b2=b2,
        eps=eps,
        sample_size=sample_size,
        topk_fraction=topk_fraction,
        net_dtype=net_dtype,
        importance_free=importance_free,
    )
    # dense leaves are unchanged objects: their moments and counters moved in place
    return [
        s if f is None else s._replace(exp_avg_sq=f)
        for s, f in zip(leaves, factored_sq, strict=True)
    ]


def _stacked_fields(
    leaves: list[LearnedState], cache: dict[str, Any] | None
) -> tuple[TensorFields, list[LearnedState]]:
    """:func:`~metaopt.learned.rule.stacked_fields`, reusing the stacks of the previous
    call where the leaves still hold the very tensors that call left in them.

    Those tensors are views of the stacks (a field stacked here is handed back as rows
    of its stack, and the step updates the ``step`` and ``task_step`` stacks in place),
    so an in-place edit of one, e.g. ``optimizer.state[p]["task_index"].fill_(2)``, is
    seen by the cached stack. A field whose tensors were replaced (``load_state_dict``,
    ``new_task``, a loss observed, an emptied state) or given other storage
    (``t.data = x``) is stacked again.

    Returns:
        The stacked fields and the leaves (fields stacked anew replaced by their rows).
    """
    cached = cache.setdefault("fields", {}) if cache is not None else {}
    stacks = []
    for name in TensorFields._fields:
        per_leaf = list(map(operator.attrgetter(name), leaves))
        hit = cached.get(name)
        if hit is not None and len(hit[1]) == len(per_leaf):
            stacked, rows, addresses = hit
            if all(map(operator.is_, rows, per_leaf)) and addresses == tuple(
                map(_data_ptr, per_leaf)
            ):
                stacks.append(stacked)
                continue
        stacked = torch.stack(per_leaf)
        stacks.append(stacked)
        rows = stacked.unbind(0)
        leaves = [s._replace(**{name: r}) for s, r in zip(leaves, rows, strict=True)]
        if cache is not None:
            cached[name] = (stacked, rows, tuple(map(_data_ptr, rows)))
    return TensorFields(*stacks), leaves


def _views(
    grads: list[torch.Tensor],
    params: list[torch.Tensor],
    leaves: list[LearnedState],
    max_block: int,
    cache: dict[str, Any] | None,
) -> tuple[TokenViews, list[torch.Tensor | None]]:
    """:func:`token_views` and the dense second moments' views, from ``cache`` where the
    parameters and buffers are the tensors of the previous call, on the same storages (the
    cache holds them and the views, so neither their ids nor those storages' addresses
    can be reused by other tensors meanwhile)."""
    held = (
        *params,
        *(s.exp_avg for s in leaves),
        *(s.exp_avg_sq for s in leaves),
        *(s.anchor for s in leaves),
        *(s.importance for s in leaves),
    )
    # the storages too: `p.data = x` keeps the tensor object (and its id) but not the
    # storage the cached views point into
    key = (max_block, *map(id, held), *map(_data_ptr, held))
    if cache is not None and cache.get("key") == key:
        views, v_dense = cache["views"], cache["v_dense"]
        return views._replace(grads=pieces_of(grads, views.layouts)), v_dense
    views = token_views(grads, params, leaves, max_block)
    v_dense = [
        piece
        for s, lay in zip(leaves, views.layouts, strict=True)
        for piece in (
            [None] * len(lay.segments) if is_factored(s) else token_pieces(s.exp_avg_sq, lay)
        )
    ]
    if cache is not None:  # without the gradients: they are new tensors at every step
        cache.clear()
        cache.update(key=key, held=held, views=views._replace(grads=[]), v_dense=v_dense)
    return views, v_dense


def compiled_fused_step(
    device_type: str = "cpu", **compile_options: Any
) -> Callable[..., list[LearnedState]]:
    """:func:`fused_learned_step_` with its core compiled by ``torch.compile``
    (``fullgraph=True`` unless ``compile_options`` say otherwise).

    ``b1``, ``b2`` and ``eps`` given as 0-d tensors of one dtype enter the compiled core
    stacked into one ``[3]`` tensor. Dynamo gives every 0-d float64 (or integer) CPU input
    a symbolic ``.item()``; the three that Adam's hyper-parameters made (float64, so
    ``1 - b2`` rounds as with Python floats) were then not turned back into tensor
    operations, and Dynamo traced the whole step a second time with them specialised
    ("Restarting analysis due to ... _tensorify_python_scalars"; a 49-tensor
    transformer's first graph compiled in 156 s with it, 134 s without, see
    ``docs/learned.md``). The values stay graph inputs either way.

    Args:
        device_type: the parameters' device type; on ``"cpu"`` Inductor gets
            :data:`CPU_FUSED_OPTIONS` unless ``compile_options`` name ``options``,
            ``mode`` or another backend.
        **compile_options: keyword arguments of ``torch.compile``.
    """
    compiled = compile_own(
        _unpacking_core,
        default_options=CPU_FUSED_OPTIONS if device_type == "cpu" else INDUCTOR_OPTIONS,
        **{"fullgraph": True, **compile_options},
    )

    def core(*args: Any, b1: Scalar, b2: Scalar, eps: Scalar, **kwargs: Any) -> _CoreResult:
        adam: tuple[Scalar, Scalar, Scalar] | torch.Tensor = (b1, b2, eps)
        if all(isinstance(x, torch.Tensor) and x.ndim == 0 for x in adam):
            adam = torch.stack(adam)  # type: ignore[arg-type]
        return compiled(*args, adam=adam, **kwargs)

    return functools.partial(fused_learned_step_, core=core)


def _unpacking_core(
    *args: Any, adam: tuple[Scalar, Scalar, Scalar] | torch.Tensor, **kwargs: Any
) -> _CoreResult:
    """:func:`fused_core_` with ``(b1, b2, eps)`` given together, as a tuple or a ``[3]``
    tensor (see :func:`compiled_fused_step`)."""
    b1, b2, eps = adam.unbind(0) if isinstance(adam, torch.Tensor) else adam
    return fused_core_(*args, b1=b1, b2=b2, eps=eps, **kwargs)


def fused_core_(
    views: TokenViews,
    v_dense: list[torch.Tensor | None],
    row_col: list[torch.Tensor | None],
    fields: TensorFields,
    shapes: list[tuple[int, ...]],
    run_net: Callable[[torch.Tensor, torch.Tensor], TokenCoefficients],
    *,
    lr: Scalar,
    b1: Scalar,
    b2: Scalar,
    eps: Scalar,
    sample_size: int,
    topk_fraction: float | None,
    net_dtype: torch.dtype,
    importance_free: bool,
) -> _CoreResult:
    """The arithmetic of :func:`fused_learned_step_` on ``[n_tokens, length]`` views.

    Args:
        views: gradients, parameters, first moments, anchors and importances as token
            views (pieces, see :class:`~metaopt.learned.rule.TokenViews`).
        v_dense: the dense second moments' pieces, ``None`` for those of factored ones.
        row_col: the row and column means of the factored second moments, ``None`` for
            dense ones.
        fields: the states' counters, loss statistics and descriptors.
        shapes: the parameters' shapes.
        run_net: as in :func:`fused_learned_step_`.
        lr: as in :func:`fused_learned_step_`.
        b1: as in :func:`fused_learned_step_`.
        b2: as in :func:`fused_learned_step_`.
        eps: as in :func:`fused_learned_step_`.
        sample_size: as in :func:`fused_learned_step_`.
        topk_fraction: as in :func:`fused_learned_step_`.
        net_dtype: as in :func:`fused_learned_step_`.
        importance_free: as in :func:`fused_learned_step_`.

    Returns:
        Per tensor, the new row and column means of a factored second moment (``None``
        for a dense one). The step counters ``fields.step`` and ``fields.task_step`` are
        incremented in place.
    """
    device = views.grads[0].device
    columns = [sample_columns(g.shape[1], sample_size, device) for g in views.grads]
    # factored second moments: new row and column means and the full moment, now
    v_full: list[torch.Tensor | None] = []
    v_state: list[torch.Tensor | None] = []
    whole_grads = merged(views.grads, views.layouts, shapes)
    for old, lay, g in zip(row_col, views.layouts, whole_grads, strict=True):
        if old is not None:
            new, full = factored_moment(g, old, b2)
            v_full.extend(token_pieces(full, lay))
            v_state.append(new)
        else:
            v_full.extend([None] * len(lay.segments))
            v_state.append(None)

    # the updated moments at the sampled positions only (the same formulas as the pass)
    g_s, m_s, v_s = [], [], []
    for g, m, v, full, col in zip(
        views.grads, views.exp_avg, v_dense, v_full, columns, strict=True
    ):
        gc = _sampled(g, col)
        g_s.append(gc)
        m_s.append(torch.lerp(_sampled(m, col), gc, 1.0 - b1))
        v_s.append(
            updated_second_moment(_sampled(v, col), gc, b2)
            if v is not None
            else _sampled(full, col)
        )
    w_s = [_sampled(w, col) for w, col in zip(views.params, columns, strict=True)]
    a_s = [_sampled(a, col) for a, col in zip(views.anchor, columns, strict=True)]
    i_s = [_sampled(i, col) for i, col in zip(views.importance, columns, strict=True)]
    samples = tuple(torch.cat(x).to(net_dtype) for x in (g_s, m_s, v_s, w_s, a_s, i_s))
    wide = wide_dtype(views.params)
    coefficients, steps, _ = coefficient_lists(
        views,
        fields,
        samples,
        run_net,
        lr=lr,
        b1=b1,
        b2=b2,
        eps=eps,
        topk_fraction=topk_fraction,
        net_dtype=net_dtype,
        wide=wide,
    )

    # the pass: one read and one write of every parameter and moment
    per_tensor = zip(
        views.grads,
        views.params,
        views.exp_avg,
        v_dense,
        v_full,
        views.anchor,
        views.importance,
        zip(*coefficients, strict=True),
        strict=True,
    )
    for g, w, m, v, full, anchor, imp, c in per_tensor:
        m_new = torch.lerp(m, g, 1.0 - b1)
        v_new = updated_second_moment(v, g, b2) if v is not None else full
        update = direction_of(g, w, m_new, v_new, anchor, imp, list(c), importance_free)
        m.copy_(m_new)
        if v is not None:
            v.copy_(v_new)
        w.add_(update)
    # the counters, in place: the leaves' counters are rows of these stacks
    fields.step.copy_(steps)
    fields.task_step.add_(1.0)
    return v_state
