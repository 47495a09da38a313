"""``torch.optim.Optimizer`` drop-ins: :class:`FunctionalOptimizer` runs any functional rule."""

from metaopt.optim.functional import FunctionalOptimizer

__all__ = ["FunctionalOptimizer"]
