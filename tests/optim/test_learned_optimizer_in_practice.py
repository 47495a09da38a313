"""LearnedOptimizer and FunctionalOptimizer in realistic training code, with the shipped
``default`` checkpoint: gradient and loss scales, schedules, param groups, long runs,
many tasks, precision and a plain single-task comparison with ``torch.optim.Adam``."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from metaopt import LearnedOptimizer
from metaopt.learned import LearnedRuleNet, load_pretrained
from metaopt.learned.tasks import IMPORTANCE_CAP


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: thread hand-off would dominate
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def default_net() -> LearnedRuleNet:
    """The shipped ``default`` checkpoint, loaded once (each optimizer gets a copy)."""
    return load_pretrained("default")


def _mlp(seed: int = 0) -> nn.Sequential:
    """A tiny 8-16-4 tanh MLP."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def _batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """32 inputs for :func:`_mlp` and their class labels."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 8, generator=g), torch.randint(0, 4, (32,), generator=g)


def _moves(model: nn.Module, start: nn.Module) -> torch.Tensor:
    """All parameters' changes since ``start``, flattened, in float64."""
    pairs = zip(model.parameters(), start.parameters(), strict=True)
    return torch.cat([(p - q).detach().flatten().double() for p, q in pairs])


def _train_scaled(net: nn.Module, scale: float, steps: int = 6) -> torch.Tensor:
    """Parameter changes after ``steps`` steps on ``scale`` x the loss, across a task
    boundary (the importance terms are then active too)."""
    model = _mlp()
    start = copy.deepcopy(model)
    opt = LearnedOptimizer(model.parameters(), lr=1e-3, net=copy.deepcopy(net))
    x, y = _batch()
    for step in range(steps):
        if step == steps // 2:
            opt.new_task()
        opt.zero_grad()
        (scale * nn.functional.cross_entropy(model(x), y)).backward()
        opt.step()
    return _moves(model, start)


@pytest.mark.parametrize("scale", [1e8, 1e11, 1e14])  # e.g. summed squared errors in dollars
def test_scaling_the_loss_up_does_not_change_the_updates(default_net, scale):
    """Adam's step does not depend on the scale of the loss (up to eps), and the learned
    rule's features are documented as ratios that no constant factor changes. Bound:
    bfloat16 anchor and importance round differently at different scales, which moves
    the updates by about 2e-4 (relative) even at scales such as 100; features clamped at
    large gradients (and a correlation whose denominator overflowed) moved them by 5e-3
    (x 1e8) to 0.13 (x 1e11)."""
    reference = _train_scaled(default_net, 1.0)
    scaled = _train_scaled(default_net, scale)
    assert torch.isfinite(scaled).all()
    deviation = float((scaled - reference).abs().max() / reference.abs().max())
    assert deviation < 1e-3, f"loss x {scale:g}: updates differ by {deviation:.2e} (relative)"


@pytest.mark.parametrize("scale", [1e20, 1e24, 1e30])
def test_finite_gradients_whose_squares_overflow_leave_parameters_finite(default_net, scale):
    """Gradients above about 1.8e19 are finite (the finite check lets them through) but
    their squares overflow float32. ``torch.optim.Adam`` then divides by an infinite
    second moment and leaves those elements where they are; the learned rule turned its
    token statistics into NaN (inf - inf, inf / inf), and the attention spread the NaN
    to every parameter of the group. Across a task boundary: see the next test."""
    model = _mlp()
    opt = LearnedOptimizer(model.parameters(), lr=1e-3, net=copy.deepcopy(default_net))
    x, y = _batch()
    for _ in range(2):
        opt.zero_grad()
        (scale * nn.functional.cross_entropy(model(x), y)).backward()
        opt.step()
        assert all(torch.isfinite(p).all() for p in model.parameters()), scale


