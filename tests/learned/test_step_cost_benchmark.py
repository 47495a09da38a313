"""benchmarks/step_cost.py stays runnable: a one-row run and the reference replica."""

from __future__ import annotations

import json
import os
import re
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
    rows = {
        line.split()[0]: re.search(r"(\d+) ATen calls/step .*; (\d+) with the calls inside", line)
        for line in out.splitlines()
        if "ATen calls/step" in line
    }
    assert set(rows) == {"Adam", "learned"}  # "Adam fused", "learned"
    calls = {name: int(m.group(1)) for name, m in rows.items()}
    nested = {name: int(m.group(2)) for name, m in rows.items()}
    assert calls["learned"] > 5 * calls["Adam"] > 0
    # fused Adam's one call runs others inside it: only the outermost are the step's own
    assert nested["Adam"] > calls["Adam"] and nested["learned"] > calls["learned"]
    assert "most frequent operators, learned" in out


def test_gpu_check_script_names_its_parts(tmp_path):
    """benchmarks/gpu_check.sh runs one part per call (correctness, speed or graphs, each
    within one 10-minute device call); anything else is refused before it touches a GPU."""
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.sh"
    done = subprocess.run(["bash", str(script), "everything"], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ, "OUT": str(tmp_path / "out")})
    assert done.returncode == 2 and "correctness|speed|graphs" in done.stderr
    assert not (tmp_path / "out").exists()  # refused before writing anything


def test_cuda_graph_benchmark_checks_and_times_each_optimizer(monkeypatch, capsys):
    """benchmarks/cuda_graph_step.py, its harness on the CPU with the graph replaced by a
    plain step: every optimizer is built both ways, compared after the same steps and
    timed against fused Adam; one that fails to build is reported and left out."""
    module = load_benchmark("cuda_graph_step")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)

    class NotCaptured(module.Launched):  # a graph needs CUDA; the same steps without one
        pass

    monkeypatch.setattr(module, "Captured", NotCaptured)
    module.bench("100k", steps=2, repeats=1, learned_kinds=["eager"], device="cpu")
    out = capsys.readouterr().out
    assert out.count("max |replayed - launched| after 5 more steps 0.00e+00") == 2
    assert "learned eager, graph" in out and "x1.00 of fused Adam" in out

    class Frozen(module.Launched):  # a replay that does not take the launched step
        def step(self):
            pass

    monkeypatch.setattr(module, "Captured", Frozen)
    module.bench("100k", steps=2, repeats=1, learned_kinds=["eager"], device="cpu")
    out = capsys.readouterr().out
    assert out.count("replays another step than the launched one") == 2
    assert not re.search(r"graph +[\d.]+ ms/step", out)
    monkeypatch.setattr(module, "Captured", NotCaptured)

    def fails(opt):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(NotCaptured, "__init__", lambda self, opt: fails(opt))
    module.bench("100k", steps=2, repeats=1, learned_kinds=["eager"], device="cpu")
    out = capsys.readouterr().out
    assert "learned eager, graph: failed" in out and "not permitted" in out
    assert re.search(r"learned eager, launched +[\d.]+ ms/step", out)
    assert not re.search(r"learned eager, graph +[\d.]+ ms/step", out)


def test_cuda_graph_benchmark_needs_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        load_benchmark("cuda_graph_step").main(["--sizes", "100k"])
