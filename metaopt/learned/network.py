"""The network of the learned rule: attention across tensor tokens, per-tensor coefficients.

``LearnedRuleNet`` holds every meta-parameter of the rule. It embeds the token features
(:data:`metaopt.learned.features.TOKEN_STAT_FEATURES` + static shape descriptors) and one
task token, runs a small pre-norm transformer encoder over them (no positional embedding:
the result does not depend on the order of the parameters) and maps each token's context
vector to the coefficients of the per-element update (:class:`TokenCoefficients`).

The output layer is zero-initialised, so a fresh net gives ``log_scale = 0``, zero
corrections, ``gate = 1``, ``gate_lambda = 0`` and ``rho = 0``: the rule is Adam.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from metaopt.learned.features import N_TASK_FEATURES, N_TOKEN_FEATURES

__all__ = ["N_COEFFICIENTS", "LearnedRuleNet", "TokenCoefficients"]


class TokenCoefficients(NamedTuple):
    """Per-token coefficients of the per-element update; each field is ``[T]``.

    update = -lr * gate / (1 + gate_lambda * imp) * (exp(log_scale) * m_hat / denom
             + grad * g / denom + param * w / rms(w) + drift * (w - anchor) / rms(w))
             - min(1, rho * imp) * (w - anchor)

    with ``imp`` the importance normalised by its mean over all tokens. ``gate_score`` is
    ``gate`` before its clamp to [0, 1]: it ranks the tokens for a hard top-k selection
    (``learned_rule(topk_fraction=...)``), where saturated gates would tie.
    """

    log_scale: torch.Tensor
    grad: torch.Tensor
    param: torch.Tensor
    drift: torch.Tensor
    gate: torch.Tensor
    gate_lambda: torch.Tensor
    rho: torch.Tensor
    gate_score: torch.Tensor


N_COEFFICIENTS = len(TokenCoefficients._fields) - 1
"""Outputs of the net's head per token (``gate_score`` is derived from the gate's)."""


class LearnedRuleNet(nn.Module):
    """All meta-parameters of the learned rule.

    Args:
        d_model: width of the token embeddings.
        n_heads: attention heads (must divide ``d_model``).
        n_layers: transformer encoder layers (0 allowed).
        d_ff: hidden width of the encoder's feed-forward blocks.
        rho_scale: multiplies the raw pull-back output (so ``rho`` of order ``rho_scale``
            per step for raw outputs of order 1).
        max_log_scale: bound on ``|log_scale|`` (the learned step-size multiplier stays in
            ``[exp(-max_log_scale), exp(max_log_scale)]``).
        max_correction: bound on the three correction coefficients (``tanh``-squashed),
            in units of Adam's direction.

    Inputs of :meth:`forward`: ``tokens [T, N_TOKEN_FEATURES]`` and
    ``task [N_TASK_FEATURES]``; output: :class:`TokenCoefficients` of ``[T]`` tensors.
    """

    def __init__(
        self,
        d_model: int = 32,
        n_heads: int = 4,
        n_layers: int = 2,
        d_ff: int = 64,
        rho_scale: float = 1e-2,
        max_log_scale: float = 3.0,
        max_correction: float = 1.0,
    ) -> None:
        super().__init__()
        _check_config(d_model, n_heads, n_layers, d_ff, rho_scale, max_log_scale, max_correction)
        if d_model % n_heads:
            raise ValueError(f"n_heads ({n_heads}) must divide d_model ({d_model})")
        self.config: dict[str, Any] = {
            "d_model": d_model,
            "n_heads": n_heads,
            "n_layers": n_layers,
            "d_ff": d_ff,
            "rho_scale": rho_scale,
            "max_log_scale": max_log_scale,
            "max_correction": max_correction,
        }
        self.rho_scale = rho_scale
        self.max_log_scale = max_log_scale
        self.max_correction = max_correction
        self.token_embed = nn.Linear(N_TOKEN_FEATURES, d_model)
        self.task_embed = nn.Linear(N_TASK_FEATURES, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, n_heads, d_ff, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, N_COEFFICIENTS)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, tokens: torch.Tensor, task: torch.Tensor) -> TokenCoefficients:
        """Coefficients for ``T`` tokens (see the class docstring for shapes)."""
        if tokens.ndim != 2 or tokens.shape[1] != N_TOKEN_FEATURES:
            raise ValueError(f"tokens must be [T, {N_TOKEN_FEATURES}], got {tuple(tokens.shape)}")
        x = torch.cat([self.task_embed(task)[None], self.token_embed(tokens)], dim=0)
        if torch.compiler.is_compiling():
            for layer in self.encoder.layers:
                x = _encoder_layer(layer, x)
        elif len(self.encoder.layers):  # (nn.TransformerEncoder fails without a layer)
            x = self.encoder(x[None])[0]
        context = self.norm(x)[1:]
        raw = self.head(context)
        log_scale, grad, param, drift, gate, lam, rho = raw.unbind(1)
        # clamp (not softplus) keeps the identity exact at init and passes gradient at 0
        return TokenCoefficients(
            log_scale=log_scale.clamp(-self.max_log_scale, self.max_log_scale),
            grad=self.max_correction * torch.tanh(grad),
            param=self.max_correction * torch.tanh(param),
            drift=self.max_correction * torch.tanh(drift),
            gate=(1.0 - gate).clamp(0.0, 1.0),
            gate_lambda=lam.clamp(min=0.0),
            rho=self.rho_scale * rho.clamp(min=0.0),
            gate_score=1.0 - gate,
        )


def _check_config(
    d_model: Any,
    n_heads: Any,
    n_layers: Any,
    d_ff: Any,
    rho_scale: Any,
    max_log_scale: Any,
    max_correction: Any,
) -> None:
    """Raise ``TypeError`` / ``ValueError`` naming the first invalid option of
    :class:`LearnedRuleNet` (a checkpoint's config is read back through it)."""
    sizes = {"d_model": d_model, "n_heads": n_heads, "n_layers": n_layers, "d_ff": d_ff}
    for name, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"LearnedRuleNet: {name} must be an int, got {value!r}")
        if value < (0 if name == "n_layers" else 1):
            raise ValueError(f"LearnedRuleNet: {name} must be positive, got {value}")
    scales = {"rho_scale": rho_scale, "max_log_scale": max_log_scale}
    for name, value in {**scales, "max_correction": max_correction}.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise TypeError(f"LearnedRuleNet: {name} must be a number, got {value!r}")
        if not 0 <= value < math.inf:
            raise ValueError(f"LearnedRuleNet: {name} must be finite and >= 0, got {value}")


