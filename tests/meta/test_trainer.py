"""Meta-trainer: training records, checkpoints, identical resume (also after kill -9)."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from metaopt.learned import CheckpointError, load_checkpoint
from metaopt.meta.cli import config_from_args, register
from metaopt.meta.problem import MetaGradient
from metaopt.meta.tasks import FamilyConfig
from metaopt.meta.trainer import MetaTrainer, TrainConfig

ESTIMATOR = "unrolled"

TINY_FAMILY = FamilyConfig(
    models=("mlp",), kinds=("split",), n_tasks=(2, 2), steps_per_task=(3, 3), examples=100,
    batch_size=(8,), meta_batch_size=16,
)
CLI_ARGS = [
    "--models", "mlp", "--kinds", "split", "--n-tasks", "2", "2", "--steps-per-task", "3", "3",
    "--examples", "100", "--val-tasks", "1", "--val-every", "2", "--ckpt-every", "1",
    "--estimator", ESTIMATOR, "--es-pairs", "1", "--no-progress",
]


def tiny_config(**kw) -> TrainConfig:
    base = dict(steps=4, estimator=ESTIMATOR, es_pairs=1, val_every=2, val_tasks=1,
                ckpt_every=1, family=TINY_FAMILY.to_dict())
    return TrainConfig(**{**base, **kw})


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    trainer = MetaTrainer(tiny_config(), out, progress=False)
    trainer.train()
    return trainer


def test_training_records_checkpoint_and_plot(uninterrupted):
    trainer = uninterrupted
    train_records = [r for r in trainer.history if "meta_loss" in r]
    val_records = [r for r in trainer.history if "val_meta_loss" in r]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4]
    assert [r["step"] for r in val_records] == [0, 2, 4]
    assert not any(r["skipped"] for r in train_records)
    init = MetaTrainer(tiny_config(), trainer.out_dir / "unused", progress=False).net
    assert not states_equal(init.state_dict(), trainer.net.state_dict())  # it learned something
    # step 0 is the Adam-identity initialisation: same validation numbers as Adam
    assert val_records[0]["val_meta_loss"] == pytest.approx(trainer.baseline["adam"]["meta_loss"],
                                                            rel=1e-5)
    assert (trainer.out_dir / "checkpoint.pt").is_file()
    assert (trainer.out_dir / "curves.png").stat().st_size > 1000
    assert not list(trainer.out_dir.glob(".*"))  # atomic writes leave no temp files


def test_a_sequence_with_a_non_finite_meta_gradient_is_left_out(tmp_path):
    """One of two sequences overflows: the meta-step uses the other one alone (it used to
    skip the whole step); when both overflow, the step is skipped."""
    trainer = MetaTrainer(tiny_config(tasks_per_step=2), tmp_path, progress=False)
    estimate = trainer.estimator
    overflowing: list[object] = []

    def estimator(meta_params, problem):
        result = estimate(meta_params, problem)
        if problem in overflowing:
            grads = {k: torch.full_like(g, float("nan")) for k, g in result.grads.items()}
            return MetaGradient(result.loss, grads)
        return result

    trainer.estimator = estimator
    gen = torch.Generator().manual_seed(0)
    problems = [trainer.family.sample(gen) for _ in range(2)]
    alone_loss, alone = trainer.meta_gradient(problems[1:], [8])
    overflowing.append(problems[0])
    loss, grads = trainer.meta_gradient(problems, [7, 8])
    torch.testing.assert_close(loss, alone_loss)
    for k in alone:
        torch.testing.assert_close(grads[k], alone[k])

    def step_on(pair):
        samples = iter(pair)
        trainer.family.sample = lambda gen: next(samples)
        before = {k: v.clone() for k, v in trainer.net.state_dict().items()}
        return trainer.train_step(), not states_equal(before, trainer.net.state_dict())

    record, moved = step_on(problems)
    assert record["dropped"] == 1 and not record["skipped"] and moved
    overflowing.append(problems[1])
    record, moved = step_on(problems)
    assert record["dropped"] == 2 and record["skipped"] and not moved


def test_resume_continues_identically(uninterrupted, tmp_path):
    first = MetaTrainer(tiny_config(), tmp_path, progress=False)
    first.train(steps=2)
    second = MetaTrainer(tiny_config(), tmp_path, progress=False)
    assert second.resume()
    assert second.step == 2
    second.train()
    assert states_equal(second.net.state_dict(), uninterrupted.net.state_dict())
    assert second.history == uninterrupted.history


@pytest.fixture
def sigint_handler(request):
    """SIGINT handled by ``request.param`` during the test (CI may start pytest with SIGINT
    ignored, an interactive run has Python's own handler)."""
    previous = signal.signal(signal.SIGINT, request.param)
    yield request.param
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("sigint_handler", [signal.default_int_handler], indirect=True)
def test_ctrl_c_finishes_the_step_writes_a_checkpoint_and_resumes_identically(
    tmp_path, sigint_handler
):
    """SIGINT during meta-step 3 of a run that checkpoints every 10 steps: the step
    finishes, a checkpoint of step 3 is written, KeyboardInterrupt is raised, and the
    resumed run ends where an uninterrupted one does. A second SIGINT stops at once."""
    config = tiny_config(ckpt_every=10)
    reference = MetaTrainer(config, tmp_path / "reference", progress=False)
    reference.train()

    trainer = MetaTrainer(config, tmp_path / "run", progress=False)
    step_once = trainer.train_step

    def interrupted_step():
        if trainer.step == 2:
            signal.raise_signal(signal.SIGINT)
        return step_once()

    trainer.train_step = interrupted_step
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert trainer.step == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    resumed = MetaTrainer(config, tmp_path / "run", progress=False)
    assert resumed.resume() and resumed.step == 3
    resumed.train()
    assert states_equal(resumed.net.state_dict(), reference.net.state_dict())
    assert resumed.history == reference.history

    again = MetaTrainer(config, tmp_path / "again", progress=False)

    def twice_interrupted_step():
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)  # the default handler again: raises here
        raise AssertionError("not reached")

    again.train_step = twice_interrupted_step
    with pytest.raises(KeyboardInterrupt):
        again.train()
    assert again.step == 0 and not again.checkpoint_path.exists()


