"""``torch.compile``'d fused steps: training (:func:`make_step`, :func:`fit`) and
meta-training (:func:`make_meta_step`)."""

from metaopt.compile.fit import FitResult, fit
from metaopt.compile.meta_step import MetaStep, MetaStepResult, make_meta_step
from metaopt.compile.step import InnerStep, loss_and_buffers, make_step, module_state, tensor_hyper

__all__ = [
    "FitResult",
    "InnerStep",
    "MetaStep",
    "MetaStepResult",
    "fit",
    "loss_and_buffers",
    "make_meta_step",
    "make_step",
    "module_state",
    "tensor_hyper",
]
