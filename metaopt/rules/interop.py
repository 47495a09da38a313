"""Interoperability with TorchOpt (optional dependency: ``pip install metaopt[interop]``)."""

from __future__ import annotations

from typing import Any

from metaopt.rules.base import State, UpdateRule, per_leaf

__all__ = ["from_torchopt", "to_torchopt"]


def _torchopt() -> Any:
    try:
        import torchopt
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "TorchOpt interop needs torchopt: pip install 'metaopt[interop]'"
        ) from exc
    return torchopt


def from_torchopt(transformation: Any) -> UpdateRule:
    """Wrap a TorchOpt ``GradientTransformation`` as a metaopt :class:`UpdateRule`.

    Each parameter gets its own TorchOpt state (``transformation.init((p,))``), which is
    what lets the rule live in ``torch.optim``-style per-parameter state. This is exact for
    transformations that act element by element (all of TorchOpt's optimizers:
    ``sgd``, ``adam``, ``adamw``, ``rmsprop``, ...); for ones that couple parameters,
    such as global-norm clipping, compose metaopt's own transform instead.
    The wrapped rule is differentiable as far as TorchOpt's is (``inplace=False``).
    """
    _torchopt()
    if not hasattr(transformation, "init") or not hasattr(transformation, "update"):
        raise TypeError("from_torchopt expects a torchopt GradientTransformation")

    def update_leaf(g: Any, s: Any, p: Any) -> tuple[Any, Any]:
        (u,), new_s = transformation.update(
            (g,), s, params=None if p is None else (p,), inplace=False
        )
        return u, new_s

    return per_leaf(lambda p: transformation.init((p,)), update_leaf, "from_torchopt")


def to_torchopt(rule: UpdateRule) -> Any:
    """Expose a metaopt rule as a TorchOpt ``GradientTransformation``.

    Usable with ``torchopt.apply_updates``, ``torchopt.MetaOptimizer`` and
    ``torchopt.Optimizer``. metaopt rules are always out of place, so TorchOpt's
    ``inplace`` flag is accepted and ignored.
    """
    torchopt = _torchopt()

    def update(updates: Any, state: State, *, params: Any | None = None, inplace: bool = True):
        return rule.update(updates, state, params)

    return torchopt.base.GradientTransformation(rule.init, update)
