"""The attention-based learned rule for continual learning.

- :class:`LearnedRuleNet`: the meta-parameters (attention over tensor tokens).
- :func:`learned_rule`: the rule, a pure :class:`~metaopt.rules.UpdateRule`.
- :func:`new_task`, :func:`observe_loss`: pure functions on the rule's state.
- :func:`load_pretrained`, :func:`save_checkpoint`: shipped checkpoints.

See ``docs/learned.md`` for the architecture.
"""

from metaopt.learned.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_pretrained,
    pretrained_names,
    save_checkpoint,
)
from metaopt.learned.network import LearnedRuleNet, TokenCoefficients
from metaopt.learned.rule import learned_rule
from metaopt.learned.state import LearnedState
from metaopt.learned.tasks import IMPORTANCE_KINDS, new_task, observe_loss

__all__ = [
    "IMPORTANCE_KINDS",
    "CheckpointError",
    "LearnedRuleNet",
    "LearnedState",
    "TokenCoefficients",
    "learned_rule",
    "load_checkpoint",
    "load_pretrained",
    "new_task",
    "observe_loss",
    "pretrained_names",
    "save_checkpoint",
]