def _encoder_layer(layer: nn.TransformerEncoderLayer, x: torch.Tensor) -> torch.Tensor:
    """``layer(x[None])[0]`` for the pre-norm, ReLU, dropout-free layers of
    :class:`LearnedRuleNet`, written out op by op on ``x [T, d_model]``; used under
    ``torch.compile``.

    Without gradients ``nn.TransformerEncoderLayer`` takes a fused "fast path"
    (``torch._transformer_encoder_layer_fwd``) that a compiled graph keeps as one opaque
    call, which Inductor's C++ wrapper can only reach through Python (its "proxy
    executor", with a warning at compile time). Written out, every operation is compiled.
    Eagerly the module stays: its fast path was faster there for a few hundred tokens.
    """
    attn = layer.self_attn
    n_tokens, width = x.shape
    qkv = F.linear(layer.norm1(x), attn.in_proj_weight, attn.in_proj_bias)
    heads = qkv.view(n_tokens, 3, attn.num_heads, width // attn.num_heads).permute(1, 2, 0, 3)
    q, k, v = heads.unbind(0)
    mixed = F.scaled_dot_product_attention(q, k, v).transpose(0, 1).reshape(n_tokens, width)
    x = x + attn.out_proj(mixed)
    return x + layer.linear2(F.relu(layer.linear1(layer.norm2(x))))
