"""The continual meta-objective and the task families."""

from __future__ import annotations

import math

import pytest
import torch

import metaopt
from metaopt.continual import data as continual_data
from metaopt.learned import LearnedRuleNet, learned_rule
from metaopt.learned.tasks import learned_leaves
from metaopt.meta import Unrolled
from metaopt.meta import tasks as meta_tasks
from metaopt.meta.objective import ContinualProblem, evaluate_rule
from metaopt.meta.tasks import FamilyConfig, TaskFamily

SMALL = FamilyConfig(models=("mlp",), n_tasks=(3, 3), steps_per_task=(4, 6), examples=120)


@pytest.fixture(scope="module")
def family():
    return TaskFamily(SMALL)


def test_meta_loss_counts_current_and_earlier_tasks(family):
    """With a rule that does not move the weights, every held-out loss is constant, so the
    meta-loss must equal (1/T) sum_t mean_{j<=t} l_j exactly (no speed term)."""
    problem = family.sample(torch.Generator().manual_seed(3))
    problem.speed_weight = 0.0
    n = len(problem.tasks)
    params, buffers = problem.init({})
    losses = [float(problem.held_out_loss(params, buffers, j).detach()) for j in range(n)]
    expected = sum(sum(losses[: t + 1]) / (t + 1) for t in range(n)) / n
    metrics = evaluate_rule(metaopt.rules.sgd(lr=0.0), problem)
    assert metrics["meta_loss"] == pytest.approx(expected, rel=1e-6)
    assert metrics["bwt_loss"] == pytest.approx(0.0, abs=1e-7)
    problem.earlier_weight = w = 3.0  # earlier tasks weigh 3x the current one
    weighted = sum(
        (losses[t] + w * sum(losses[:t])) / (1 + w * t) for t in range(n)
    ) / n
    assert evaluate_rule(metaopt.rules.sgd(lr=0.0), problem)["meta_loss"] == pytest.approx(
        weighted, rel=1e-6
    )
    # normalisation: chance-level logits give 1
    task = problem.tasks[0]
    assert float(torch.nn.functional.cross_entropy(torch.zeros(4, task.n_classes),
                                                   torch.zeros(4, dtype=torch.long))
                 / math.log(task.n_classes)) == pytest.approx(1.0)


def test_speed_term_adds_points_along_each_task(family):
    problem = family.sample(torch.Generator().manual_seed(4))
    contributions = [
        (step, problem.meta_loss(*problem.init({}), step)) for step in range(problem.num_steps)
    ]
    with_loss = [step for step, c in contributions if c is not None]
    ends = [start + k - 1 for start, k in zip(problem.starts, problem.steps, strict=True)]
    assert set(ends) <= set(with_loss)
    assert len(with_loss) > len(ends)  # intermediate learning-speed points


def test_task_boundaries_reach_the_learned_state(family):
    problem = family.sample(torch.Generator().manual_seed(5))
    params, _ = problem.init({})
    rule = learned_rule(LearnedRuleNet())
    state = rule.init(params)
    loss = torch.tensor(2.0)
    same = problem.prepare_state(state, 1, loss)
    after = problem.prepare_state(state, problem.starts[1], loss)
    leaf = learned_leaves(next(iter(after.values())))[0]
    assert float(leaf.task_index) == 1.0 and leaf.pending.numel() == 1
    assert float(learned_leaves(next(iter(same.values())))[0].task_index) == 0.0
    adam_state = metaopt.rules.adam().init(params)
    assert problem.prepare_state(adam_state, problem.starts[1], loss) is adam_state


def test_adam_identity_initialisation_scores_like_adam(family):
    problem = family.sample(torch.Generator().manual_seed(6))
    learned = evaluate_rule(learned_rule(LearnedRuleNet(), 1e-3), problem)
    adam = evaluate_rule(metaopt.rules.adam(1e-3), problem)
    assert learned["meta_loss"] == pytest.approx(adam["meta_loss"], rel=1e-5)
    assert learned["acc"] == pytest.approx(adam["acc"])