@pytest.mark.parametrize("sigint_handler", [signal.SIG_IGN], indirect=True)
def test_a_process_that_ignores_ctrl_c_keeps_ignoring_it(tmp_path, sigint_handler):
    trainer = MetaTrainer(tiny_config(steps=2), tmp_path, progress=False)
    step_once = trainer.train_step

    def interrupted_step():
        signal.raise_signal(signal.SIGINT)
        return step_once()

    trainer.train_step = interrupted_step
    trainer.train()
    assert trainer.step == 2
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_resume_from_a_named_file_that_does_not_exist_raises(tmp_path):
    trainer = MetaTrainer(tiny_config(), tmp_path, progress=False)
    assert not trainer.resume()  # its own checkpoint: none yet, start afresh
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        trainer.resume(tmp_path / "typo.pt")


def test_export_writes_a_learned_checkpoint_with_metadata(uninterrupted, tmp_path):
    path = uninterrupted.export(tmp_path / "rule.pt", {"command": "test"})
    net, meta = load_checkpoint(path)
    assert meta["command"] == "test" and meta["meta_steps"] == 4
    assert meta["best_step"] == uninterrupted.best["step"]
    assert states_equal(net.state_dict(), uninterrupted.best["state"])


def test_resume_refuses_another_configuration(uninterrupted):
    other = MetaTrainer(tiny_config(meta_lr=0.5), uninterrupted.out_dir / "x", progress=False)
    before = {k: v.clone() for k, v in other.net.state_dict().items()}
    with pytest.raises(ValueError, match="meta_lr"):
        other.resume(uninterrupted.checkpoint_path)
    assert states_equal(before, other.net.state_dict()) and other.step == 0


