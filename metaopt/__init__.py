"""metaopt: a learned optimizer for continual learning, on a functional optimizer runtime.

Public API: the functional rules (:mod:`metaopt.rules`), pytree helpers
(:mod:`metaopt.tree`) and the ``torch.optim`` drop-ins (:mod:`metaopt.optim`).
"""

from metaopt import rules, tree
from metaopt._version import __version__
from metaopt.optim import FunctionalOptimizer, LearnedOptimizer
from metaopt.rules import UpdateRule, apply_updates, chain

__all__ = [
    "FunctionalOptimizer",
    "LearnedOptimizer",
    "UpdateRule",
    "__version__",
    "apply_updates",
    "chain",
    "rules",
    "tree",
]
