"""CUDA correctness: the drop-in optimizers, the compiled steps and meta-training on a GPU
give what they give on the CPU (or eagerly). Skipped where CUDA is not available (CI);
run on a GPU machine with ``benchmarks/gpu_check.sh``, which also times the steps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import metaopt
from metaopt import LearnedOptimizer
from metaopt.compile import make_step
from metaopt.learned import LearnedRuleNet, learned_rule, load_pretrained
from metaopt.meta.trainer import MetaTrainer
from tests.compile.compile_models import batches, build
from tests.meta.test_trainer import tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CUDA = torch.device("cuda")
MODELS = ("mlp", "cnn", "transformer")
TOL = {"atol": 1e-5, "rtol": 1e-5}


def _random_grads(params: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    """The same gradients on any device: drawn on the CPU from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen) * 1e-2 for p in params]


def _step_with(opt: torch.optim.Optimizer, params: list[torch.Tensor], steps: int) -> None:
    """``steps`` steps on fixed random gradients, a task boundary halfway (when ``opt``
    has one)."""
    for step in range(steps):
        for p, g in zip(params, _random_grads(params, step), strict=True):
            p.grad = g.to(p.device)
        opt.step()
        if step == steps // 2 and hasattr(opt, "new_task"):
            opt.new_task()


def _params(kind: str, device: torch.device) -> list[torch.Tensor]:
    return [p for p in build(kind).to(device).parameters() if p.requires_grad]


@pytest.mark.parametrize("kind", MODELS)
def test_learned_optimizer_on_cuda_matches_the_cpu(kind):
    """The shipped rule, eager, across a task boundary: same updates on both devices; the
    net it loads itself goes to the parameters' device."""
    runs = []
    for device in (torch.device("cpu"), CUDA):
        params = _params(kind, device)
        opt = LearnedOptimizer(params, lr=1e-3)
        assert next(opt.net.parameters()).device.type == device.type
        _step_with(opt, params, 10)
        runs.append([p.detach().cpu() for p in params])
    start = [p.detach() for p in _params(kind, torch.device("cpu"))]
    for cpu, cuda in zip(*runs, strict=True):
        torch.testing.assert_close(cuda, cpu, **TOL)
    assert max((a - b).abs().max().item() for a, b in zip(runs[0], start, strict=True)) > 1e-4


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_compiled_learned_optimizer_on_cuda_matches_eager(kind):
    """``compile=True`` (the fused in-place step, Triton kernels) against the eager step,
    both on the GPU, across a task boundary (where the compiled step recompiles)."""
    runs = []
    for compile in (False, True):
        params = _params(kind, CUDA)
        opt = LearnedOptimizer(params, lr=1e-3, compile=compile)
        _step_with(opt, params, 6)
        runs.append([p.detach() for p in params])
    for eager, compiled in zip(*runs, strict=True):
        torch.testing.assert_close(compiled, eager, **TOL)


def test_adam_identity_on_cuda():
    """A fresh LearnedRuleNet is Adam: equal to fused torch.optim.Adam on the GPU within
    1e-6 over 50 steps."""
    ours, theirs = _params("mlp", CUDA), _params("mlp", CUDA)
    _step_with(LearnedOptimizer(ours, lr=1e-3, net=LearnedRuleNet().to(CUDA)), ours, 50)
    _step_with(torch.optim.Adam(theirs, lr=1e-3, fused=True), theirs, 50)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("rule_name", ["adam", "learned"])
def test_compiled_step_on_cuda_matches_eager(rule_name):
    """make_step on the CNN with batchnorm: compiled (fullgraph) == eager on the GPU."""
    model = build("cnn").to(CUDA)
    data = [tuple(t.to(CUDA) for t in batch) for batch in batches("cnn", 4)]
    rule = (
        metaopt.rules.adam(lr=1e-2)
        if rule_name == "adam"
        else learned_rule(load_pretrained("default").to(CUDA), lr=1e-2)
    )
    finals = []
    for compile in (True, False):
        step = make_step(model, F.cross_entropy, rule, compile=compile)  # fullgraph
        params, buffers, state = step.init(model)
        for batch in data:
            params, buffers, state, _ = step(params, buffers, state, batch)
        finals.append((params, buffers))
    for tree_compiled, tree_eager in zip(*finals, strict=True):
        for name in tree_eager:
            torch.testing.assert_close(tree_compiled[name], tree_eager[name], **TOL)


def test_meta_training_on_cuda_matches_the_cpu(tmp_path):
    """Two meta-steps of the unrolled estimator (digits, MLP): the same meta-parameters
    and meta-losses on the GPU as on the CPU (float32, so within rounding)."""
    trainers = []
    for device in ("cpu", "cuda"):
        trainer = MetaTrainer(
            tiny_config(steps=2), tmp_path / device, progress=False, device=device
        )
        trainer.train()
        trainers.append(trainer)
    cpu, cuda = trainers
    for name, value in cpu.net.state_dict().items():
        torch.testing.assert_close(cuda.net.state_dict()[name].cpu(), value, atol=1e-4, rtol=1e-4)
    losses = [[r["meta_loss"] for r in t.history if "meta_loss" in r] for t in trainers]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_grad_scaler_with_learned_optimizer_on_cuda():
    """Mixed precision with ``torch.amp.GradScaler``: steps move the parameters, a step
    whose gradients overflow is skipped (parameters bit-identical)."""
    torch.manual_seed(0)
    model = build("mlp").to(CUDA)
    opt = LearnedOptimizer(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda")
    x, y = (t.to(CUDA) for t in batches("mlp", 1)[0])
    losses = []
    for _ in range(20):
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    with torch.autocast("cuda", dtype=torch.float16):
        loss = F.cross_entropy(model(x), y) * float("inf")
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
