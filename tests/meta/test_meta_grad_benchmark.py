"""benchmarks/meta_grad.py stays runnable, and every library's meta-gradient it times
agrees with metaopt's (a tiny problem; compiles two meta steps, so it is slow)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "meta_grad.py"

pytest.importorskip("higher")
pytest.importorskip("torchopt")


@pytest.mark.slow
def test_tiny_run_prints_every_row_with_agreeing_gradients(capsys):
    spec = importlib.util.spec_from_file_location("meta_grad_benchmark", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(
        ["--steps", "3", "--width", "8", "--batch", "4", "--repeats", "1", "--rules", "sgd",
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
