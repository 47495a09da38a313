"""benchmarks/elementwise_loop.py stays runnable and its variants compute the update
they claim to."""

from __future__ import annotations

import pytest
import torch

from tests.benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def loop():
    return load_benchmark("elementwise_loop")


def test_variants_match_the_shipped_loop_where_they_should(loop):
    gen = torch.Generator().manual_seed(0)
    base = loop._inputs(3, 40, gen)

    def run(fn, inputs):
        copied = [x.clone() if isinstance(x, torch.Tensor) else [c.clone() for c in x]
                  for x in inputs]
        fn(*copied)
        return copied[1], copied[2], copied[3]  # w, m, v after the step

    shipped = run(loop.shipped, base)
    torch.testing.assert_close(run(loop.one_division, base), shipped, rtol=1e-5, atol=1e-6)
    no_gate = (*base[:5], torch.zeros_like(base[5]), *base[6:])  # importance 0: gate 1
    torch.testing.assert_close(run(loop.no_gate, no_gate), run(loop.shipped, no_gate))
    assert not torch.allclose(run(loop.no_gate, base)[0], shipped[0])
    # the first task: every importance 0, so the shipped loop without its importance terms
    torch.testing.assert_close(run(loop.first_task, no_gate), run(loop.shipped, no_gate))
    assert not torch.allclose(run(loop.first_task, base)[0], shipped[0])


@pytest.mark.slow
def test_a_tiny_run_prints_every_ratio(loop, capsys):
    loop.main(["--tokens", "2", "--length", "64", "--repeats", "1", "--threads", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 + len(loop.VARIANTS) + 1
    assert lines[-1].strip().startswith("Adam fused") and lines[-1].endswith("x1.00 of fused Adam")
    assert all(float(line.rsplit("x", 1)[1].split()[0]) > 0 for line in lines[1:])
