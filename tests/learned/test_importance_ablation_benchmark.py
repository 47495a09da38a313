"""benchmarks/importance_ablation.py: each variant changes the held importance as it
says, at every place the optimizer folds a task, and a tiny run prints one line each."""

from __future__ import annotations

import re

import pytest
import torch

import metaopt
from metaopt.learned.state import LearnedState
from metaopt.learned.tasks import fold_task
from tests.benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("importance_ablation")


def test_variants_scale_what_is_held_before_the_new_score(bench):
    """With importance I held and the finished task's score S: accumulated I + S,
    halved 0.5 I + S, last S, none 0 (float32 auxiliaries: exact)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    opt = metaopt.LearnedOptimizer(model.parameters(), lr=1e-2, aux_dtype=torch.float32)
    for _ in range(2):  # a task, a boundary (folded at the next step), a second task
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(8, 5)).square().mean().backward()
            opt.step()
        opt.new_task()
    leaf = LearnedState(*opt.state[model.weight].values())
    # as at the end of a task of 3 updates (a task without updates scores nothing)
    leaf = leaf._replace(pending=leaf.pending.new_zeros(0), task_step=leaf.task_step + 3)
    w = model.weight.detach() + 0.1 * torch.randn(3, 5)  # moved away from the anchor
    held = leaf.importance
    assert held.abs().sum() > 0
    score = fold_task(leaf._replace(importance=torch.zeros_like(held)), w).importance
    assert score.abs().sum() > 0
    expected = {"accumulated": held + score, "halved": 0.5 * held + score, "last": score,
                "none": torch.zeros_like(held)}
    for name, factor in bench.VARIANTS.items():
        assert torch.allclose(bench.varied_fold(factor)(leaf, w).importance, expected[name])
        with bench.variant(name):  # every place that folds a task sees the variant
            for module in bench._FOLD_SITES:
                assert torch.allclose(module.fold_task(leaf, w).importance, expected[name])
    assert all(m.fold_task is fold_task for m in bench._FOLD_SITES)  # restored


def test_tiny_run_prints_one_line_per_variant(bench, capsys):
    bench.main(["--suite", "quick", "--streams", "split-digits-domain", "--models", "mlp",
                "--seeds", "0", "--variants", "accumulated", "none"])
    out = capsys.readouterr().out
    lines = re.findall(r"split-digits-domain\s+mlp\s+(\w+)\s+val ACC\s+([\d.]+)\s+test ACC\s+"
                       r"([\d.]+)\s+LA\s+([\d.]+)\s+per task ((?:\d+ ?)+)", out)
    assert [line[0] for line in lines] == ["accumulated", "none"]
    for _, *numbers, per_task in lines:
        assert all(0 <= float(x) <= 100 for x in numbers)
        assert len(per_task.split()) == 5
    assert lines[0][1:] != lines[1][1:]  # the patch reached the optimizer
