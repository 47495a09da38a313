"""The learned update rule: Adam-anchored, conditioned on attention across tensor tokens.

One ``update`` call:

1. updates Adam's moments of every parameter (``torch._foreach`` ops over all tensors);
2. builds one token per tensor (or row block) from a fixed subsample of its gradient,
   moments, value, drift since the task's start and importance, plus its static shape
   descriptor, and a task token from the loss statistics and task counters;
3. runs :class:`~metaopt.learned.network.LearnedRuleNet` over the tokens to get
   per-token coefficients (:class:`~metaopt.learned.network.TokenCoefficients`);
4. applies them element-wise (autograd off: about twenty in-place ``torch._foreach``
   passes; autograd on: once over the concatenation of all tensors, see
   ``_flat_step``)::

       u = -lr * gate / (1 + lambda * imp) * (exp(s) * m_hat / (sqrt(v_hat) + eps)
               + a * g / (sqrt(v_hat) + eps) + b * w / rms_w + c * (w - anchor) / rms_w)
           - min(1, rho * imp) * (w - anchor)

With the net's zero-initialised output layer, ``s = a = b = c = lambda = rho = 0`` and
``gate = 1``: the update is exactly Adam's.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch.func import functional_call

from metaopt.learned.features import (
    Layout,
    constant_on,
    layout_of,
    param_reference,
    sample_columns,
    task_features,
    token_pieces,
    token_statistics,
    uncached_when_compiling,
)
from metaopt.learned.network import LearnedRuleNet, TokenCoefficients
from metaopt.learned.state import LearnedState, factored_shape, init_leaf, is_factored
from metaopt.learned.tasks import check_importance, fold_task
from metaopt.rules.base import (
    Scalar,
    State,
    UpdateRule,
    _check_state_keys,
    _scalar,
    bias_corrections,
)
from metaopt.tree import named_leaves, rebuild

__all__ = ["DepthFn", "learned_rule"]

DepthFn = Callable[[str, torch.Tensor], float]
"""``(key, param) -> depth in [0, 1]``: where a parameter sits in its model."""

_TINY = 1e-30


def _check_options(
    lr: Any,
    betas: Any,
    eps: Scalar,
    max_block: int,
    sample_size: int,
    topk_fraction: float | None,
    aux_dtype: torch.dtype | None,
) -> None:
    if isinstance(lr, (int, float)) and not lr >= 0:
        raise ValueError(f"invalid learning rate: {lr} (must be >= 0)")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"invalid betas: {betas} (two values in [0, 1))")
    if not eps >= 0:
        raise ValueError(f"invalid eps: {eps} (must be >= 0)")
    for name, value in (("max_block", max_block), ("sample_size", sample_size)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if max_block < 1 or sample_size < 1:
        raise ValueError(f"max_block ({max_block}) and sample_size ({sample_size}) must be >= 1")
    if topk_fraction is not None and not 0.0 < topk_fraction <= 1.0:
        raise ValueError(f"topk_fraction must be in (0, 1], got {topk_fraction}")
    if aux_dtype is not None and not isinstance(aux_dtype, torch.dtype):
        raise TypeError(f"aux_dtype must be a torch.dtype (torch.bfloat16), got {aux_dtype!r}")
    if aux_dtype is not None and not aux_dtype.is_floating_point:
        raise ValueError(f"aux_dtype must be a floating dtype, got {aux_dtype}")


def _depth_function(depth: DepthFn | Mapping[str, float] | None, keys: list[str]) -> DepthFn:
    if callable(depth):
        return depth
    if depth is not None:
        return lambda key, p: float(depth.get(key, 0.5))
    position = {key: i / (len(keys) - 1) if len(keys) > 1 else 0.5 for i, key in enumerate(keys)}
    return lambda key, p: position[key]


def learned_rule(
    net: LearnedRuleNet,
    lr: Scalar = 1e-3,
    *,
    meta_params: Mapping[str, torch.Tensor] | None = None,
    betas: tuple[Scalar, Scalar] = (0.9, 0.999),
    eps: Scalar = 1e-8,
    max_block: int = 65536,
    sample_size: int = 32,
    aux_dtype: torch.dtype | None = torch.bfloat16,
    importance: str = "path",
    topk_fraction: float | None = None,
    depth: DepthFn | Mapping[str, float] | None = None,
    inplace_state: bool = False,
    workspace: dict[Any, list[torch.Tensor]] | None = None,
    importance_free: bool = False,
    factored: bool = False,
) -> UpdateRule:
    """The attention-based learned rule as a pure :class:`~metaopt.rules.UpdateRule`.

    Args:
        net: the meta-parameters (a :class:`LearnedRuleNet`).
        lr: learning rate (a number or a 0-d tensor), the scale of Adam's step.
        meta_params: ``{name: tensor}`` replacing ``net``'s parameters through
            ``torch.func.functional_call`` (gradients then flow to these tensors); every
            name must be one of ``net``'s parameters or buffers (``ValueError``).
        betas: Adam's moment decay rates (numbers or 0-d tensors; tensors that require
            grad receive meta-gradients).
        eps: Adam's denominator constant (a number or a 0-d tensor).
        max_block: target size of a token (larger tensors are split into equal blocks
            of at most about this many elements, see
            :func:`metaopt.learned.features.layout_of`).
        sample_size: elements sampled per token to compute its statistics.
        aux_dtype: dtype of the anchor and importance buffers (``None``: the parameter's).
        importance: how a finished task's importance is scored, one of
            :data:`metaopt.learned.tasks.IMPORTANCE_KINDS` (used for pending boundaries).
        topk_fraction: if set, only the ``ceil(topk_fraction * T)`` tokens with the largest
            gates move in each update (hard selection); the others get gate 0. Tokens are
            ranked by the gate before its clamp to [0, 1] (``TokenCoefficients.gate_score``),
            so the selection does not depend on the order of the parameters; tokens with
            equal scores all move.
        depth: each parameter's depth in [0, 1] (a ``{key: depth}`` mapping or a
            ``(key, param) -> depth`` function); default: position in ``init``'s tree.
        inplace_state: with autograd off, update Adam's moment buffers of the given state
            in place (as ``torch.optim.Adam`` does) instead of returning new ones. Saves two
            allocations per tensor; only for callers that own the state and discard the old
            one (``LearnedOptimizer``). Ignored when autograd is on.
        workspace: with autograd off, a dict the rule keeps two scratch buffers per tensor
            in (for the last few distinct parameter lists), reused across calls: saves
            allocating and first-touching fresh memory, the main eager cost. The returned
            updates then live in it and are valid until the next call. Ignored when
            autograd is on.
        importance_free: the caller guarantees that every importance buffer is zero (no
            task boundary yet): the importance gate (a division by 1) and the pull-back
            (0) are skipped, a third of the element-wise passes. Ignored in an update
            that resolves a pending boundary.
        factored: keep the second moment of every tensor with ``ndim >= 2`` as row and
            column averages (Adafactor; ``v_ij ~ r_i c_j / mean(r)``): float32 state drops
            from 1.5x to about 1x Adam's bytes. The rule then equals Adam at
            initialisation only where ``g^2`` is rank one. Off by default.

    Returns:
        ``UpdateRule`` whose ``update(grads, state, params)`` requires ``params``. A
        ``None`` gradient skips its parameter (update ``None``, state kept, no token), as
        ``torch.optim`` does; an empty tensor gets an empty update and no token.
    """
    lr = _scalar("lr", lr)  # a tensor of several elements would broadcast over tokens
    _check_options(lr, betas, eps, max_block, sample_size, topk_fraction, aux_dtype)
    check_importance(importance)
    meta_params = _checked_meta_params(net, meta_params)
    b1, b2 = betas

    def init(params: Any) -> State:
        items = named_leaves(params)
        depth_of = _depth_function(depth, [key for key, _ in items])
        return {key: init_leaf(key, p, depth_of(key, p), aux_dtype, factored) for key, p in items}

    def run_net(tokens: torch.Tensor, task: torch.Tensor) -> TokenCoefficients:
        return run_on_net_device(net, meta_params, tokens, task)

    def update(grads: Any, state: State, params: Any | None = None) -> tuple[Any, State]:
        items = named_leaves(grads)
        keys = [key for key, _ in items]
        _check_state_keys(keys, state, "learned_rule")
        if params is None:
            raise ValueError("learned_rule needs params: call update(grads, state, params)")
        param_of = dict(named_leaves(params))
        missing = [k for k in keys if k not in param_of]
        if missing:
            raise ValueError(f"learned_rule: params lack the keys {missing}")
        updates: dict[str, torch.Tensor | None] = {}
        new_state: State = {}
        active: list[str] = []  # the keys that get tokens: gradients with elements
        leaves: list[LearnedState] = []
        folded = False
        for key, g in items:
            leaf = state[key]
            if not isinstance(leaf, LearnedState):
                raise TypeError(f"learned_rule: state[{key!r}] is not a LearnedState")
            if g is None:  # no gradient: skipped, as torch.optim skips such a parameter
                updates[key], new_state[key] = None, leaf
                continue
            if leaf.exp_avg.shape != g.shape:
                raise ValueError(
                    f"learned_rule: gradient of {key!r} has shape {tuple(g.shape)}, "
                    f"the state {tuple(leaf.exp_avg.shape)}"
                )
            if leaf.pending.numel():  # a boundary marked by new_task(state) without params
                leaf = fold_task(leaf, param_of[key], importance)
                folded = True
            if not g.numel():  # an empty tensor: nothing to update and no token; counted
                updates[key] = torch.zeros_like(g)
                new_state[key] = leaf._replace(step=leaf.step + 1, task_step=leaf.task_step + 1)
                continue
            active.append(key)
            leaves.append(leaf)
        if active:
            grad_of = dict(items)
            options = _StepOptions(
                lr, b1, b2, eps, max_block, sample_size, topk_fraction,
                net_dtype_of(net, meta_params),
            )
            args = ([grad_of[k] for k in active], [param_of[k] for k in active], leaves)
            free = importance_free and not folded
            if torch.is_grad_enabled() and _flattenable(*args):
                active_updates, new_leaves = _flat_step(*args, run_net, options, free)
            else:
                active_updates, new_leaves = _learned_step(
                    *args, run_net, options, inplace_state, workspace, free
                )
            updates.update(zip(active, active_updates, strict=True))
            new_state.update(zip(active, new_leaves, strict=True))
        return rebuild(grads, [updates[k] for k in keys]), {k: new_state[k] for k in keys}

    def fold_pending(state: State, params: Any) -> State:
        """``state`` with the pending task boundaries (``new_task(state)`` without
        parameters) of the parameters in ``params`` folded now, at their values there,
        with this rule's ``importance`` score: what the next ``update`` does first for a
        parameter that gets a gradient. Lets a caller fold outside a compiled update,
        which then meets no pending boundary (one graph instead of two, see
        :class:`metaopt.meta.compiled.CompiledContinualSteps`). Attached to the rule as
        ``learned_rule(...).update.fold_pending``."""
        param_of = dict(named_leaves(params))
        return {
            key: fold_task(leaf, param_of[key], importance)
            if isinstance(leaf, LearnedState) and leaf.pending.numel() and key in param_of
            else leaf
            for key, leaf in state.items()
        }

    update.fold_pending = fold_pending  # type: ignore[attr-defined]
    return UpdateRule(init, update)


def _checked_meta_params(
    net: LearnedRuleNet, meta_params: Mapping[str, torch.Tensor] | None
) -> Mapping[str, torch.Tensor] | None:
    """``meta_params``, or ``None`` when it replaces nothing (empty).

    Raises:
        ValueError: a name is none of ``net``'s parameters and buffers (``functional_call``
            would ignore it, and its gradient would silently stay ``None``).
    """
    if meta_params is None:
        return None
    known = {name for name, _ in net.named_parameters()} | {n for n, _ in net.named_buffers()}
    unknown = sorted(set(meta_params) - known)
    if unknown:
        raise ValueError(
            f"learned_rule: meta_params names {unknown} are not parameters of the net "
            f"(it has {sorted(known)})"
        )
    return meta_params if len(meta_params) else None


def run_on_net_device(
    net: LearnedRuleNet,
    meta_params: Mapping[str, torch.Tensor] | None,
    tokens: torch.Tensor,
    task: torch.Tensor,
) -> TokenCoefficients:
    """``net(tokens, task)`` (with ``meta_params`` through ``functional_call`` when given)
    on the net's own device; the coefficients come back to the tokens' device.

    Tokens on the ``meta`` device (parameters on ``meta``: shapes only, no values to copy
    to the net) run through a ``meta`` copy of the net's parameters and buffers instead.
    """
    if tokens.device.type == "meta":
        tensors = (
            dict(meta_params)
            if meta_params is not None
            else {
                **dict(net.named_parameters()),
                **dict(net.named_buffers()),
            }
        )
        on_meta = {name: t.to("meta") for name, t in tensors.items()}
        return TokenCoefficients(*functional_call(net, on_meta, (tokens, task.to("meta"))))
    source = meta_params.values() if meta_params is not None else net.parameters()
    net_device = next(iter(source)).device
    inputs = (tokens.to(net_device), task.to(net_device))
    if meta_params is None:
        coef = net(*inputs)
    else:
        coef = functional_call(net, dict(meta_params), inputs)
    return TokenCoefficients(*(c.to(tokens.device) for c in coef))


def wide_dtype(tensors: list[torch.Tensor]) -> torch.dtype:
    """float64 when any of ``tensors`` is float64, else float32: the dtype the rule's
    per-tensor coefficient arithmetic runs in."""
    return torch.float64 if any(x.dtype == torch.float64 for x in tensors) else torch.float32


def net_dtype_of(
    net: LearnedRuleNet, meta_params: Mapping[str, torch.Tensor] | None
) -> torch.dtype:
    """The dtype the net computes in (its, or the replacing meta-parameters')."""
    source = meta_params.values() if meta_params is not None else net.parameters()
    return next(iter(source)).dtype


def _samples(
    buffers: list[torch.Tensor], columns: list[torch.Tensor], dtype: torch.dtype
) -> torch.Tensor:
    """``[T, S]``: the sampled columns of every tensor's ``[n_tokens, length]`` view."""
    return torch.cat([x.index_select(1, c) for x, c in zip(buffers, columns, strict=True)]).to(
        dtype
    )


def direction_of(
    g: torch.Tensor,
    w: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    anchor: torch.Tensor,
    imp: torch.Tensor,
    c: list[torch.Tensor],
    importance_free: bool,
) -> torch.Tensor:
    """The per-element update of one tensor, out of place (differentiable).

    Args:
        g: the gradient as a ``[n_tokens, length]`` view.
        w: the parameter, same view.
        m: the updated first moment, same view.
        v: the updated second moment, same view.
        anchor: the anchor (``aux_dtype``), same view.
        imp: the importance (``aux_dtype``), same view.
        c: the seven per-token coefficients ``[n_tokens, 1]`` (see ``coefficient_lists``).
        importance_free: every importance is 0: skip the terms that vanish then.

    Returns:
        ``[n_tokens, length]`` update in the parameter's dtype.
    """
    c_m, c_g, c_w, c_d, c_lam, c_rho, c_eps = c
    anchor = anchor.to(w.dtype)
    # v floored at a tiny number: same values, finite d sqrt(v)/dv where v == 0 (meta-grads)
    denom = v.clamp_min(_TINY).sqrt() + c_eps
    drift = w - anchor
    direction = (m * c_m + g * c_g) / denom + w * c_w + drift * c_d
    if importance_free:  # imp == 0: the gate divides by 1 and the pull-back is 0
        return direction
    imp = imp.to(w.dtype)
    # soft gate 1 / (1 + lambda * imp); pull-back fraction min(1, rho * imp) per element,
    # which never overshoots the anchor
    return direction / (imp * c_lam + 1.0) - (imp * c_rho).clamp_max(1.0) * drift


_WORKSPACE_ENTRIES = 4
"""Most tensor-list signatures a workspace keeps buffers for (least recently used go)."""


def _scratch(
    workspace: dict[Any, list[torch.Tensor]] | None, name: str, like: list[torch.Tensor]
) -> list[torch.Tensor]:
    """Buffers shaped like ``like``: reused from ``workspace`` (keyed by ``name`` and the
    shapes, dtypes and devices of ``like``), else new."""
    if workspace is None:
        return [torch.empty_like(x) for x in like]
    key = (name, *((x.shape, x.dtype, x.device) for x in like))
    held = workspace.pop(key, None)
    if held is None:
        held = [torch.empty_like(x) for x in like]
    workspace[key] = held  # most recently used last
    while len(workspace) > 2 * _WORKSPACE_ENTRIES:
        workspace.pop(next(iter(workspace)))
    return held


def _elementwise_no_grad(
    g: list[torch.Tensor],
    w: list[torch.Tensor],
    m: list[torch.Tensor],
    v: list[torch.Tensor],
    anchor: list[torch.Tensor],
    imp: list[torch.Tensor],
    c: list[list[torch.Tensor]],
    workspace: dict[Any, list[torch.Tensor]] | None,
    importance_free: bool,
) -> list[torch.Tensor]:
    """The same arithmetic as :func:`direction_of` (over lists) with autograd off, in
    place on two buffers per tensor (from ``workspace`` when given: first-touching fresh
    memory costs more than several passes over it). The result lives in
    ``workspace["out"]``."""
    c_m, c_g, c_w, c_d, c_lam, c_rho, c_eps = c
    out = _scratch(workspace, "out", w)
    tmp = _scratch(workspace, "tmp", w)
    for o, t, m_i, v_i, c_i in zip(out, tmp, m, v, c_m, strict=True):
        torch.mul(m_i, c_i, out=o)  # one pass each, where copy + in-place op take two
        torch.sqrt(v_i, out=t)
    torch._foreach_addcmul_(out, g, c_g)
    torch._foreach_add_(tmp, c_eps)
    torch._foreach_div_(out, tmp)  # gate-free direction, Adam's at init
    torch._foreach_addcmul_(out, w, c_w)
    torch._foreach_copy_(tmp, anchor)  # converts from the auxiliary dtype
    torch._foreach_sub_(tmp, w)  # anchor - w
    torch._foreach_addcmul_(out, tmp, torch._foreach_neg(c_d))
    if importance_free:  # imp == 0: the gate divides by 1 and the pull-back is 0
        return out
    torch._foreach_copy_(tmp, imp)
    torch._foreach_mul_(tmp, c_lam)
    torch._foreach_add_(tmp, 1.0)
    torch._foreach_div_(out, tmp)  # soft gate 1 / (1 + lambda * importance)
    torch._foreach_copy_(tmp, imp)
    torch._foreach_mul_(tmp, c_rho)
    torch._foreach_clamp_max_(tmp, 1.0)  # pull-back fraction min(1, rho * imp)
    torch._foreach_addcmul_(out, tmp, w, value=-1.0)
    torch._foreach_addcmul_(out, tmp, anchor)  # - min(1, rho * imp) * (w - anchor)
    return out


def factored_moment(
    grad: torch.Tensor, row_col: torch.Tensor, b2: Scalar
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adafactor's second moment: updated ``[rows + cols]`` row and column means of
    ``g^2``, and the full ``v_ij = r_i c_j / mean(r)`` they stand for (shape of ``grad``)."""
    rows, cols = factored_shape(grad.shape)
    g2 = (grad * grad).reshape(rows, cols)
    row = b2 * row_col[:rows] + (1.0 - b2) * g2.mean(1)
    col = b2 * row_col[rows:] + (1.0 - b2) * g2.mean(0)
    full = torch.outer(row, col) / row.mean().clamp_min(_TINY)
    return torch.cat([row, col]), full.reshape(grad.shape)


class TokenViews(NamedTuple):
    """One update's tensors as token views (see ``layout_of``): per tensor, one
    ``[n_tokens, length]`` view and, for a tensor whose layout has a tail token, a
    ``[1, tail]`` view after it. The lists hold these pieces, tensor after tensor."""

    layouts: list[Layout]  # one per tensor
    counts: list[int]  # tokens per piece
    grads: list[torch.Tensor]
    params: list[torch.Tensor]
    exp_avg: list[torch.Tensor]
    anchor: list[torch.Tensor]
    importance: list[torch.Tensor]

    @property
    def tensor_counts(self) -> list[int]:
        """Tokens per tensor (its pieces' together)."""
        return [lay.total_tokens for lay in self.layouts]


def token_layouts(grads: list[torch.Tensor], max_block: int) -> list[Layout]:
    """Each tensor's token layout (:func:`~metaopt.learned.features.layout_of`, rows of
    its leading dimension preferred)."""
    return [
        uncached_when_compiling(layout_of)(g.numel(), max_block, g.shape[0] if g.ndim else 1)
        for g in grads
    ]


def pieces_of(tensors: list[torch.Tensor], layouts: list[Layout]) -> list[torch.Tensor]:
    """Every tensor's token views (:func:`~metaopt.learned.features.token_pieces`), in one
    list."""
    return [
        piece for x, lay in zip(tensors, layouts, strict=True) for piece in token_pieces(x, lay)
    ]


def piece_owners(layouts: list[Layout]) -> list[int]:
    """The tensor each piece of :func:`pieces_of` belongs to."""
    return [i for i, lay in enumerate(layouts) for _ in lay.segments]


def merged(
    pieces: list[torch.Tensor], layouts: list[Layout], shapes: list[tuple[int, ...]]
) -> list[torch.Tensor]:
    """Per-piece tensors (as :func:`pieces_of` lists them) back as one tensor each, of the
    given shapes: a view of a tensor's one piece, a concatenation of its two."""
    if len(pieces) == len(shapes):  # no tail token anywhere
        return [x.reshape(shape) for x, shape in zip(pieces, shapes, strict=True)]
    out, start = [], 0
    for lay, shape in zip(layouts, shapes, strict=True):
        own = pieces[start : start + len(lay.segments)]
        start += len(own)
        whole = own[0] if len(own) == 1 else torch.cat([x.reshape(-1) for x in own])
        out.append(whole.reshape(shape))
    return out


def token_views(
    grads: list[torch.Tensor],
    params: list[torch.Tensor],
    leaves: list[LearnedState],
    max_block: int,
) -> TokenViews:
    """Each tensor's token layout and its gradient, parameter, first moment, anchor and
    importance as token views (reshapes; views of contiguous tensors)."""
    layouts = token_layouts(grads, max_block)
    return TokenViews(
        layouts,
        [rows for lay in layouts for rows, _ in lay.segments],
        pieces_of(grads, layouts),
        pieces_of(params, layouts),
        pieces_of([s.exp_avg for s in leaves], layouts),
        pieces_of([s.anchor for s in leaves], layouts),
        pieces_of([s.importance for s in leaves], layouts),
    )


class TensorFields(NamedTuple):
    """The per-tensor fields of ``n`` leaves, stacked (one input each for a compiled
    function instead of ``n``)."""

    step: torch.Tensor  # [n]
    task_step: torch.Tensor  # [n]
    task_index: torch.Tensor  # [n]
    loss_stats: torch.Tensor  # [n, len(LOSS_STATS)]
    descriptor: torch.Tensor  # [n, N_STATIC_FEATURES]


def stacked_fields(leaves: list[LearnedState]) -> TensorFields:
    """The leaves' per-tensor fields as :class:`TensorFields`."""
    return TensorFields(
        *(torch.stack([getattr(s, f) for s in leaves]) for f in TensorFields._fields)
    )


@functools.lru_cache(maxsize=1024)
def _token_owner_cpu(counts: tuple[int, ...]) -> torch.Tensor:
    """``[sum(counts)]`` int64: the tensor each token belongs to (``counts[i]`` tokens of
    tensor ``i``). Built from Python integers, so under ``torch.compile`` it is a constant
    of the graph and a per-tensor value spread over the tokens is a gather fused into its
    consumer. (Built with ``repeat_interleave``, it was an operation of the compiled graph
    run at every step, with an output size known only then.)"""
    owners = [i for i, count in enumerate(counts) for _ in range(count)]
    return torch.tensor(owners, dtype=torch.long)


def coefficient_table(
    counts: list[int],
    fields: TensorFields,
    samples: tuple[torch.Tensor, ...],
    run_net: Callable[[torch.Tensor, torch.Tensor], TokenCoefficients],
    *,
    lr: Scalar,
    b1: Scalar,
    b2: Scalar,
    eps: Scalar,
    topk_fraction: float | None,
    net_dtype: torch.dtype,
    wide: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens -> attention -> the per-token coefficients (steps 2 and 3 of the module
    docstring).

    Args:
        counts: each tensor's number of tokens (``T = sum(counts)``).
        fields: the states' counters, loss statistics and descriptors.
        samples: ``(g, m, v, w, anchor, importance)``, each ``[T, S]`` in ``net_dtype``,
            with ``m, v`` the updated moments.
        wide: float64 when a parameter is float64, else float32.

    Returns:
        ``[T, 7]`` coefficients (x m, x g, x w, x drift, lambda, rho, eps; see
        :func:`direction_of`) in ``promote_types(wide, net_dtype)``; the new step
        counters ``[n tensors]`` and the current in-task steps ``[n tensors]``.
    """
    steps = fields.step + 1.0
    bc1, bc2 = bias_corrections(b1, b2, steps.to(wide))  # [n tensors] each
    owner = constant_on(steps.device, _token_owner_cpu, tuple(counts))

    def per_token(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return x.to(dtype).index_select(0, owner)

    g_s, m_s, v_s, w_s, a_s, i_s = samples
    stats = token_statistics(
        g_s,
        m_s,
        v_s,
        w_s,
        a_s,
        i_s,
        bias_correction1=per_token(bc1, net_dtype)[:, None],
        bias_correction2=per_token(bc2, net_dtype)[:, None],
        lr=lr,
        eps=eps,
    )
    static = per_token(fields.descriptor, net_dtype)
    tokens = torch.cat([stats, static], dim=1)
    task_steps = fields.task_step
    task = task_features(
        fields.task_index.mean().to(net_dtype),
        task_steps.mean().to(net_dtype),
        fields.loss_stats.mean(0).to(net_dtype),
    )

    # 3. attention across tokens -> per-token coefficients
    coef = run_net(tokens, task)
    gate = coef.gate
    if topk_fraction is not None:
        # ranked by the unclamped gate: saturated gates tie at 1, and topk would break
        # those ties by the order of the parameters; equal scores (equal tokens) all move
        score = coef.gate_score
        kth_largest = torch.topk(score, max(1, math.ceil(topk_fraction * score.numel()))).values
        gate = gate * (score >= kth_largest[-1]).to(gate.dtype)
    # coefficient arithmetic in the widest dtype around (float64 params stay exact)
    work = torch.promote_types(wide, net_dtype)
    rms_w = param_reference(w_s, a_s, lr).to(work)
    inv_imp = (1.0 / i_s.mean().clamp_min(_TINY)).to(work)
    bc1_w = per_token(bc1, work)
    bc2_sqrt = per_token(bc2, work).sqrt()
    coef = TokenCoefficients(*(c.to(work) for c in coef))
    out_scale = -lr * gate.to(work)  # multiplies the whole gated direction
    table = torch.stack(
        [
            out_scale * torch.exp(coef.log_scale) * bc2_sqrt / bc1_w,  # x m
            out_scale * coef.grad * bc2_sqrt,  # x g
            out_scale * coef.param / rms_w,  # x w  (rms_w: see features.param_reference)
            out_scale * coef.drift / rms_w,  # x (w - anchor)
            coef.gate_lambda * inv_imp,  # x importance, in the gate's denominator
            coef.rho * inv_imp,  # x importance: pull-back fraction (at most 1)
            eps * bc2_sqrt,  # + sqrt(v)
        ],
        dim=1,
    )  # [T, 7]
    return table, steps, task_steps


def coefficient_lists(
    views: TokenViews,
    fields: TensorFields,
    samples: tuple[torch.Tensor, ...],
    run_net: Callable[[torch.Tensor, torch.Tensor], TokenCoefficients],
    **options: Any,
) -> tuple[list[list[torch.Tensor]], torch.Tensor, torch.Tensor]:
    """:func:`coefficient_table` split per piece of the views, as broadcasts over them.

    Args:
        views: the update's views.
        fields: as in :func:`coefficient_table`.
        samples: as in :func:`coefficient_table`.
        run_net: as in :func:`coefficient_table`.
        **options: the keyword arguments of :func:`coefficient_table`.

    Returns:
        Seven lists (one per coefficient: x m, x g, x w, x drift, lambda, rho, eps) of
        per-piece ``[rows, 1]`` tensors in the gradients' dtypes; the new step counters
        ``[n tensors]`` and the current in-task steps ``[n tensors]``.
    """
    counts = views.counts
    table, steps, task_steps = coefficient_table(
        views.tensor_counts, fields, samples, run_net, **options
    )
    # per-token coefficients broadcast over each token's row
    dtypes = {g.dtype for g in views.grads}
    if len(dtypes) == 1:  # one split per coefficient: [n_tokens, 1] views, 7 calls in all
        by_coefficient = table.to(dtypes.pop()).t().unsqueeze(-1)  # [7, T, 1]
        return [list(torch.split(col, counts)) for col in by_coefficient], steps, task_steps
    per_tensor = [
        t.to(g.dtype) for t, g in zip(torch.split(table, counts), views.grads, strict=True)
    ]
    coefficients = [[t[:, j : j + 1] for t in per_tensor] for j in range(table.shape[1])]
    return coefficients, steps, task_steps


def advanced_leaves(
    leaves: list[LearnedState],
    steps: torch.Tensor,
    task_steps: torch.Tensor,
    exp_avg: list[torch.Tensor],
    exp_avg_sq: list[torch.Tensor],
) -> list[LearnedState]:
    """The leaves after one update: new counters and moments (in the state's shapes).

    Args:
        leaves: the leaves before the update.
        steps: the new step counters ``[n]``; each leaf's ``step`` becomes a view of it.
        task_steps: the new in-task step counters ``[n]`` (after the update); each leaf's
            ``task_step`` becomes a view of it.
        exp_avg: the new first moments, one per leaf.
        exp_avg_sq: the new second moments (or row and column means), one per leaf.
    """
    return [
        s._replace(
            step=step,
            task_step=task_step,
            exp_avg=m if m.shape == s.exp_avg.shape else m.reshape(s.exp_avg.shape),
            exp_avg_sq=v if v.shape == s.exp_avg_sq.shape else v.reshape(s.exp_avg_sq.shape),
        )
        for s, step, task_step, m, v in zip(
            leaves, steps.unbind(0), task_steps.unbind(0), exp_avg, exp_avg_sq, strict=True
        )
    ]


class _StepOptions(NamedTuple):
    """The hyper-parameters and sizes of one update (see :func:`learned_rule`)."""

    lr: Scalar
    b1: Scalar
    b2: Scalar
    eps: Scalar
    max_block: int
    sample_size: int
    topk_fraction: float | None
    net_dtype: torch.dtype

    def for_coefficients(self) -> dict[str, Any]:
        """The keyword arguments of :func:`coefficient_table` among them."""
        names = ("lr", "b1", "b2", "eps", "topk_fraction", "net_dtype")
        return {name: getattr(self, name) for name in names}


def _learned_step(
    grads: list[torch.Tensor],
    params: list[torch.Tensor],
    leaves: list[LearnedState],
    run_net: Callable[[torch.Tensor, torch.Tensor], TokenCoefficients],
    options: _StepOptions,
    inplace_state: bool,
    workspace: dict[Any, list[torch.Tensor]] | None,
    importance_free: bool,
) -> tuple[list[torch.Tensor], list[LearnedState]]:
    """The arithmetic of one update over lists of tensors (see the module docstring),
    tensor by tensor (with autograd on, :func:`_flat_step` does it in one go where it
    can)."""
    b1, b2, max_block = options.b1, options.b2, options.max_block
    views = token_views(grads, params, leaves, max_block)
    layouts = views.layouts
    g_v, w_v, m_old = views.grads, views.params, views.exp_avg
    owners = piece_owners(layouts)
    no_grad = not torch.is_grad_enabled()

    # 1. Adam's moments (torch.optim.Adam's foreach formulas; factored ones per tensor)
    dense = [j for j, i in enumerate(owners) if not is_factored(leaves[i])]  # pieces
    v_old = [
        piece
        for s, lay in zip(leaves, layouts, strict=True)
        if not is_factored(s)
        for piece in token_pieces(s.exp_avg_sq, lay)
    ]
    g_dense = [g_v[j] for j in dense]
    in_place = (
        no_grad
        and inplace_state
        and all(s.exp_avg.is_contiguous() for s in leaves)
        and all(s.exp_avg_sq.is_contiguous() for s in leaves if not is_factored(s))
    )
    if in_place:
        torch._foreach_lerp_(m_old, g_v, 1.0 - b1)
        if v_old:  # (foreach ops reject empty lists: every tensor may be factored)
            torch._foreach_mul_(v_old, b2)
            torch._foreach_addcmul_(v_old, g_dense, g_dense, value=1.0 - b2)
        m_new, v_dense = m_old, v_old
    elif isinstance(b1, torch.Tensor) or isinstance(b2, torch.Tensor):
        # tensor betas (meta-learned): the foreach ops take numbers only; the fused step's
        # formulas
        m_new = [torch.lerp(m, g, 1.0 - b1) for m, g in zip(m_old, g_v, strict=True)]
        v_dense = [
            torch.addcmul(v * b2, g * (1.0 - b2), g) for v, g in zip(v_old, g_dense, strict=True)
        ]
    else:
        m_new = torch._foreach_lerp(m_old, g_v, 1.0 - b1)
        v_dense = (
            torch._foreach_addcmul(torch._foreach_mul(v_old, b2), g_dense, g_dense, value=1.0 - b2)
            if v_old
            else []
        )
    v_new: list[torch.Tensor] = [None] * len(owners)  # type: ignore[list-item]
    for j, v in zip(dense, v_dense, strict=True):
        v_new[j] = v
    factored_state: dict[int, torch.Tensor] = {}
    for i, s in enumerate(leaves):
        if is_factored(s):
            factored_state[i], full = factored_moment(grads[i], s.exp_avg_sq, b2)
            first_piece = owners.index(i)
            for k, piece in enumerate(token_pieces(full, layouts[i])):
                v_new[first_piece + k] = piece

    # 2. tokens: statistics of a fixed subsample of each block; 3. coefficients
    wide = wide_dtype(params)
    device = g_v[0].device
    columns = [sample_columns(g.shape[1], options.sample_size, device) for g in g_v]
    samples = tuple(
        _samples(buffers, columns, options.net_dtype)
        for buffers in (g_v, m_new, v_new, w_v, views.anchor, views.importance)
    )
    coefficients, steps, task_steps = coefficient_lists(
        views, stacked_fields(leaves), samples, run_net, **options.for_coefficients(), wide=wide
    )

    # 4. element-wise update
    args = (g_v, w_v, m_new, v_new, views.anchor, views.importance)
    if no_grad:
        out = _elementwise_no_grad(*args, coefficients, workspace, importance_free)
    else:
        per_piece = zip(*args, zip(*coefficients, strict=True), strict=True)
        out = [direction_of(*xs, list(c), importance_free) for *xs, c in per_piece]
    shapes = [tuple(g.shape) for g in grads]
    updates = merged(out, layouts, shapes)
    if in_place:  # the same tensors, updated
        m_state = [s.exp_avg for s in leaves]
        v_dense_state = [s.exp_avg_sq for s in leaves]
    else:
        m_state = merged(m_new, layouts, shapes)
        v_dense_state = merged(v_new, layouts, shapes)  # factored: replaced below
    v_state = [factored_state.get(i, v) for i, v in enumerate(v_dense_state)]
    return updates, advanced_leaves(leaves, steps, task_steps + 1.0, m_state, v_state)


def updated_second_moment(v: torch.Tensor, g: torch.Tensor, b2: Scalar) -> torch.Tensor:
    """Adam's second-moment update ``b2 v + (1 - b2) g^2``, out of place."""
    if isinstance(b2, torch.Tensor):  # addcmul's value must be a number
        return torch.addcmul(v * b2, g * (1.0 - b2), g)
    return torch.addcmul(v * b2, g, g, value=1.0 - b2)


def _flattenable(
    grads: list[torch.Tensor], params: list[torch.Tensor], leaves: list[LearnedState]
) -> bool:
    """Whether :func:`_flat_step` applies: one dtype and device for the gradients,
    parameters and moments, one dtype for the anchors and importances, dense second
    moments."""
    return (
        len({(x.dtype, x.device) for x in (*grads, *params)}) == 1
        and len({s.anchor.dtype for s in leaves} | {s.importance.dtype for s in leaves}) == 1
        and not any(is_factored(s) for s in leaves)
    )


@functools.lru_cache(maxsize=1024)
def _flat_sample_index_cpu(layouts: tuple[Layout, ...], sample_size: int) -> torch.Tensor:
    """``[T * sample_size]`` int64: the positions of every token's sampled elements (those
    of :func:`~metaopt.learned.features.sample_columns`) in the concatenation of the
    flattened tensors."""
    lengths = torch.tensor(
        [length for lay in layouts for rows, length in lay.segments for _ in range(rows)]
    )
    starts = torch.cumsum(lengths, 0) - lengths
    columns = torch.arange(sample_size) * lengths[:, None] // sample_size
    return (starts[:, None] + columns).reshape(-1)


def _flat_step(
    grads: list[torch.Tensor],
    params: list[torch.Tensor],
    leaves: list[LearnedState],
    run_net: Callable[[torch.Tensor, torch.Tensor], TokenCoefficients],
    options: _StepOptions,
    importance_free: bool,
) -> tuple[list[torch.Tensor], list[LearnedState]]:
    """:func:`_learned_step` with autograd on, over one concatenation of all tensors.

    The same values per element (the same formulas in the same order), but every
    element-wise operation runs once over all ``N`` elements instead of once per tensor:
    a differentiated (and compiled) update has a few dozen operations whatever the number
    of tensors, not a few dozen per tensor, which is most of a compiled meta step's graph
    and compile time. Each token's coefficients reach its elements through a broadcast
    per tensor, concatenated (``[N, 7]``, index arithmetic once compiled).
    """
    b1, b2, sample_size = options.b1, options.b2, options.sample_size
    layouts = token_layouts(grads, options.max_block)
    counts = [lay.total_tokens for lay in layouts]
    segments = [segment for lay in layouts for segment in lay.segments]
    numels = [g.numel() for g in grads]

    def flat(tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([x.reshape(-1) for x in tensors])

    g, w = flat(grads), flat(params)
    m = torch.lerp(flat([s.exp_avg for s in leaves]), g, 1.0 - b1)
    v = updated_second_moment(flat([s.exp_avg_sq for s in leaves]), g, b2)
    anchor, imp = flat([s.anchor for s in leaves]), flat([s.importance for s in leaves])

    index = constant_on(g.device, _flat_sample_index_cpu, tuple(layouts), sample_size)
    samples = tuple(
        x.index_select(0, index).view(sum(counts), sample_size).to(options.net_dtype)
        for x in (g, m, v, w, anchor, imp)
    )
    table, steps, task_steps = coefficient_table(
        counts,
        stacked_fields(leaves),
        samples,
        run_net,
        **options.for_coefficients(),
        wide=wide_dtype(params),
    )
    width = table.shape[1]
    per_element = torch.cat(
        [
            t[:, None, :].expand(rows, length, width).reshape(-1, width)
            for t, (rows, length) in zip(
                torch.split(table.to(g.dtype), [rows for rows, _ in segments]),
                segments,
                strict=True,
            )
        ]
    )  # [N, 7]
    update = direction_of(g, w, m, v, anchor, imp, list(per_element.unbind(1)), importance_free)

    def unflat(x: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
        return [p.view(t.shape) for p, t in zip(torch.split(x, numels), like, strict=True)]

    return unflat(update, grads), advanced_leaves(
        leaves,
        steps,
        task_steps + 1.0,
        unflat(m, [s.exp_avg for s in leaves]),
        unflat(v, [s.exp_avg_sq for s in leaves]),
    )
