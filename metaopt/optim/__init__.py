"""``torch.optim.Optimizer`` drop-ins: :class:`FunctionalOptimizer` runs any functional rule,
:class:`LearnedOptimizer` the learned continual-learning rule."""

from metaopt.optim.functional import FunctionalOptimizer
from metaopt.optim.learned import LearnedOptimizer

__all__ = ["FunctionalOptimizer", "LearnedOptimizer"]