@pytest.mark.parametrize("importance", ["path", "weight_grad", "fisher"])
@pytest.mark.parametrize("scale", [1e22, 1e30])
def test_a_task_with_overflowing_squares_leaves_the_next_task_finite(
    default_net, importance, scale
):
    """A task whose gradients' squares overflow (infinite second moments) is folded at
    the boundary into an infinite (``|w - anchor| * inf``, ``v``) or NaN (``0 * inf``)
    importance, whose averages then NaN'ed every parameter at the next task's first
    step. Now the importance is capped at ``IMPORTANCE_CAP`` and the next task trains."""
    model = _mlp()
    opt = LearnedOptimizer(
        model.parameters(), lr=1e-3, net=copy.deepcopy(default_net), importance=importance
    )
    x, y = _batch()
    for _ in range(2):
        opt.zero_grad()
        (scale * nn.functional.cross_entropy(model(x), y)).backward()
        opt.step()
    opt.new_task()
    losses = []
    for _ in range(10):
        losses.append(float(_closure_step(opt, model, x, y)))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for p in model.parameters():
        importance_buffer = opt.state[p][".importance"].float()
        assert torch.isfinite(importance_buffer).all()
        assert float(importance_buffer.max()) <= IMPORTANCE_CAP * 1.01  # bfloat16 rounding
    assert losses[-1] < losses[0]


def _closure_step(
    opt: torch.optim.Optimizer, model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """One ``opt.step(closure)`` on the cross-entropy of ``model(x)``; returns the loss."""

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return opt.step(closure)


def test_checkpoint_through_torch_save_continues_identically_in_a_new_model(default_net, tmp_path):
    """Save model and optimizer mid-task (after a boundary, closure losses observed),
    ``torch.load(weights_only=True)`` both into fresh instances: the two runs then take
    the same steps, bit for bit."""
    model = _mlp()
    groups = [
        {"params": [model[0].weight, model[2].weight]},
        {"params": [model[0].bias, model[2].bias], "lr": 5e-4},
    ]
    opt = LearnedOptimizer(groups, lr=1e-3, net=copy.deepcopy(default_net))
    x, y = _batch()
    for step in range(6):
        if step == 3:
            opt.new_task()
        _closure_step(opt, model, x, y)
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
    saved = torch.load(path, weights_only=True)
    twin = _mlp(seed=99)
    twin.load_state_dict(saved["model"])
    twin_groups = [
        {"params": [twin[0].weight, twin[2].weight]},
        {"params": [twin[0].bias, twin[2].bias], "lr": 5e-4},
    ]
    twin_opt = LearnedOptimizer(twin_groups, lr=1e-3, net=copy.deepcopy(default_net))
    twin_opt.load_state_dict(saved["opt"])
    assert twin_opt.task_index == opt.task_index == 1
    for step in range(4):
        if step == 2:
            opt.new_task()
            twin_opt.new_task()
        _closure_step(opt, model, x, y)
        _closure_step(twin_opt, twin, x, y)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


class _TinyLM(nn.Module):
    """Embedding -> LayerNorm -> Linear -> output tied to the embedding (GPT-2 style)."""

    def __init__(self, vocab: int = 24, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.ln = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)
        self.out = nn.Linear(width, vocab, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.fc(self.ln(self.embed(tokens)))))


def _hf_groups(model: nn.Module) -> list[dict]:
    """Hugging Face's grouping: no weight decay for biases and LayerNorm weights."""
    no_decay = ("bias", "ln.")
    named = list(model.named_parameters())  # the tied weight appears once
    return [
        {"params": [p for n, p in named if not any(k in n for k in no_decay)]},
        {"params": [p for n, p in named if any(k in n for k in no_decay)]},
    ]


def test_hf_style_training_loop_with_tied_embeddings(default_net):
    """Two groups, a tied input/output embedding, gradient accumulation over two micro
    batches under bfloat16 autocast, ``clip_grad_norm_`` and a warmup from lr 0: every
    parameter stays finite and float32, the tied weight is stepped once per step, and the
    loss falls."""
    torch.manual_seed(3)
    model = _TinyLM()
    opt = LearnedOptimizer(_hf_groups(model), lr=3e-3, net=copy.deepcopy(default_net))
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, step / 5))
    g = torch.Generator().manual_seed(4)
    data = torch.randint(0, 24, (16,), generator=g)
    target = (data * 7 + 3) % 24

    def loss_of() -> float:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return float(nn.functional.cross_entropy(model(data), target))

    first = loss_of()
    for _ in range(40):
        opt.zero_grad(set_to_none=False)
        for half in (slice(0, 8), slice(8, 16)):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                micro = nn.functional.cross_entropy(model(data[half]), target[half]) / 2
            micro.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        warmup.step()
    assert model.out.weight is model.embed.weight
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    assert float(opt.state[model.embed.weight][".step"]) == 40.0
    assert loss_of() < 0.5 * first


