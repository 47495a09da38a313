"""Every script in examples/ runs with --smoke as a subprocess and prints sane numbers."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.examples.doc_blocks import ROOT

EXAMPLES = ROOT / "examples"


def run_example(args: list[str], cwd: Path, data_dir: Path | None = None) -> str:
    """Run ``python examples/<args>`` (or ``torchrun`` when args start with it); returns
    stdout, failing the test with the output when the exit status is not 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    if data_dir is not None:
        env["METAOPT_DATA_DIR"] = str(data_dir)
    if args[0] == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", *args[1:]]
    else:
        command = [sys.executable, str(EXAMPLES / args[0]), *args[1:]]
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{command} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def numbers(pattern: str, text: str) -> list[float]:
    """Every number the regex ``pattern`` captures in ``text`` (all groups, in order)."""
    found = [float(v) for m in re.finditer(pattern, text) for v in m.groups()]
    assert found, f"{pattern!r} not in output:\n{text}"
    return found


def test_every_example_is_tested():
    tested = {
        "drop_in.py", "split_mnist.py", "maml.py", "meta_train_rule.py", "compiled_step.py",
        "implicit_hpo.py", "avalanche_style.py", "lightning_module.py",
        "distributed_meta_train.py",
    }
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested
    for name in tested:
        assert "--smoke" in (EXAMPLES / name).read_text()


@pytest.mark.parametrize("mode", ["reset", pytest.param("update", marks=pytest.mark.slow)])
def test_avalanche_style(tmp_path, mode):
    out = run_example(["avalanche_style.py", "--smoke", "--mode", mode], tmp_path)
    # task-incremental digits with a head per task: every experience is learned and kept,
    # although the framework emptied (reset) or edited (update) the optimizer's state. Chance
    # is 0.5; the shipped meta-trained rule learns each experience more cautiously than Adam
    # (0.89 vs 0.95 in update mode when measured), hence the bound.
    for final in numbers(r"final mean accuracy (\d\.\d+)", out):
        assert final > 0.85


def test_lightning(tmp_path):
    pytest.importorskip("lightning")
    out = run_example(["lightning_module.py", "--smoke", "--out", str(tmp_path)], tmp_path)
    first, second = re.findall(r"accuracy per task \[([\d., ]+)\], task index (\d)", out)
    acc_first = [float(v) for v in first[0].split(",")]
    acc_second = [float(v) for v in second[0].split(",")]
    # each task learned in its fit (5 classes: chance 0.2; the second task, 2 smoke epochs
    # of 8x8 digits, measured 0.769 / 0.692 / 0.742 with the fourth, fifth and sixth
    # shipped rules; the fifth protected the first task most)
    assert acc_first[0] > 0.8 and acc_second[1] > 0.7
    assert (first[1], second[1]) == ("0", "1")          # the callback marked the boundary
    resumed = re.search(r"task index (\d), optimizer state for (\d+) parameters", out)
    assert resumed.groups() == ("1", "4")               # restored from the Lightning checkpoint


@pytest.mark.slow
def test_drop_in(tmp_path):
    out = run_example(["drop_in.py", "--smoke"], tmp_path)
    assert min(numbers(r"test accuracy (\d\.\d+)", out)) > 0.85


@pytest.mark.slow
def test_split_mnist(tmp_path, data_dir):
    out = run_example(["split_mnist.py", "--smoke"], tmp_path, data_dir)
    for la in numbers(r"learning_acc (\d\.\d+)", out):
        assert la > 0.8


@pytest.mark.slow
def test_maml(tmp_path):
    out = run_example(["maml.py", "--smoke"], tmp_path)
    before, after = numbers(r"(\d+\.\d+) before meta-training, (\d+\.\d+) after", out)
    assert after < before


@pytest.mark.slow
def test_meta_train_rule(tmp_path):
    out = run_example(["meta_train_rule.py", "--smoke"], tmp_path)
    before, after = numbers(r"validation meta-loss (\d+\.\d+) -> (\d+\.\d+)", out)
    assert after < before
    assert numbers(r"trained rule: (\d\.\d+)", out)[0] > 0.8


@pytest.mark.slow
def test_compiled_step(tmp_path):
    out = run_example(["compiled_step.py", "--smoke"], tmp_path)
    assert numbers(r"max \|compiled - eager\| (\S+)", out)[0] < 1e-4
    first, last = numbers(r"loss (\d+\.\d+) -> (\d+\.\d+)", out)
    assert last < first


@pytest.mark.slow
def test_implicit_hpo(tmp_path):
    out = run_example(["implicit_hpo.py", "--smoke"], tmp_path)
    losses = numbers(r"validation loss (\d+\.\d+)", out)
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_distributed_meta_train_matches_one_process(tmp_path):
    two = tmp_path / "two"
    out = run_example(
        ["torchrun", "--standalone", "--nproc_per_node", "2",
         str(EXAMPLES / "distributed_meta_train.py"), "--smoke", "--out", str(two)],
        tmp_path,
    )
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["world_size"] == 2 and summary["meta_steps"] == 2
    one = tmp_path / "one"
    single = json.loads(
        run_example(["distributed_meta_train.py", "--smoke", "--out", str(one)], tmp_path)
        .strip().splitlines()[-1]
    )
    # same task samples, sharded over 2 ranks and all-reduced == one process
    expected = pytest.approx(single["last_train_meta_loss"], rel=1e-5)
    assert summary["last_train_meta_loss"] == expected
    net_two = torch.load(two / "rule.pt", weights_only=True)["state_dict"]
    net_one = torch.load(one / "rule.pt", weights_only=True)["state_dict"]
    for name, value in net_one.items():
        torch.testing.assert_close(net_two[name], value, rtol=1e-5, atol=1e-7)
