"""Features of the learned rule: tensor layout into tokens, static shape descriptors, token
statistics from a fixed subsample, and the task token.

Every parameter tensor is viewed as ``[n_tokens, length]``: equal contiguous blocks of its
flattened elements (whole rows of the tensor where possible), one attention token each,
of about ``max_block`` elements at most, plus one shorter last token for a size that no
equal blocks fit (see :func:`layout_of` and :func:`token_pieces`). Per-token coefficients
then broadcast over the rows of those views. Token statistics are computed from ``sample_size``
evenly spaced elements of each block, so building tokens costs
``O(tokens x sample_size)``, not ``O(numel)``.

All dynamic features are ratios or logarithms of ratios, so they do not change when the
gradients are multiplied by a constant (Adam's ``eps`` aside).
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any, NamedTuple

import torch

__all__ = [
    "KINDS",
    "N_STATIC_FEATURES",
    "N_TASK_FEATURES",
    "N_TOKEN_FEATURES",
    "STATIC_FEATURES",
    "TASK_FEATURES",
    "TOKEN_STAT_FEATURES",
    "Layout",
    "layout_of",
    "param_reference",
    "sample_columns",
    "static_descriptor",
    "task_features",
    "token_pieces",
    "token_statistics",
]

KINDS = ("weight", "bias", "norm", "embedding")
"""Parameter kinds recognised from names and shapes (one-hot in the static descriptor)."""

STATIC_FEATURES = (
    "ndim_is_1",
    "ndim_is_2",
    "ndim_ge_3",
    "log_fan_in",
    "log_fan_out",
    "log_numel",
    "depth_fraction",
    *(f"kind_{k}" for k in KINDS),
)
TOKEN_STAT_FEATURES = (
    "mean_abs_adam_direction",
    "adam_direction_coherence",
    "grad_momentum_correlation",
    "log_grad_over_rms",
    "log_relative_step",
    "log_relative_drift",
    "log1p_relative_importance",
    "log_relative_grad_scale",
)
TASK_FEATURES = (
    "log1p_task_index",
    "log1p_step_in_task",
    "first_step_of_task",
    "has_loss",
    "loss_trend",
    "loss_progress",
)
N_STATIC_FEATURES = len(STATIC_FEATURES)
N_TOKEN_FEATURES = len(TOKEN_STAT_FEATURES) + N_STATIC_FEATURES
N_TASK_FEATURES = len(TASK_FEATURES)

_TINY = 1e-30
_LOG_CLAMP = 30.0


class Layout(NamedTuple):
    """How one parameter tensor is cut into tokens: the first ``n_tokens * length`` of its
    flattened elements viewed as ``[n_tokens, length]``, one token per row of that view
    (equal, contiguous blocks), then, when ``tail > 0``, the last ``tail`` elements
    (``0 < tail < length``) as one shorter token, a ``[1, tail]`` view."""

    n_tokens: int
    length: int
    tail: int = 0

    @property
    def segments(self) -> tuple[tuple[int, int], ...]:
        """The ``(rows, length)`` shapes of the tensor's token views, in element order."""
        main = ((self.n_tokens, self.length),)
        return (*main, (1, self.tail)) if self.tail else main

    @property
    def total_tokens(self) -> int:
        """All the tensor's tokens, the tail token included."""
        return self.n_tokens + (1 if self.tail else 0)