def test_unrolled_meta_gradient_through_a_sequence_with_boundaries(family):
    """Meta-gradient w.r.t. Adam's lr through a 3-task sequence: finite and equal to a
    central difference (float32, so a loose tolerance)."""
    problem = family.sample(torch.Generator().manual_seed(7))
    rule_fn = lambda mp: metaopt.rules.adam(lr=mp["lr"], eps_root=1e-12)  # noqa: E731
    mp = {"lr": torch.tensor(0.01)}
    grad = Unrolled(rule_fn)(mp, problem).grads["lr"]
    h = 1e-5  # the loss is strongly curved in Adam's lr: a small step
    plus = Unrolled(rule_fn)({"lr": torch.tensor(0.01 + h)}, problem).loss
    minus = Unrolled(rule_fn)({"lr": torch.tensor(0.01 - h)}, problem).loss
    assert float(grad) == pytest.approx(float(plus - minus) / (2 * h), rel=0.05)


def test_family_uses_training_images_only_and_is_reproducible(monkeypatch, data_dir):
    calls = []
    real = continual_data.load_idx_dataset

    def spy(name, data_dir=None, split="train"):
        calls.append((name, split))
        return real(name, data_dir, split)

    monkeypatch.setattr(meta_tasks, "load_idx_dataset", spy)
    config = FamilyConfig(datasets=("digits", "mnist"), models=("cnn", "transformer"),
                          examples=100)
    fam = TaskFamily(config, data_dir=str(data_dir))
    val = TaskFamily(config, part="val", data_dir=str(data_dir))
    assert set(calls) == {("mnist", "train")}
    assert fam.pools["mnist"][0].shape[1:] == (1, 14, 14)
    assert len(fam.pools["mnist"][1]) + len(val.pools["mnist"][1]) == 60000
    a = fam.sample(torch.Generator().manual_seed(1))
    b = fam.sample(torch.Generator().manual_seed(1))
    assert a.description == b.description
    assert torch.equal(a.tasks[0].x_train, b.tasks[0].x_train)


def test_family_rejects_unknown_choices():
    with pytest.raises(ValueError, match="held out of meta-training"):
        FamilyConfig(datasets=("fashion-mnist",))
    with pytest.raises(ValueError, match="unknown dataset"):
        FamilyConfig(datasets=("../mnist",))
    with pytest.raises(ValueError, match="steps_per_task"):
        FamilyConfig(steps_per_task=(5, 2))
    with pytest.raises(ValueError, match="part"):
        TaskFamily(SMALL, part="test")
    with pytest.raises(ValueError, match="steps_per_task"):
        ContinualProblem(torch.nn.Linear(2, 2), [object()], steps_per_task=[0])


def test_family_refuses_a_string_where_names_belong():
    with pytest.raises(ValueError, match="tuple of names"):
        FamilyConfig(datasets="digits")


def test_every_task_of_a_drawn_sequence_has_training_and_held_out_examples(monkeypatch):
    """60 examples over 5 two-class tasks: about one draw in five left a task without
    held-out (NaN meta-loss) or training examples (an error mid-run); such draws are
    drawn again, and a family too small for that gives up with a clear error."""
    config = FamilyConfig(models=("mlp",), kinds=("split",), n_tasks=(5, 5),
                          steps_per_task=(1, 1), examples=60)
    family = TaskFamily(config)
    for seed in range(40):
        problem = family.sample(torch.Generator().manual_seed(seed))
        assert all(len(t.y_train) and len(t.y_test) for t in problem.tasks)
    monkeypatch.setattr(meta_tasks, "MAX_DRAWS", 1)
    failures = 0
    for seed in range(40):
        try:
            family.sample(torch.Generator().manual_seed(seed))
        except ValueError as error:
            assert "raise examples or lower n_tasks" in str(error)
            failures += 1
    assert failures


