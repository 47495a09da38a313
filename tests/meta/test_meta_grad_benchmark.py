"""benchmarks/meta_grad.py stays runnable, and every library's meta-gradient it times
agrees with metaopt's (a tiny problem; compiles two meta steps, so it is slow: K = 2 at
two steps per call, one graph shape each)."""

from __future__ import annotations

import re

import pytest

from tests.benchmark_scripts import load_benchmark

pytest.importorskip("higher")
pytest.importorskip("torchopt")


@pytest.mark.slow
def test_tiny_run_prints_every_row_with_agreeing_gradients(capsys):
    module = load_benchmark("meta_grad")
    module.main(
        ["--steps", "2", "--width", "8", "--batch", "4", "--repeats", "1", "--rules", "sgd",
         "--steps-per-call", "2"]
    )
    out = capsys.readouterr().out
    rows = dict(
        re.findall(r"sgd\s+(\S+)\s+[\d.]+ ms\s+ratio to higher [\d.]+x\s+.*= ([\d.e+-]+)", out)
    )
    assert set(rows) == {
        "metaopt", "higher", "torchopt", "metaopt-compiled-x2", "metaopt-compiled-noremat-x2"
    }
    assert all(float(err) < 1e-5 for err in rows.values()), rows  # SGD: all libraries agree