def test_init_starts_from_a_learned_checkpoint(uninterrupted, tmp_path):
    """``init``: the net starts at the checkpoint's weights (here the trained rule's), and
    training from there moves them; the setting is part of the resumable config."""
    path = uninterrupted.export(tmp_path / "start.pt", {})
    started = MetaTrainer(tiny_config(init=str(path), steps=1), tmp_path / "run", progress=False)
    assert states_equal(started.net.state_dict(), uninterrupted.best["state"])
    started.train()
    assert not states_equal(started.net.state_dict(), uninterrupted.best["state"])
    plain = MetaTrainer(tiny_config(steps=1), tmp_path / "plain", progress=False)
    with pytest.raises(ValueError, match="init"):
        plain.resume(started.checkpoint_path)


def test_init_with_a_mismatched_or_missing_checkpoint_fails_clearly(uninterrupted, tmp_path):
    path = uninterrupted.export(tmp_path / "start.pt", {})
    with pytest.raises(ValueError, match="another network configuration"):
        MetaTrainer(tiny_config(init=str(path), net={"d_model": 8}), tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="no pretrained checkpoint"):
        MetaTrainer(tiny_config(init="no-such-rule"), tmp_path, progress=False)


def test_cli_init_option_reaches_the_config(tmp_path):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["meta-train", "--out", str(tmp_path), "--init", "default"])
    assert config_from_args(args).init == "default"
    assert config_from_args(parser.parse_args(["meta-train", "--out", "x"])).init is None


def test_cli_model_size_options_reach_the_family():
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["meta-train", "--out", "x", "--mlp-hidden", "400", "400",
                              "--cnn-channels", "16", "32", "--transformer-size", "64", "2", "4"])
    assert config_from_args(args).family["model_sizes"] == {
        "mlp": {"hidden": (400, 400)},
        "cnn": {"channels": (16, 32)},
        "transformer": {"dim": 64, "depth": 2, "heads": 4},
    }
    defaults = config_from_args(parser.parse_args(["meta-train", "--out", "x"]))
    assert defaults.family["model_sizes"] == FamilyConfig().model_sizes


def test_compile_option_reaches_the_unrolled_estimator(tmp_path, monkeypatch):
    from metaopt.meta import cli
    from metaopt.meta.compiled import CompiledContinualSteps

    compiled = MetaTrainer(tiny_config(), tmp_path, progress=False, compile=True)
    assert isinstance(compiled.estimator.step_fn, CompiledContinualSteps)
    assert compiled.estimator.step_fn.rule_fn == compiled.rule_fn
    assert MetaTrainer(tiny_config(), tmp_path, progress=False).estimator.step_fn is None

    seen = {}

    class Stop(Exception):
        pass

    def fake_trainer(*args, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(cli, "MetaTrainer", fake_trainer)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    for argv, expected in ((["--compile"], True), ([], False)):
        with pytest.raises(Stop):
            cli.meta_train_command(parser.parse_args(["meta-train", "--out", "x", *argv]))
        assert seen["compile"] is expected


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"estimator": "sgd"}, "estimator"),
        ({"steps": 0}, "steps"),
        ({"clip": 0.0}, "clip"),
        # refused when built, not by the first checkpoint after meta-steps have run
        ({"rule_options": {"aux_dtype": torch.float32}}, "plain data"),
        ({"rule_options": {"importanc": "fisher"}}, "no options of learned_rule"),
        ({"rule_options": {"meta_params": {}}}, "no options of learned_rule"),
        ({"rule_options": {"aux_dtype": "float33"}}, "no torch dtype"),
        # values learned_rule refuses, also before any data is read
        ({"rule_options": {"importance": "bogus"}}, "rule_options: importance"),
        ({"rule_options": {"topk_fraction": 5.0}}, "rule_options: topk_fraction"),
        ({"rule_options": {"betas": [0.9]}}, "rule_options: invalid betas"),
        ({"net": {"widht": 8}}, "net: .*widht"),
        ({"family": "digits"}, "family must be a FamilyConfig"),
        ({"family": {"exemples": 100}}, "unknown FamilyConfig fields"),
        ({"family": {"examples": 3}}, "examples must be >= 20"),
    ],
)
def test_bad_config(bad, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**bad)


