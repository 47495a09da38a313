"""benchmarks/step_cost.py stays runnable: a one-row run and the reference replica."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

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
    # each row as JSON as soon as it is measured (kept when a run is cut short), then the table
    assert lines[1].startswith("100k mlp: ")
    early = json.loads(lines[1].removeprefix("100k mlp: "))
    assert early["model"] == "mlp" and early["state/Adam"] == pytest.approx(1.5, abs=1e-3)
    header = [c.strip() for c in lines[2].split("|")]
    row = [c.strip() for c in lines[4].split("|")]
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


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_device_cuda_without_a_gpu_is_refused(step_cost, capsys):
    with pytest.raises(SystemExit):
        step_cost.main(["--device", "cuda", "--reference-repeats", "0"])
    assert "CUDA is not available" in capsys.readouterr().err


def test_step_profile_counts_the_learned_steps_operators(capsys):
    """benchmarks/step_profile.py: operators per step from torch.profiler, the learned
    step's many more than fused Adam's (CPU, 100k parameters)."""
    load_benchmark("step_profile").main(["--size", "100k", "--steps", "1", "--top", "3"])
    out = capsys.readouterr().out
    counts = {
        line.split()[0]: int(line.split("aten ops/step")[0].split()[-1])
        for line in out.splitlines()
        if "aten ops/step" in line
    }
    assert set(counts) == {"Adam", "learned"}  # "Adam fused", "learned"
    assert counts["learned"] > 5 * counts["Adam"] > 0
    assert "most frequent operators, learned" in out


def test_gpu_check_script_names_its_parts(tmp_path):
    """benchmarks/gpu_check.sh runs one part per call (correctness or speed, each within
    one 10-minute device call); anything else is refused before it touches a GPU."""
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.sh"
    done = subprocess.run(["bash", str(script), "everything"], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ, "OUT": str(tmp_path / "out")})
    assert done.returncode == 2 and "correctness|speed" in done.stderr
    assert not (tmp_path / "out").exists()  # refused before writing anything
