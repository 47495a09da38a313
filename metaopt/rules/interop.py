"""Interoperability with TorchOpt (optional dependency: ``pip install metaopt[interop]``)."""

from __future__ import annotations

from typing import Any

from metaopt.rules.base import State, UpdateRule, _check_state_keys
from metaopt.tree import named_leaves, rebuild

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

    def init(params: Any) -> State:
        return {key: transformation.init((p,)) for key, p in named_leaves(params)}

    def update(grads: Any, state: State, params: Any | None = None) -> tuple[Any, State]:
        items = named_leaves(grads)
        _check_state_keys([k for k, _ in items], state, "from_torchopt")
        param_of = dict(named_leaves(params)) if params is not None else {}
        updates, new_state = [], {}
        for key, g in items:
            if g is None:  # no gradient: skipped, as per_leaf rules skip it
                updates.append(None)
                new_state[key] = state[key]
                continue
            p = (param_of[key],) if key in param_of else None
            (u,), new_state[key] = transformation.update((g,), state[key], params=p, inplace=False)
            updates.append(u)
        return rebuild(grads, updates), new_state

    return UpdateRule(init, update)


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
