"""Tiny digits streams shared by the continual-learning tests."""

from __future__ import annotations

import pytest

from metaopt.continual.data import load_digits_tensors
from metaopt.continual.streams import Task, split_stream, subsample, with_validation


@pytest.fixture(scope="module")
def tiny_stream() -> list[Task]:
    """Split-digits, 2 task-incremental tasks, 60 train / 30 validation-free test each."""
    x, y = load_digits_tensors("train")
    xt, yt = load_digits_tensors("test")
    stream = split_stream(x, y, xt, yt, n_tasks=2, scenario="task", classes=[0, 1, 2, 3])
    return subsample(stream, n_train=60, n_test=30, seed=0)


@pytest.fixture(scope="module")
def tiny_val_stream(tiny_stream: list[Task]) -> list[Task]:
    """``tiny_stream`` with 10 validation examples per task held out of training."""
    return with_validation(tiny_stream, 0.2, n_max=10, seed=0)
