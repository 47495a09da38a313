"""benchmarks/single_task.py: the summary picks Adam's best learning rate per model and
column and divides correctly; a tiny run on digits prints one line per model."""

from __future__ import annotations

import re

import pytest

from tests.benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("single_task")


def test_summary_tunes_adam_per_model_and_column(bench):
    """Adam's best lr by training loss (1e-2 here) and by held-out loss (1e-3) are chosen
    separately, from the mean over seeds, and the ratio is learned / tuned."""
    rows = []
    for seed in (0, 1):
        for lr in bench.ADAM_LRS:
            train = {1e-2: 0.10, 1e-3: 0.20}.get(lr, 0.50) + 0.01 * seed
            heldout = {1e-2: 0.40, 1e-3: 0.30}.get(lr, 0.90)
            rows.append({"model": "mlp", "optimizer": f"adam lr={lr:g}", "seed": seed,
                         "train loss": train, "held-out loss": heldout})
        rows.append({"model": "mlp", "optimizer": bench.LEARNED, "seed": seed,
                     "train loss": 0.12 + 0.01 * seed, "held-out loss": 0.27})
    (line,) = bench.summarise(rows)
    assert line["tuned Adam train loss"].endswith("(0.01)")
    assert line["tuned Adam held-out loss"].endswith("(0.001)")
    assert line["train loss learned / tuned"] == f"{0.125 / 0.105:.3f}"
    assert line["held-out loss learned / tuned"] == f"{0.27 / 0.30:.3f}"


def test_tiny_run_on_digits_prints_a_line_per_model(bench, capsys):
    bench.main(["--dataset", "digits", "--models", "mlp", "--seeds", "1", "--epochs", "1",
                "--train", "128", "--heldout", "64", "--batch", "32"])
    out = capsys.readouterr().out
    (ratio,) = re.findall(r"model: mlp .*train loss learned / tuned: ([\d.]+)", out)
    assert 0 < float(ratio) < 10


def test_checkpoint_option_picks_the_learned_rule(bench, capsys, tmp_path):
    """``--checkpoint`` runs another rule than the shipped default: the Adam-identity
    initialisation trains exactly like Adam at lr 1e-3 (up to float rounding)."""
    from metaopt.learned import LearnedRuleNet, save_checkpoint

    path = save_checkpoint(LearnedRuleNet(), tmp_path / "identity.pt", {"description": "id"})
    bench.main(["--dataset", "digits", "--models", "mlp", "--seeds", "1", "--epochs", "1",
                "--train", "128", "--heldout", "64", "--batch", "32", "--checkpoint", str(path)])
    out = capsys.readouterr().out
    assert f"learned rule {str(path)!r}" in out
    learned, = re.findall(r"learned train loss: ([\d.]+)", out)
    adam, = re.findall(r"Adam 1e-3 train loss: ([\d.]+)", out)
    assert float(learned) == pytest.approx(float(adam), abs=2e-4)


def test_asking_for_more_images_than_the_split_has_is_refused(bench):
    with pytest.raises(ValueError, match="training images"):
        bench.split_train_heldout("digits", 5000, 100, None)


def test_the_learned_optimizer_gets_the_parameters_names(bench, monkeypatch):
    """As the rule was meta-trained: without names the transformer's norms read as
    biases and its embeddings as weights."""
    given = []

    class Recording(bench.LearnedOptimizer):
        def __init__(self, params, **kwargs):
            params = list(params)
            given.append(params)
            super().__init__(params, **kwargs)

    monkeypatch.setattr(bench, "LearnedOptimizer", Recording)
    bench.main(["--dataset", "digits", "--models", "mlp", "--seeds", "1", "--epochs", "1",
                "--train", "64", "--heldout", "32", "--batch", "32"])
    assert given and all(isinstance(p, tuple) and isinstance(p[0], str) for p in given[0])
