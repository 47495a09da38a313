"""Continual-learning benchmark harness: data, streams, models, runner, metrics, baselines.

Typical use::

    from metaopt.continual import data, streams, models, runner
    x, y = data.load_digits_tensors("train")
    xt, yt = data.load_digits_tensors("test")
    stream = streams.split_stream(x, y, xt, yt, n_tasks=5, scenario="domain")
    result = runner.run_stream(
        lambda: models.build_model("mlp", (1, 8, 8), streams.n_outputs(stream)),
        lambda params: torch.optim.Adam(params, lr=1e-3),
        stream,
    )
    result.R, result.b, result.metrics()
"""

from metaopt.continual.baselines import EWC, SI
from metaopt.continual.data import (
    load_dataset,
    load_digits_tensors,
    load_idx_dataset,
    load_mnist,
)
from metaopt.continual.metrics import acc, bwt, forgetting, fwt, learning_accuracy, summarize
from metaopt.continual.models import build_model
from metaopt.continual.runner import StreamResult, run_stream
from metaopt.continual.streams import (
    Task,
    n_outputs,
    permuted_stream,
    rotated_stream,
    split_stream,
    stream_from_tensors,
)

__all__ = [
    "EWC",
    "SI",
    "StreamResult",
    "Task",
    "acc",
    "build_model",
    "bwt",
    "forgetting",
    "fwt",
    "learning_accuracy",
    "load_dataset",
    "load_digits_tensors",
    "load_idx_dataset",
    "load_mnist",
    "n_outputs",
    "permuted_stream",
    "rotated_stream",
    "run_stream",
    "split_stream",
    "stream_from_tensors",
    "summarize",
]