def test_freezing_layers_and_adding_heads_between_tasks(default_net):
    """Class-incremental training: a new head per task through ``add_param_group``, the
    first layer frozen with ``requires_grad_(False)`` from the second task on and thawed
    in the third. Frozen parameters do not move, new heads start at the optimizer's task
    index, everything stays finite."""
    torch.manual_seed(5)
    body = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
    heads: list[nn.Linear] = []
    opt = LearnedOptimizer(body.parameters(), lr=1e-3, net=copy.deepcopy(default_net))
    for task in range(3):
        head = nn.Linear(16, 2)
        heads.append(head)
        opt.add_param_group({"params": list(head.parameters())})
        body[0].requires_grad_(task != 1)
        frozen = [p.detach().clone() for p in body[0].parameters()]
        g = torch.Generator().manual_seed(task)
        for _ in range(5):
            x, y = torch.randn(16, 8, generator=g), torch.randint(0, 2, (16,), generator=g)
            opt.zero_grad()
            nn.functional.cross_entropy(head(body(x)), y).backward()
            opt.step()
        if task == 1:
            assert all(torch.equal(p, q) for p, q in zip(body[0].parameters(), frozen, strict=True))
        assert float(opt.state[head.weight][".task_index"]) == task
        assert float(opt.state[head.weight][".step"]) == 5.0
        opt.new_task()
    assert float(opt.state[body[0].weight][".step"]) == 10.0  # skipped while frozen
    everything = [*body.parameters(), *(p for h in heads for p in h.parameters())]
    assert all(torch.isfinite(p).all() for p in everything)
    for p in everything:
        state = opt.state[p]
        assert torch.isfinite(state[".anchor"]).all() and torch.isfinite(state[".importance"]).all()


@pytest.mark.slow
def test_long_run_keeps_counters_exact_and_state_size_constant(default_net):
    """3,000 steps with closures on a tiny model: exact float32 counters, a state of
    constant size (nothing grows with the step count), finite parameters."""
    model = _mlp()
    opt = LearnedOptimizer(model.parameters(), lr=1e-3, net=copy.deepcopy(default_net))
    x, y = _batch()

    def state_bytes() -> int:
        return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values())

    _closure_step(opt, model, x, y)
    size = state_bytes()
    for _ in range(2999):
        _closure_step(opt, model, x, y)
    assert state_bytes() == size
    state = opt.state[model[0].weight]
    assert float(state[".step"]) == float(state[".task_step"]) == 3000.0
    assert float(state[".loss_stats"][3]) == 3000.0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert len(opt._workspace) <= 2  # one parameter list: its two scratch buffers


@pytest.mark.slow
@pytest.mark.parametrize("importance", ["path", "weight_grad", "fisher"])
def test_hundreds_of_tasks_keep_importance_and_anchor_finite(default_net, importance):
    """300 short tasks: the accumulated importance stays finite (bfloat16 buffers) and
    the parameters too; the task index counts every boundary."""
    model = _mlp()
    opt = LearnedOptimizer(
        model.parameters(), lr=1e-3, net=copy.deepcopy(default_net), importance=importance
    )
    g = torch.Generator().manual_seed(6)
    for _ in range(300):
        x, y = torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
        for _ in range(2):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        opt.new_task()
    assert opt.task_index == 300
    for p in model.parameters():
        state = opt.state[p]
        assert float(state[".task_index"]) == 300.0 and torch.isfinite(p).all()
        assert torch.isfinite(state[".importance"]).all() and torch.isfinite(state[".anchor"]).all()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_trains_a_digits_mlp_about_as_well_as_adam(default_net, dtype):
    """Plain single-task training (sklearn digits, 64-32-10 MLP, 150 steps of 64): the
    shipped rule brings the training loss down at least as far as Adam at the same lr,
    within a margin, in every dtype."""
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    x = torch.tensor(digits.data, dtype=dtype) / 16
    y = torch.tensor(digits.target)
    torch.manual_seed(7)
    base = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).to(dtype)
    g = torch.Generator().manual_seed(8)
    batches = [torch.randint(0, len(x), (64,), generator=g) for _ in range(150)]
    final = {}
    for name in ("learned", "adam"):
        model = copy.deepcopy(base)
        if name == "learned":
            opt = LearnedOptimizer(model.parameters(), lr=1e-3, net=copy.deepcopy(default_net))
        else:
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for batch in batches:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            opt.step()
        with torch.no_grad():
            final[name] = float(nn.functional.cross_entropy(model(x).float(), y))
    assert final["learned"] < 1.0  # from about 2.3
    assert final["learned"] < 1.25 * final["adam"], final