def token_pieces(x: torch.Tensor, layout: Layout) -> list[torch.Tensor]:
    """``x`` (``n_tokens * length + tail`` elements) as its token views: one
    ``[n_tokens, length]`` piece, and a ``[1, tail]`` one after it when ``layout`` has a
    tail. Views of ``x`` when it is contiguous (``reshape`` semantics otherwise)."""
    if not layout.tail:
        return [x.reshape(layout.n_tokens, layout.length)]
    flat = x.reshape(-1)
    cut = layout.n_tokens * layout.length
    return [flat[:cut].view(layout.n_tokens, layout.length), flat[cut:].view(1, layout.tail)]


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted({*small, *(n // d for d in small)})


def uncached_when_compiling(fn: Any) -> Any:
    """``fn`` (an ``lru_cache``'d function), or its uncached body while ``torch.compile``
    traces: Dynamo ignores the cache anyway and warns when it meets one."""
    return fn.__wrapped__ if torch.compiler.is_compiling() else fn


def constant_on(device: torch.device, build: Any, *args: Any) -> torch.Tensor:
    """``build(*args)`` (an ``lru_cache``'d function that makes a CPU tensor, such as an
    index) on ``device``.

    Outside ``torch.compile`` the device's copy is cached as well, so an eager step on a
    GPU copies nothing from the host (such a copy waits for the GPU, and a CUDA graph
    cannot capture it); while compiling, the uncached CPU tensor is moved inside the
    graph, a constant of it."""
    if torch.compiler.is_compiling():
        return build.__wrapped__(*args).to(device)
    return _constant_on(device, build, args)


@functools.lru_cache(maxsize=1024)
def _constant_on(device: torch.device, build: Any, args: tuple[Any, ...]) -> torch.Tensor:
    return build(*args).to(device)


@functools.lru_cache(maxsize=4096)
def layout_of(numel: int, max_block: int, leading: int = 1) -> Layout:
    """The token layout of a tensor with ``numel`` elements (cached).

    Equal tokens where a divisor of ``numel`` allows: with ``low`` =
    ``ceil(numel / max_block)``, ``n_tokens`` is the smallest divisor ``>= low``
    (preferring whole rows of the tensor, a divisor or multiple of ``leading``, when that
    at most doubles it). When that divisor exceeds ``4 * low`` (sizes such as
    ``2045 ** 2``), it is the largest divisor below ``low`` whose tokens stay within
    ``4 * max_block`` elements, so the attention never sees many more tokens than needed.
    A size with neither (a large prime, a small multiple of one, ``997 * 1009``) gets
    blocks of whole rows (of ``max_block`` elements when a row is longer) and a shorter
    last token with the rest (``tail``): at most ``2 * low + 1`` tokens.

    So a token never holds more than ``4 * max_block`` elements, and a tensor never has
    more than ``4 * low + 1`` tokens.

    Args:
        numel: number of elements (>= 0).
        max_block: target number of elements per token (>= 1).
        leading: the tensor's first dimension (its rows, e.g. output units); a divisor
            of ``numel``.
    """
    if max_block < 1:
        raise ValueError(f"max_block must be >= 1, got {max_block}")
    if numel <= max_block:
        return Layout(1, max(numel, 1))
    low = math.ceil(numel / max_block)
    divisors = _divisors(numel)
    first = next(d for d in divisors if d >= low)
    if first <= 4 * low:
        aligned = [
            d
            for d in divisors
            if first <= d <= 2 * first and (leading % d == 0 or d % max(leading, 1) == 0)
        ]
        n_tokens = (aligned or [first])[0]
    else:
        below = [d for d in divisors if d < low and numel // d <= 4 * max_block]
        if not below:
            return _ragged_layout(numel, max_block, leading)
        n_tokens = below[-1]
    return Layout(n_tokens, numel // n_tokens)


def _ragged_layout(numel: int, max_block: int, leading: int) -> Layout:
    """Whole rows per token (``max_block`` elements if a row is longer), the rest in a
    shorter last token. Every token but the last has more than ``max_block / 2``
    elements, so there are fewer than ``2 * numel / max_block + 1`` tokens."""
    row = numel // leading if leading >= 1 and numel % leading == 0 else 1
    length = (max_block // row) * row if row <= max_block else max_block
    n_tokens, tail = divmod(numel, length)
    return Layout(n_tokens, length, tail)


@functools.lru_cache(maxsize=4096)
def _sample_columns_cpu(length: int, sample_size: int) -> torch.Tensor:
    return torch.arange(sample_size, dtype=torch.long) * length // sample_size


def sample_columns(length: int, sample_size: int, device: torch.device) -> torch.Tensor:
    """``[sample_size]`` evenly spaced positions inside a token of ``length`` elements
    (the same for every token of a ``[rows, length]`` view; repeated when a token is
    shorter than ``sample_size``)."""
    return constant_on(device, _sample_columns_cpu, length, sample_size)


_NAME_WORDS = re.compile(r"[a-z]+")
"""The words of a lower-cased parameter name (``"encoder.ln_1.weight"``: ``encoder``,
``ln``, ``weight``); digits and punctuation separate them."""

_NORM_WORDS = frozenset({"bn", "ln", "gn"})
"""Whole words naming a normalisation layer besides those ending in ``norm``."""


def _kind(name: str, ndim: int) -> str:
    """A parameter's kind from the words of its name, else from its rank: ``embedding``
    for a word starting with ``emb`` (``embed``, ``tok_embeddings``), ``norm`` for a word
    ending in ``norm`` (``norm1``, ``LayerNorm``, ``input_layernorm``) or one of
    :data:`_NORM_WORDS` (``bn1``, ``ln_f``), the word nearest the end deciding
    (``embeddings.LayerNorm.weight`` is a norm); otherwise ``bias`` (rank <= 1) or
    ``weight``.

    Whole words, not substrings: ``ensemble``, ``member``, ``subnet`` or ``normal_head``
    name no embedding or norm. A name without words (``"0"``, as ``model.parameters()``
    keys them) gives the rank's kind: pass ``model.named_parameters()`` to an optimizer
    so that the rule sees the kinds it was meta-trained with."""
    for word in reversed(_NAME_WORDS.findall(name.lower())):  # the innermost module first
        if word.startswith("emb"):
            return "embedding"
        if word.endswith("norm") or word in _NORM_WORDS:
            return "norm"
    if ndim <= 1:
        return "bias"
    return "weight"


def static_descriptor(name: str, shape: torch.Size, depth: float) -> torch.Tensor:
    """The static part of a tensor's tokens: ``[N_STATIC_FEATURES]`` float32.

    Args:
        name: the parameter's key (used only to recognise norm / embedding / bias kinds).
        shape: the parameter's shape.
        depth: position of the parameter in its model, in [0, 1] (0 = first).
    """
    ndim = len(shape)
    numel = math.prod(shape)
    fan_out = shape[0] if ndim >= 1 else 1
    fan_in = numel // max(fan_out, 1) if ndim >= 2 else 1
    kind = _kind(name, ndim)
    values = [
        float(ndim <= 1),
        float(ndim == 2),
        float(ndim >= 3),
        math.log1p(fan_in) / 10,
        math.log1p(fan_out) / 10,
        math.log1p(numel) / 20,
        float(depth),
        *(float(kind == k) for k in KINDS),
    ]
    return torch.tensor(values, dtype=torch.float32)


def _safe_log(x: torch.Tensor) -> torch.Tensor:
    return torch.log(x.clamp_min(_TINY)).clamp(-_LOG_CLAMP, _LOG_CLAMP)


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    """``sqrt(x)`` with ``x`` floored at a tiny positive number: same values, but a finite
    derivative where ``x`` is exactly 0 (meta-gradients; added by the meta helper)."""
    return x.clamp_min(_TINY).sqrt()


def _log_unclipped_above(x: torch.Tensor) -> torch.Tensor:
    """:func:`_safe_log` without its upper clamp, so that a difference of two such logs is
    the log of their ratio however large both are (with the clamp, every gradient RMS
    above 3e6 read as 3e6). ``x`` is capped at the dtype's largest finite value (a mean
    square that overflowed to inf would give inf - inf). The lower clamp stays: the
    shipped checkpoint was trained with it, and tokens with (nearly) zero gradients meet
    it in ordinary training."""
    return torch.log(x.clamp(_TINY, torch.finfo(x.dtype).max)).clamp_min(-_LOG_CLAMP)


def _correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row of ``[T, S]`` samples: ``mean(a b) / sqrt(mean(a^2) mean(b^2))``.

    Where that product of mean squares overflows (float32 gradients of about 1e10 do,
    and above about 1e19 the squares themselves), the ratio would read 0 or NaN; there
    it is computed on the rows divided by their largest magnitude, which leaves a
    correlation unchanged. Elsewhere it is the plain formula, number for number."""
    a2, b2 = (a * a).mean(1), (b * b).mean(1)
    plain = _ratio((a * b).mean(1), _sqrt(a2 * b2))
    a_n = a / a.abs().amax(1, keepdim=True).clamp_min(_TINY)
    b_n = b / b.abs().amax(1, keepdim=True).clamp_min(_TINY)
    scaled = _ratio((a_n * b_n).mean(1), _sqrt((a_n * a_n).mean(1) * (b_n * b_n).mean(1)))
    return torch.where(torch.isfinite(a2 * b2), plain, scaled)


def _ratio(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a / b`` with ``b`` floored at a tiny positive number (exactly scale-invariant
    above the floor, unlike ``a / (b + tiny)``)."""
    return a / b.clamp_min(_TINY)


def param_reference(
    param: torch.Tensor, anchor: torch.Tensor, lr: torch.Tensor | float
) -> torch.Tensor:
    """Per-token parameter scale ``[T]`` from samples ``[T, S]``: the RMS of the current
    and the anchor values, floored at ``1e-3 * lr`` (parameters that are exactly zero)."""
    rms = _sqrt(((param * param).mean(1) + (anchor * anchor).mean(1)).mul(0.5))
    return rms + 1e-3 * abs(lr) + _TINY


def token_statistics(
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    param: torch.Tensor,
    anchor: torch.Tensor,
    importance: torch.Tensor,
    *,
    bias_correction1: torch.Tensor,
    bias_correction2: torch.Tensor,
    lr: torch.Tensor | float,
    eps: float,
) -> torch.Tensor:
    """Dynamic token features from samples: every input is ``[T, S]`` (T tokens of all
    tensors, S samples each) in one floating dtype; ``bias_correction*`` are ``[T, 1]``.

    Returns:
        ``[T, len(TOKEN_STAT_FEATURES)]`` in the inputs' dtype.
    """
    m_hat = exp_avg / bias_correction1
    v_hat = exp_avg_sq / bias_correction2
    direction = m_hat / (_sqrt(v_hat) + eps)
    abs_dir = direction.abs().mean(1)
    coherence = _ratio(direction.mean(1), abs_dir)
    g2 = (grad * grad).mean(1)
    corr = _correlation(grad, exp_avg)
    # logs of gradient scales enter differences only, clamped after the difference (the
    # same numbers wherever each log lies within the clamp), so large gradients of any
    # scale give the same features
    log_rms_g = 0.5 * _log_unclipped_above(g2)
    grad_over_rms = log_rms_g - 0.5 * _log_unclipped_above(v_hat.mean(1))
    grad_over_rms = grad_over_rms.clamp(-_LOG_CLAMP, _LOG_CLAMP)
    ref = param_reference(param, anchor, lr)
    drift = param - anchor
    rel_step = _safe_log(abs(lr) * _sqrt((direction * direction).mean(1))) - _safe_log(ref)
    rel_drift = 0.5 * _safe_log((drift * drift).mean(1)) - _safe_log(ref)
    mean_imp = importance.mean(1)
    rel_imp = torch.log1p(_ratio(mean_imp, mean_imp.mean()))
    rel_grad = (log_rms_g - log_rms_g.mean()).clamp(-_LOG_CLAMP, _LOG_CLAMP)
    return torch.stack(
        [
            abs_dir,
            coherence,
            corr,
            grad_over_rms,
            rel_step / 10,
            rel_drift / 10,
            rel_imp,
            rel_grad / 10,
        ],
        dim=1,
    )


def task_features(
    task_index: torch.Tensor, step_in_task: torch.Tensor, loss_stats: torch.Tensor
) -> torch.Tensor:
    """The task token's features ``[N_TASK_FEATURES]``.

    Args:
        task_index: 0-d, tasks finished so far.
        step_in_task: 0-d, updates done in the current task.
        loss_stats: ``[4]``: fast loss average, slow loss average, first loss of the task,
            number of losses observed in the task (see :func:`metaopt.learned.observe_loss`).
    """
    fast, slow, start, count = loss_stats.unbind(0)
    has_loss = (count > 0).to(loss_stats.dtype)
    trend = ((fast - slow) / (slow.abs() + 1e-8)).clamp(-10, 10) * has_loss
    progress = ((fast - start) / (start.abs() + 1e-8)).clamp(-10, 10) * has_loss
    return torch.stack(
        [
            torch.log1p(task_index),
            torch.log1p(step_in_task) / 5,
            (step_in_task == 0).to(loss_stats.dtype),
            has_loss,
            trend,
            progress,
        ]
    )
