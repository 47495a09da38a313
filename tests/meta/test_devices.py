"""Meta-training on a device other than the CPU.

No GPU is needed: the ``meta`` device holds shapes but no values, and any tensor the
estimators create on the CPU and mix with the problem's (a loss weight, an accumulator,
a logit range) raises a device mismatch there, as it would on a GPU. Values are checked
on the CPU (``device="cpu"`` trains exactly as the default)."""

from __future__ import annotations

import argparse

import pytest
import torch

from metaopt.learned import LearnedRuleNet, learned_rule
from metaopt.meta import ES, PES, Unrolled
from metaopt.meta.cli import process_device, register
from metaopt.meta.distributed import DistributedContext, all_reduce_mean
from metaopt.meta.tasks import FamilyConfig, TaskFamily
from metaopt.meta.trainer import MetaTrainer
from tests.meta.test_trainer import states_equal, tiny_config

META = torch.device("meta")


@pytest.fixture(scope="module")
def family() -> TaskFamily:
    return TaskFamily(FamilyConfig(n_tasks=(2, 2), steps_per_task=(2, 3), examples=80))


def test_a_problem_moved_to_a_device_holds_every_tensor_there(family):
    problem = family.sample(torch.Generator().manual_seed(0)).to(META)
    params, buffers = problem.init({})
    tensors = [*params.values(), *buffers.values(), *problem._batches, *problem._meta]
    for task in problem.tasks:
        tensors += [v for v in vars(task).values() if isinstance(v, torch.Tensor)]
    for step in range(problem.num_steps):
        tensors += list(problem.step_batch(step))
    assert tensors and all(t.device == META for t in tensors)


def _covering(family: TaskFamily) -> list:
    """Sequences covering every stream kind and every model of the family (3 of them)."""
    gen, chosen, kinds, models = torch.Generator().manual_seed(1), [], set(), set()
    while len(kinds) < 3 or len(models) < 3:
        problem = family.sample(gen)
        _, kind, model, *_ = problem.description.split("/")
        if kind not in kinds or model not in models:
            chosen.append(problem)
            kinds.add(kind)
            models.add(model)
    return chosen


@pytest.mark.parametrize("estimator", ["unrolled", "es", "pes"])
def test_estimators_keep_every_tensor_on_the_problems_device(family, estimator):
    """With the learned rule, across task boundaries (unrolled: every model and stream
    kind of the family): nothing is created on the CPU on the way (it would raise on
    ``meta``)."""
    net = LearnedRuleNet().to(META)
    meta_params = {k: v.detach() for k, v in net.named_parameters()}

    def rule_fn(mp):
        return learned_rule(net, 1e-3, meta_params=mp)

    noise = torch.Generator().manual_seed(0)  # a CPU generator: the noise is moved
    make = {
        "unrolled": lambda: Unrolled(rule_fn, truncation=2),
        "es": lambda: ES(rule_fn, 0.01, 1, noise),
        "pes": lambda: PES(rule_fn, 2, 0.01, 1, noise),
    }[estimator]
    problems = _covering(family)
    for problem in problems if estimator == "unrolled" else problems[:1]:
        result = make()(meta_params, problem.to(META))
        assert result.loss.device == META
        assert all(g.device == META for g in result.grads.values())


def test_trainer_device_option(tmp_path):
    default = MetaTrainer(tiny_config(steps=1), tmp_path / "a", progress=False)
    default.train()
    on_cpu = MetaTrainer(tiny_config(steps=1), tmp_path / "b", progress=False, device="cpu")
    on_cpu.train()
    assert on_cpu.device == torch.device("cpu")
    assert states_equal(default.net.state_dict(), on_cpu.net.state_dict())
    with pytest.raises(ValueError, match="meta"):
        MetaTrainer(tiny_config(), tmp_path / "c", progress=False, device="meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="'cuda' is not available"):
            MetaTrainer(tiny_config(), tmp_path / "c", progress=False, device="cuda")


def test_cli_device_is_each_processes_own_gpu_under_torchrun(monkeypatch):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    assert parser.parse_args(["meta-train", "--out", "x"]).device == "cpu"
    two = DistributedContext(rank=1, world_size=2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert process_device("cuda", two) == torch.device("cuda", 1)
    assert process_device("cuda:0", two) == torch.device("cuda", 0)
    assert process_device("cuda", DistributedContext()) == torch.device("cuda")
    assert process_device("cpu", two) == torch.device("cpu")


def test_all_reduce_mean_takes_a_cpu_loss_sum_with_gradients_on_a_device():
    """The trainer sums losses on the CPU (float64) whatever the device; the mean comes back
    on the gradients' device (a CPU loss sum made meta-training on CUDA fail here)."""
    sums = {"w": torch.ones(2, 3, device=META), "b": torch.ones(3, device=META)}
    grads, loss = all_reduce_mean(sums, torch.tensor(4.0, dtype=torch.float64), 2,
                                  DistributedContext())
    assert loss.device == META and loss.shape == ()
    assert {k: (g.device, g.shape) for k, g in grads.items()} == {
        "w": (META, (2, 3)), "b": (META, (3,))
    }
    cpu_grads, cpu_loss = all_reduce_mean({"w": torch.full((2,), 3.0)}, torch.tensor(4.0), 2,
                                          DistributedContext())
    assert cpu_loss.item() == 2.0 and cpu_grads["w"].tolist() == [1.5, 1.5]
