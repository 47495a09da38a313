"""Pure, differentiable update rules (TorchOpt/optax style).

>>> rule = metaopt.rules.adam(lr=1e-3)
>>> state = rule.init(params)
>>> updates, state = rule.update(grads, state, params)
>>> params = metaopt.apply_updates(params, updates)
"""

from metaopt.rules import schedules
from metaopt.rules.alias import adam, adamw, rmsprop, sgd
from metaopt.rules.base import (
    Scalar,
    Schedule,
    State,
    UpdateRule,
    apply_updates,
    chain,
    identity,
    per_leaf,
)
from metaopt.rules.interop import from_torchopt, to_torchopt
from metaopt.rules.transforms import (
    AdamState,
    CountState,
    RMSState,
    TraceState,
    add_decayed_weights,
    clip_by_global_norm,
    scale,
    scale_by_adam,
    scale_by_learning_rate,
    scale_by_rms,
    scale_by_schedule,
    trace,
)

__all__ = [
    "AdamState",
    "CountState",
    "RMSState",
    "Scalar",
    "Schedule",
    "State",
    "TraceState",
    "UpdateRule",
    "adam",
    "adamw",
    "add_decayed_weights",
    "apply_updates",
    "chain",
    "clip_by_global_norm",
    "from_torchopt",
    "identity",
    "per_leaf",
    "rmsprop",
    "scale",
    "scale_by_adam",
    "scale_by_learning_rate",
    "scale_by_rms",
    "scale_by_schedule",
    "schedules",
    "sgd",
    "to_torchopt",
    "trace",
]
