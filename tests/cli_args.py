"""Command lines shared by the ``metaopt`` command-line tests."""

from __future__ import annotations

TINY_BENCH = [
    "bench",
    "--streams",
    "split-digits-task",
    "--n-tasks",
    "2",
    "--models",
    "mlp",
    "--seeds",
    "0",
    "--train-per-task",
    "40",
    "--val-per-task",
    "10",
    "--test-per-task",
    "30",
    "--epochs",
    "1",
    "--no-progress",
    "--device",
    "cpu",
]
"""``metaopt bench`` on split digits with a tiny budget, on the CPU, without optimizers."""