@pytest.mark.slow
def test_compiled_groups_of_different_layouts_do_not_exhaust_the_recompile_limit():
    """``compile=True`` with groups of different layouts (a bias-free matrix alone; a
    matrix and a bias; different learning rates, so each is an update call of its own):
    each needs its own graph. Dynamo compiles one function at most
    ``recompile_limit`` times and then, under ``fullgraph=True``, raises; a shared
    compiled step hit that with enough groups (limit 1 here stands in for the default 8,
    which the groups' layouts and task variants of a real model can exceed)."""
    torch.manual_seed(9)
    compiled = nn.ModuleList([nn.Linear(8, 16, bias=False), nn.Linear(16, 4)])
    eager = copy.deepcopy(compiled)
    optimizers = [
        LearnedOptimizer(
            [
                {"params": list(m.parameters()), "lr": lr}
                for m, lr in zip(modules, (1e-3, 2e-3), strict=True)
            ],
            **kw,
        )
        for modules, kw in ((compiled, {"compile": True}), (eager, {}))
    ]
    g = torch.Generator().manual_seed(10)
    with torch._dynamo.config.patch(recompile_limit=1):
        for _ in range(2):
            x, y = torch.randn(4, 8, generator=g), torch.randint(0, 4, (4,), generator=g)
            for modules, opt in zip((compiled, eager), optimizers, strict=True):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(modules[1](torch.tanh(modules[0](x))), y)
                loss.backward()
                opt.step()
    for p, q in zip(compiled.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_weight_decay_in_a_group_is_refused_not_ignored(default_net):
    """Hugging Face-style groups carry ``weight_decay``; ``torch.optim.Adam`` applies it,
    the learned rule has no such hyper-parameter (it learned its own decay towards zero),
    so a non-zero value is refused with a clear error instead of being silently dropped;
    0 (the no-decay group) is accepted. A refused group changes nothing."""
    model = _TinyLM()
    decay, no_decay = _hf_groups(model)
    with pytest.raises(ValueError, match="weight_decay"):
        LearnedOptimizer(
            [{**decay, "weight_decay": 0.01}, {**no_decay, "weight_decay": 0.0}],
            net=copy.deepcopy(default_net),
        )
    opt = LearnedOptimizer([{**no_decay, "weight_decay": 0.0}], net=copy.deepcopy(default_net))
    with pytest.raises(ValueError, match="weight_decay"):
        opt.add_param_group({**decay, "weight_decay": 0.1})
    assert len(opt.param_groups) == 1
    opt.add_param_group({**decay, "weight_decay": 0})
    assert len(opt.param_groups) == 2


@pytest.mark.slow
def test_compiled_model_swa_and_chained_schedulers_step_like_adam_at_init():
    """``torch.compile(model)`` (its parameters named ``_orig_mod.*``), a warmup chained
    into a cosine schedule, then SWA (``AveragedModel`` + ``SWALR``): a fresh rule (Adam
    at initialisation) takes torch.optim.Adam's steps and SWA averages the same weights."""
    runs = []
    for make in (
        lambda ps: LearnedOptimizer(ps, lr=1e-2, net=LearnedRuleNet()),
        lambda ps: torch.optim.Adam(ps, lr=1e-2),
    ):
        model = _mlp(seed=11)
        compiled = torch.compile(model)
        opt = make(compiled.named_parameters())
        warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 4))
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8)
        schedule = torch.optim.lr_scheduler.ChainedScheduler([warmup, cosine], optimizer=opt)
        swa_model = torch.optim.swa_utils.AveragedModel(model)
        swa_schedule = torch.optim.swa_utils.SWALR(opt, swa_lr=5e-3, anneal_epochs=2)
        x, y = _batch(seed=12)
        for step in range(12):
            opt.zero_grad()
            nn.functional.cross_entropy(compiled(x), y).backward()
            opt.step()
            if step < 8:
                schedule.step()
            else:
                swa_model.update_parameters(model)
                swa_schedule.step()
        runs.append((model, swa_model, opt.param_groups[0]["lr"]))
    (ours, ours_swa, our_lr), (ref, ref_swa, ref_lr) = runs
    assert our_lr == pytest.approx(ref_lr)
    for p, q in zip(
        [*ours.parameters(), *ours_swa.parameters()],
        [*ref.parameters(), *ref_swa.parameters()],
        strict=True,
    ):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_functional_adamw_runs_an_hf_style_loop_like_torch_adamw():
    """The same Hugging Face-style loop (decay / no-decay groups, tied embeddings,
    accumulation under bfloat16 autocast with ``zero_grad(set_to_none=False)``,
    clipping, warmup) with ``FunctionalOptimizer(metaopt.rules.adamw)`` and with
    ``torch.optim.AdamW``: the same parameters."""
    from metaopt import FunctionalOptimizer
    from metaopt.rules import adamw

    torch.manual_seed(13)
    ours, ref = _TinyLM(), _TinyLM()
    ref.load_state_dict(ours.state_dict())
    optimizers = []
    for model, make in (
        (ours, lambda groups: FunctionalOptimizer(groups, adamw, lr=1e-2)),
        (ref, lambda groups: torch.optim.AdamW(groups, lr=1e-2)),
    ):
        decay, no_decay = _hf_groups(model)
        opt = make([{**decay, "weight_decay": 0.1}, {**no_decay, "weight_decay": 0.0}])
        warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, step / 3))
        optimizers.append((model, opt, warmup))
    g = torch.Generator().manual_seed(14)
    for _ in range(10):
        data = torch.randint(0, 24, (10,), generator=g)
        for model, opt, warmup in optimizers:
            opt.zero_grad(set_to_none=False)
            for half in (data[:5], data[5:]):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = nn.functional.cross_entropy(model(half), half) / 2
                loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
            warmup.step()
    for p, q in zip(ours.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)


