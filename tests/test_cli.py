"""``metaopt`` command line: bench on digits with a tiny budget, merge/resume, errors."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import pytest

from metaopt.cli import build_parser, main
from tests.cli_args import TINY_BENCH as TINY


def test_bench_tiny_writes_results_and_merges(tmp_path: Path, capsys, caplog) -> None:
    out = tmp_path / "out"
    argv = [*TINY, "--optimizers", "sgd", "adam", "--lrs", "0.1", "0.01", "--out", str(out)]
    assert main([*argv, "--plot"]) == 0
    printed = capsys.readouterr().out
    assert "= 4 runs" in printed and "TUNED PER BENCHMARK" in printed and "SHARED" in printed
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["command"].startswith("metaopt bench")
    assert {"torch", "metaopt", "numpy", "python"} <= set(data["meta"]["versions"])
    rows = data["rows"]
    assert sorted(r["setting"] for r in rows) == [
        "adam lr=0.01",
        "adam lr=0.1",
        "sgd lr=0.01",
        "sgd lr=0.1",
    ]
    for row in rows:
        assert len(row["R"]) == 2 and len(row["R"][0]) == 2 and len(row["b"]) == 2
        assert row["val"] is not None and 0.0 <= row["test"]["acc"] <= 1.0
    assert (out / "runs.csv").is_file() and (out / "summary.csv").is_file()
    assert "| split-digits-task | mlp | sgd |" in (out / "summary.md").read_text()
    assert (out / "split-digits-task_mlp_matrix.png").stat().st_size > 1000
    assert (out / "split-digits-task_mlp_curves.png").is_file()

    # add one optimizer to the existing results without redoing the others
    before = {r["setting"]: r for r in rows}
    merged_argv = [*TINY, "--optimizers", "si", "--si-strengths", "10", "--out", str(out)]
    assert main([*merged_argv, "--merge-into", str(out / "results.json")]) == 0
    merged = json.loads((out / "results.json").read_text())["rows"]
    assert len(merged) == 5
    commands = json.loads((out / "results.json").read_text())["meta"]["commands"]
    assert len(commands) == 2 and "--merge-into" in commands[1]
    assert all(r == before[r["setting"]] for r in merged if r["setting"] in before)
    # a different budget cannot be merged into the same file
    with pytest.raises(SystemExit) as exc:
        main([*merged_argv, "--epochs", "2", "--merge-into", str(out / "results.json")])
    assert exc.value.code == 1 and "budget" in capsys.readouterr().err
    # resume: everything already there, nothing runs again
    assert main([*argv, "--resume"]) == 0
    assert "= 0 runs" in capsys.readouterr().out
    # a fresh run into the same folder replaces the results, with a warning
    with caplog.at_level(logging.WARNING, logger="metaopt.continual.cli"):
        assert main([*TINY, "--optimizers", "sgd", "--lrs", "0.1", "--out", str(out)]) == 0
    assert "replaces it; pass --resume or --merge-into" in caplog.text
    assert len(json.loads((out / "results.json").read_text())["rows"]) == 1


def test_errors_exit_cleanly(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("METAOPT_DATA_DIR", raising=False)
    argv = ["bench", "--streams", "split-mnist-task", "--seeds", "0", "--out", str(tmp_path)]
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--no-progress", "--optimizers", "sgd", "--lrs", "0.1"])
    assert exc.value.code == 1
    assert "METAOPT_DATA_DIR" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--streams", "split-mnist"])  # split streams need a scenario
    assert "need a scenario" in capsys.readouterr().err
    assert main([]) == 2


@pytest.mark.parametrize(
    "grid",
    [
        ["--lrs", "inf"],
        ["--lrs", "nan"],
        ["--si-strengths", "nan"],
        ["--ewc-strengths", "1", "inf"],
    ],
)
def test_non_finite_grid_values_are_usage_errors(grid, capsys) -> None:
    """A NaN or infinite learning rate or strength would train to NaN and be reported as
    a result (``--si-strengths nan`` and ``--lrs inf`` were); argparse refuses them."""
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--streams", "split-digits-domain", *grid])
    assert exc.value.code == 2
    assert "must be finite" in capsys.readouterr().err


def test_subcommands_registered(capsys) -> None:
    commands = build_parser()._subparsers._group_actions[0].choices
    assert {"bench", "download"} <= set(commands)
    assert ("meta-train" in commands) == (importlib.util.find_spec("metaopt.meta.cli") is not None)
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and "metaopt" in capsys.readouterr().out


@pytest.mark.skipif(
    importlib.util.find_spec("metaopt.optim.learned") is None, reason="no learned optimizer"
)
def test_bench_learned_from_a_checkpoint_file(tmp_path: Path, capsys) -> None:
    from metaopt.learned.checkpoint import CHECKPOINT_DIR

    mine = tmp_path / "mine.pt"
    mine.write_bytes((CHECKPOINT_DIR / "default.pt").read_bytes())
    out = tmp_path / "out"
    argv = [*TINY, "--optimizers", "learned", "--learned-checkpoint", str(mine), "--out", str(out)]
    assert main(argv) == 0
    assert f"learned[mine]: checkpoint {mine}" in capsys.readouterr().out
    data = json.loads((out / "results.json").read_text())
    assert [r["optimizer"] for r in data["rows"]] == ["learned[mine]"]
    assert data["meta"]["learned_checkpoints"]["learned[mine]"]["path"] == str(mine)


def test_ctrl_c_exits_with_status_130_and_no_traceback(monkeypatch, capsys):
    import metaopt.meta.cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(metaopt.meta.cli, "meta_train_command", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        main(["meta-train", "--out", "unused"])
    assert exit_info.value.code == 130
    assert "metaopt meta-train: interrupted" in capsys.readouterr().err


@pytest.mark.parametrize(("flags", "level"), [([], logging.WARNING), (["-v"], logging.INFO),
                                              (["-vv"], logging.DEBUG)])
def test_verbosity_turns_up_metaopts_logging_only(flags, level, monkeypatch) -> None:
    """-v/-vv set metaopt's loggers to INFO/DEBUG; other libraries' (matplotlib's debug
    font search flooded -vv logs) stay at WARNING."""
    monkeypatch.setattr(logging.getLogger("metaopt"), "level", logging.NOTSET)
    assert main(flags) == 2  # no command: help, after logging is configured
    assert logging.getLogger("metaopt.meta.trainer").getEffectiveLevel() == level
    assert logging.getLogger("matplotlib.font_manager").getEffectiveLevel() >= logging.WARNING


def test_bench_refuses_unwritable_outputs_before_any_run(tmp_path: Path, capsys, caplog) -> None:
    """An --out below a file failed after the first run had trained (with a traceback);
    a --merge-into path that does not exist yet is created, with a warning (a typo would
    otherwise merge into nothing silently)."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    argv = [*TINY, "--optimizers", "sgd", "--lrs", "0.1"]
    for option in (["--out", str(blocker / "sub")], ["--merge-into", str(blocker / "r.json")]):
        with pytest.raises(SystemExit) as exc:
            main([*argv, "--out", str(tmp_path / "out"), *option])  # the last --out wins
        assert exc.value.code == 1
        err = capsys.readouterr()
        assert "cannot write into" in err.err and "= 1 runs" not in err.out
    fresh = tmp_path / "new" / "results.json"
    with caplog.at_level(logging.WARNING, logger="metaopt.continual.cli"):
        assert main([*argv, "--out", str(tmp_path / "out2"), "--merge-into", str(fresh)]) == 0
    assert "no such file yet" in caplog.text and fresh.is_file()


def test_bench_help_shows_a_single_percent_sign(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = capsys.readouterr().out
    assert "in %." in out and "%%" not in out


@pytest.mark.parametrize("device", ["meta", "xpu", "mps"])
def test_bench_refuses_devices_this_machine_cannot_use(device, capsys) -> None:
    """They passed the check and the first run died with a traceback."""
    import torch

    try:
        torch.empty(1, device=device)
        if device != "meta":
            pytest.skip(f"{device} is usable here")
    except (RuntimeError, AssertionError):
        pass
    with pytest.raises(SystemExit) as exc:
        main([*TINY, "--optimizers", "sgd", "--lrs", "0.1", "--device", device])
    assert exc.value.code == 1
    assert "--device" in capsys.readouterr().err
