"""Meta-learning: meta-gradient estimators, the continual meta-objective, the meta-trainer.

Every estimator shares one interface::

    result = estimator(meta_params, problem)     # -> MetaGradient(loss, grads)

* :class:`Unrolled` — (truncated) backpropagation through K inner steps;
* :class:`Implicit` / :func:`implicit_root` — implicit function theorem with conjugate
  gradient on Hessian-vector products;
* :class:`ES` / :class:`PES` — antithetic and persistent evolution strategies, no graph.

Meta-training the learned rule: :class:`ContinualProblem` (the continual meta-objective),
:class:`TaskFamily` (random task sequences from digits / MNIST training images),
:class:`MetaTrainer` (``metaopt meta-train``) and :class:`CompiledContinualSteps`
(its compiled inner steps, ``--compile``).
"""

from metaopt.meta.compiled import CompiledContinualSteps
from metaopt.meta.es import ES, PES
from metaopt.meta.functional import PureModel, detach_tree
from metaopt.meta.implicit import Implicit, ImplicitProblem, conjugate_gradient, implicit_root
from metaopt.meta.objective import ContinualProblem, evaluate_rule
from metaopt.meta.problem import (
    Estimator,
    InnerProblem,
    MetaGradient,
    RuleFactory,
    SupervisedProblem,
)
from metaopt.meta.tasks import FamilyConfig, TaskFamily
from metaopt.meta.trainer import MetaTrainer, TrainConfig
from metaopt.meta.unroll import InnerCarry, Unrolled, inner_step

__all__ = [
    "ES",
    "PES",
    "CompiledContinualSteps",
    "ContinualProblem",
    "Estimator",
    "FamilyConfig",
    "Implicit",
    "ImplicitProblem",
    "InnerCarry",
    "InnerProblem",
    "MetaGradient",
    "MetaTrainer",
    "PureModel",
    "RuleFactory",
    "SupervisedProblem",
    "TaskFamily",
    "TrainConfig",
    "Unrolled",
    "conjugate_gradient",
    "detach_tree",
    "evaluate_rule",
    "implicit_root",
    "inner_step",
]