def _train_sparse_embedding(net: nn.Module, scale: float) -> tuple[list[float], dict]:
    """Three tasks of 30 steps on ``scale`` x the loss of a 2,000-row embedding and a head,
    each step touching four rows. Returns each task's loss before and after (interleaved)
    and the optimizer's final state."""
    torch.manual_seed(15)
    model = nn.Sequential(nn.Embedding(2000, 16), nn.Linear(16, 3))
    opt = LearnedOptimizer(model.parameters(), lr=1e-3, net=copy.deepcopy(net))
    g = torch.Generator().manual_seed(16)
    tokens = torch.randint(0, 2000, (3, 4), generator=g)
    labels = torch.randint(0, 3, (3, 4), generator=g)

    def loss_of(task: int) -> torch.Tensor:
        return nn.functional.cross_entropy(model(tokens[task]), labels[task])

    losses = []
    for task in range(3):
        losses.append(float(loss_of(task).detach()))
        for _ in range(30):
            opt.zero_grad()
            (scale * loss_of(task)).backward()
            opt.step()
        losses.append(float(loss_of(task).detach()))
        opt.new_task()
    assert all(torch.isfinite(p).all() for p in model.parameters()), scale
    return losses, opt.state


@pytest.mark.parametrize("scale", [1e-20, 1.0, 1e10])
def test_sparse_embedding_gradients_at_extreme_scales_stay_finite(default_net, scale):
    """A 2,000-row embedding of which each step touches four rows (the sampled token
    statistics then see mostly exact zeros), across task boundaries and loss scales from
    1e-20 (gradients far below Adam's eps: hardly a step) to 1e10: parameters, moments,
    anchor and importance stay finite, and where the gradients are not lost in eps the
    loss on each task falls (by 13-16 % on the second and third task with the sixth shipped
    rule and 11-15 % with the fifth, which protect what the first task learned in the
    shared head; by over 20 % with the earlier ones; at 1e-20, where the gradients are
    lost in eps, it does not fall)."""
    losses, state = _train_sparse_embedding(default_net, scale)
    assert all(torch.isfinite(t).all() for leaf in state.values() for t in leaf.values())
    if scale >= 1.0:
        before, after = losses[0::2], losses[1::2]
        assert all(a < 0.95 * b for a, b in zip(after, before, strict=True)), losses