def test_checking_a_config_draws_no_random_numbers():
    before = torch.random.get_rng_state()
    tiny_config(net={"d_model": 8})
    assert torch.equal(torch.random.get_rng_state(), before)


def test_a_family_config_is_taken_as_its_plain_data():
    config = tiny_config(family=TINY_FAMILY)
    assert config.family == TINY_FAMILY.to_dict()
    assert config.to_dict() == tiny_config().to_dict()


@pytest.mark.parametrize(("steps", "error"), [(2.5, TypeError), (0, ValueError), (-3, ValueError)])
def test_train_refuses_a_bad_step_count_before_any_work(tmp_path, steps, error):
    trainer = MetaTrainer(tiny_config(), tmp_path, progress=False)
    with pytest.raises(error, match="steps"):
        trainer.train(steps)
    assert trainer.step == 0 and not trainer.history and not trainer.baseline


def test_the_adam_baseline_has_the_rules_betas_and_eps(tmp_path):
    """At its identity initialisation the learned rule is Adam with its betas and eps:
    the baseline the trainer reports must be that Adam, not Adam's defaults."""
    options = {"betas": [0.5, 0.6], "eps": 1e-3}
    trainer = MetaTrainer(tiny_config(rule_options=options), tmp_path, progress=False)
    learned, baseline = trainer.validate(), trainer.validate(trainer._adam())
    assert learned["meta_loss"] == pytest.approx(baseline["meta_loss"], rel=1e-5)
    default = trainer.validate(MetaTrainer(tiny_config(), tmp_path / "d", progress=False)._adam())
    assert default["meta_loss"] != pytest.approx(baseline["meta_loss"], rel=1e-5)


def test_rule_options_name_aux_dtype_as_plain_data():
    config = tiny_config(rule_options={"aux_dtype": "float32", "importance": "fisher"})
    assert config.learned_rule_options() == {"aux_dtype": torch.float32, "importance": "fisher"}
    assert TrainConfig.from_dict(config.to_dict()).rule_options == config.rule_options


def _cli(out: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "metaopt.cli", "meta-train", "--out", str(out),
            "--steps", str(steps), *CLI_ARGS]


def _step_of(path: Path) -> int:
    try:
        return int(torch.load(path, weights_only=True)["step"])
    except (FileNotFoundError, RuntimeError, EOFError, KeyError):
        return -1


@pytest.mark.slow
def test_sigkill_then_resume_continues_identically(tmp_path):
    """Three CLI processes (~30 s on 2 cores): one uninterrupted, one killed with SIGKILL
    after its 3rd checkpoint and then resumed; the results must be identical."""
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    steps = 6
    full = subprocess.Popen(_cli(tmp_path / "full", steps), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    killed = subprocess.Popen(_cli(tmp_path / "killed", steps), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "killed" / "checkpoint.pt"
    deadline = time.monotonic() + 120
    while _step_of(checkpoint) < 3 and time.monotonic() < deadline and killed.poll() is None:
        time.sleep(0.02)
    assert killed.poll() is None, "the run finished before it could be killed"
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    at_kill = _step_of(checkpoint)
    assert 3 <= at_kill < steps
    resumed = subprocess.run(_cli(tmp_path / "killed", steps), env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert full.wait(timeout=300) == 0, full.stderr.read()
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    b = torch.load(checkpoint, weights_only=True)
    assert a["step"] == b["step"] == steps
    assert states_equal(a["net"], b["net"])
    assert a["history"] == b["history"]
    assert states_equal(a["meta_optimizer"]["state"][0], b["meta_optimizer"]["state"][0])


def test_heldout_comparison_of_the_identity_rule_equals_adam(tmp_path):
    fresh = MetaTrainer(tiny_config(), tmp_path, progress=False)
    comparison = fresh.heldout_comparison(2)
    assert comparison["learned"]["meta_loss"] == pytest.approx(
        comparison["adam"]["meta_loss"], rel=1e-5
    )
    assert comparison["learned"]["acc"] == pytest.approx(comparison["adam"]["acc"])
    assert 0.0 <= comparison["learned"]["win_rate"] <= 1.0