def test_family_model_sizes_reach_the_models_and_misfits_fail_up_front():
    """``model_sizes`` set every model a sequence draws (the paper suite's sizes here);
    sizes that cannot be built for a pool's images fail when the family is made (they
    used to fail when a sequence first drew that model, possibly hours into a run), and
    checking them draws nothing from the global random state."""
    paper = {"mlp": {"hidden": (400, 400)}, "cnn": {"channels": (16, 32)},
             "transformer": {"dim": 64, "depth": 2, "heads": 4}}
    family = TaskFamily(FamilyConfig(n_tasks=(2, 2), steps_per_task=(2, 2), examples=60,
                                     model_sizes=paper))
    gen = torch.Generator().manual_seed(0)
    seen = {}
    for _ in range(12):
        problem = family.sample(gen)
        seen[problem.description.split("/")[2]] = problem.model.module
    assert [m.shape for m in seen["mlp"].parameters()][:2] == [(400, 64), (400,)]
    assert seen["cnn"].net[0].out_channels == 16 and seen["cnn"].net[4].out_channels == 32
    assert seen["transformer"].head.in_features == 64
    assert len(seen["transformer"].encoder.layers) == 2
    assert seen["transformer"].encoder.layers[0].self_attn.num_heads == 4

    state = torch.random.get_rng_state()
    with pytest.raises(ValueError, match=r"model_sizes\['cnn'\].*does not fit 'digits' \(1x8x8"):
        TaskFamily(FamilyConfig(model_sizes={**paper, "cnn": {"channels": (4, 4, 4, 4)}}))
    TaskFamily(FamilyConfig(model_sizes=paper))
    assert torch.equal(torch.random.get_rng_state(), state)
    with pytest.raises(ValueError, match=r"no entry for \['cnn'\]"):
        FamilyConfig(models=("mlp", "cnn"), model_sizes={"mlp": {"hidden": (8,)}})
    config = FamilyConfig()
    config.model_sizes["mlp"]["hidden"] = (7,)  # a config's sizes are its own
    assert meta_tasks.SMALL_MODELS["mlp"]["hidden"] == (32,)
    assert FamilyConfig().model_sizes["mlp"]["hidden"] == (32,)
    with pytest.raises(ValueError, match="dim 10 must be a multiple of heads 3"):
        FamilyConfig(models=("transformer",),
                     model_sizes={"transformer": {"dim": 10, "depth": 1, "heads": 3}})


def test_family_on_a_folder_dataset(tmp_path, capsys):
    """A folder of IDX files in the data directory is a pool like MNIST: its training
    images only, pooled to ``mnist_size`` with their aspect ratio, its own classes for
    split sequences (too few for the longest ones: an error before any sequence), and
    ``metaopt meta-train --datasets <folder>`` trains and exports on it."""
    from metaopt.cli import main
    from tests.idx_files import toy_idx_dataset

    toy_idx_dataset(tmp_path, "toy", (3, 20, 16), n_classes=6, n=(300, 10))
    config = FamilyConfig(datasets=("toy",), models=("mlp", "cnn"), n_tasks=(2, 3),
                          steps_per_task=(2, 3), examples=120, mnist_size=10)
    family = TaskFamily(config, data_dir=str(tmp_path))
    val = TaskFamily(config, part="val", data_dir=str(tmp_path))
    assert family.pools["toy"][0].shape[1:] == (3, 10, 8)
    assert len(family.pools["toy"][1]) + len(val.pools["toy"][1]) == 300  # training file
    gen = torch.Generator().manual_seed(0)
    kinds = set()
    for _ in range(12):
        problem = family.sample(gen)
        kinds.add(problem.description.split("/")[1])
        assert problem.tasks[0].x_train.shape[1:] == (3, 10, 8)
        metrics = evaluate_rule(metaopt.rules.adam(1e-2), problem)
        assert math.isfinite(metrics["meta_loss"]) and 0.0 <= metrics["acc"] <= 1.0
    assert kinds == {"split", "permuted", "rotated"}
    with pytest.raises(ValueError, match="6 classes: too few"):
        TaskFamily(FamilyConfig(datasets=("toy",), n_tasks=(2, 4)), data_dir=str(tmp_path))

    export = tmp_path / "rule.pt"
    argv = ["meta-train", "--out", str(tmp_path / "run"), "--datasets", "toy", "--data-dir",
            str(tmp_path), "--steps", "1", "--tasks-per-step", "1", "--n-tasks", "2", "2",
            "--steps-per-task", "2", "2", "--models", "mlp", "--val-tasks", "1",
            "--val-every", "1", "--mnist-size", "10", "--no-progress", "--export", str(export)]
    assert main(argv) == 0
    meta = torch.load(export, weights_only=True)["metadata"]
    assert meta["trained_on"].startswith("toy training images")
    assert meta["train_config"]["family"]["datasets"] == ["toy"]