def test_zero_lr_after_a_boundary_only_pulls_towards_the_anchors(default_net):
    """The pull-back is a fraction per step, not a multiple of ``lr`` (docs/learned.md):
    with ``lr = 0`` in a later task the parameters move, but only towards their anchors
    and never past them, so every element's distance to its anchor shrinks or stays;
    a parameter without a gradient does not move at all."""
    model = _mlp()
    opt = LearnedOptimizer(model.parameters(), lr=1e-2, net=copy.deepcopy(default_net))
    x, y = _batch()
    for _ in range(2):  # two tasks: the second has importance and moves off its anchor
        for _ in range(10):
            _closure_step(opt, model, x, y)
        opt.new_task()
    for _ in range(10):
        _closure_step(opt, model, x, y)
    opt.param_groups[0]["lr"] = 0.0
    anchors = [opt.state[p][".anchor"].float() for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    frozen_before = model[2].bias.detach().clone()
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    model[2].bias.grad = None
    opt.step()
    moved = 0.0
    for p, old, anchor in zip(model.parameters(), before, anchors, strict=True):
        drift_before, drift_after = old - anchor, p.detach() - anchor
        assert (drift_after.abs() <= drift_before.abs()).all()
        assert (drift_after * drift_before >= 0).all()  # not past the anchor
        moved = max(moved, float((p.detach() - old).abs().max()))
    assert moved > 0  # the shipped rule does pull back after a boundary
    assert torch.equal(model[2].bias, frozen_before)


class _BodyWithNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.norm(self.fc(x)))


@pytest.mark.parametrize("mode", ["reset", "update"])
def test_avalanche_style_param_list_replacement_keeps_names_depths_and_frees_old_heads(
    default_net, mode
):
    """Avalanche replaces ``param_groups[0]["params"]`` between experiences (its
    ``param_names`` then no longer fit) and, in reset mode, empties the state. The
    parameters given with names keep them (a LayerNorm stays a norm token), depths follow
    the new list as in an optimizer built on it, and the replaced head is freed as
    torch.optim frees it."""
    import gc
    import weakref

    from metaopt.learned.features import KINDS, STATIC_FEATURES

    torch.manual_seed(0)
    body = _BodyWithNorm()
    old_head = nn.Linear(16, 2)
    named = [*body.named_parameters(), *(("head." + n, p) for n, p in old_head.named_parameters())]
    opt = LearnedOptimizer(named, lr=1e-3, net=copy.deepcopy(default_net))
    x, y = torch.randn(16, 8), torch.randint(0, 2, (16,))

    def train(head: nn.Module) -> None:
        for _ in range(2):
            opt.zero_grad()
            nn.functional.cross_entropy(head(body(x)), y).backward()
            opt.step()

    train(old_head)
    opt.new_task()
    new_head = nn.Linear(16, 2)
    if mode == "reset":
        opt.state.clear()
    else:
        for p in old_head.parameters():
            opt.state.pop(p)
    new_list = [*body.parameters(), *new_head.parameters()]
    opt.param_groups[0]["params"] = new_list
    gone = weakref.ref(old_head.weight)
    del old_head, named
    train(new_head)
    gc.collect()
    assert gone() is None, gc.get_referrers(gone())

    def descriptor(p: torch.Tensor) -> dict[str, float]:
        d = opt.state[p][".descriptor"]
        return {
            "depth": float(d[STATIC_FEATURES.index("depth_fraction")]),
            "kind": KINDS[int(d[-len(KINDS) :].argmax())],
        }

    n = len(new_list)
    if mode == "reset":  # every state started in the new list
        for i, p in enumerate(new_list):
            assert descriptor(p)["depth"] == pytest.approx(i / (n - 1))
    assert descriptor(body.norm.weight)["kind"] == "norm"
    assert descriptor(body.norm.bias)["kind"] == "norm"
    assert descriptor(new_head.weight)["depth"] == pytest.approx((n - 2) / (n - 1))
    assert opt.task_index == 1
