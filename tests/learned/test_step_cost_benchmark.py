"""benchmarks/step_cost.py stays runnable: a one-row run and the reference replica."""

from __future__ import annotations

import pytest
import torch

from tests.benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def step_cost():
    return load_benchmark("step_cost")


def test_one_row_reports_state_at_one_and_a_half_adam(step_cost, capsys):
    step_cost.main(
        [
            "--models",
            "mlp",
            "--sizes",
            "100k",
            "--repeats",
            "1",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--reference-repeats",
            "0",
            "--clock",
            "cpu",
        ]
    )
    lines = capsys.readouterr().out.strip().splitlines()
    header = [c.strip() for c in lines[1].split("|")]
    row = [c.strip() for c in lines[3].split("|")]
    assert row[0] == "mlp" and float(row[header.index("state/Adam")]) == 1.5
    assert float(row[header.index("learned 2nd+ ms")]) > 0
    assert 0 < float(row[header.index("check/fused")]) < float(row[header.index("2nd+/fused")])
    # the compiled step's Python around its (here no-op) call: less than an eager step
    assert 0 < float(row[header.index("book/fused")]) < float(row[header.index("2nd+/fused")])


def test_reference_replica_maps_kernels_to_deltas(step_cost):
    replica = step_cost.ReferenceReplica()
    kernels = torch.randn(4, 3, 3, 3)  # 12 kernel tokens
    deltas = replica(kernels, torch.rand(12))
    assert deltas.shape == kernels.shape
    deltas.sum().backward()
    assert replica.embed[0].weight.grad is not None
