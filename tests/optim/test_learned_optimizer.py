"""LearnedOptimizer as a torch.optim drop-in: Adam at init, task boundaries, state_dict,
param groups, frozen and tied parameters, dtypes, schedulers, GradScaler, DDP."""

from __future__ import annotations

import copy
import os
import socket
from collections import defaultdict

import pytest
import torch
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import metaopt
from metaopt import LearnedOptimizer
from metaopt.learned import LearnedRuleNet
from tests.learned.helpers import perturbed_net
from tests.models import KINDS, build


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: thread hand-off would dominate
    yield
    torch.set_num_threads(before)


def _loss(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


def _train(model, opt, x, y, steps, scheduler=None):
    for _ in range(steps):
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def _assert_params_close(a: nn.Module, b: nn.Module, atol: float) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=atol, msg=f"parameter {name}")


@pytest.mark.parametrize("kind", KINDS)
def test_fresh_net_equals_torch_adam_over_50_steps_float64(kind):
    model, x, y = build(kind, 4, seed=1, dtype=torch.float64)
    twin = copy.deepcopy(model)
    ours = LearnedOptimizer(model.parameters(), lr=1e-2, net=LearnedRuleNet())
    ref = torch.optim.Adam(twin.parameters(), lr=1e-2)
    _train(model, ours, x, y, 50)
    _train(twin, ref, x, y, 50)
    _assert_params_close(model, twin, atol=1e-6)
    p = next(model.parameters())
    torch.testing.assert_close(
        ours.state[p][".exp_avg"], ref.state[next(twin.parameters())]["exp_avg"]
    )


def test_param_groups_and_scheduler_match_adam_at_init():
    model, x, y = build("mlp", 4, seed=2, dtype=torch.float64)
    twin = copy.deepcopy(model)

    def groups(m):
        params = list(m.parameters())
        return [{"params": params[:2], "lr": 1e-2}, {"params": params[2:], "lr": 3e-3}]

    ours = LearnedOptimizer(groups(model), net=LearnedRuleNet())
    ref = torch.optim.Adam(groups(twin))
    sched = [torch.optim.lr_scheduler.StepLR(o, step_size=5, gamma=0.5) for o in (ours, ref)]
    _train(model, ours, x, y, 20, sched[0])
    _train(twin, ref, x, y, 20, sched[1])
    _assert_params_close(model, twin, atol=1e-10)
    assert ours.param_groups[1]["lr"] == pytest.approx(3e-3 * 0.5**4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dtypes_preserved_and_finite_with_active_net(dtype):
    model, x, y = build("cnn", 3, seed=3, dtype=dtype)
    before = copy.deepcopy(model)
    opt = LearnedOptimizer(model.parameters(), lr=1e-2, net=perturbed_net())
    for _ in range(2):
        _train(model, opt, x, y, 4)
        opt.new_task()
    assert opt.task_index == 2
    for (name, p), q in zip(model.named_parameters(), before.parameters(), strict=True):
        assert p.dtype == dtype and torch.isfinite(p).all(), name
        state = opt.state[p]
        assert state[".exp_avg"].dtype == dtype and state[".anchor"].dtype == torch.bfloat16
        assert float(state[".task_index"]) == 2.0
        assert not torch.equal(p, q), name


def test_new_task_snapshots_anchor_and_folds_importance():
    model, x, y = build("mlp", 4, seed=4, dtype=torch.float32)
    opt = LearnedOptimizer(model.parameters(), lr=1e-2, net=perturbed_net())
    _train(model, opt, x, y, 5)
    opt.new_task()
    for p in model.parameters():
        state = opt.state[p]
        assert torch.equal(state[".anchor"], p.detach().to(torch.bfloat16))
        assert float(state[".importance"].float().abs().sum()) > 0
        assert float(state[".task_step"]) == 0.0 and float(state[".step"]) == 5.0


def test_state_dict_round_trip_including_task_boundary(tmp_path):
    model, x, y = build("transformer", 4, seed=5, dtype=torch.float32)
    net = perturbed_net()
    opt = LearnedOptimizer(model.parameters(), lr=1e-2, net=net)
    _train(model, opt, x, y, 4)
    opt.new_task()
    _train(model, opt, x, y, 2)
    opt.new_task()
    path = tmp_path / "opt.pt"
    torch.save(opt.state_dict(), path)
    twin = copy.deepcopy(model)
    restored = LearnedOptimizer(twin.parameters(), lr=1e-2, net=net)
    restored.load_state_dict(torch.load(path, weights_only=True))
    assert restored.task_index == 2
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        for key, value in opt.state[p].items():
            assert restored.state[q][key].dtype == value.dtype, key
            assert torch.equal(restored.state[q][key], value), key
    _train(model, opt, x, y, 3)
    _train(twin, restored, x, y, 3)
    _assert_params_close(model, twin, atol=0)


def test_load_state_dict_rejects_a_mismatch_and_changes_nothing():
    model, x, y = build("mlp", 4, seed=6)
    opt = LearnedOptimizer(model.parameters(), lr=1e-2, net=LearnedRuleNet())
    _train(model, opt, x, y, 1)
    other, _, _ = build("mlp", 5, seed=6)
    other_opt = LearnedOptimizer(other.parameters(), lr=1e-2, net=LearnedRuleNet())
    _train(other, other_opt, *build("mlp", 5, seed=6)[1:], 1)
    before = {k: v.clone() for k, v in opt.state[next(model.parameters())].items()}
    with pytest.raises(ValueError, match="does not fit parameter"):
        opt.load_state_dict(other_opt.state_dict())
    after = opt.state[next(model.parameters())]
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_emptied_state_and_edited_param_groups_between_tasks():
    model, x, y = build("mlp", 4, seed=7, dtype=torch.float32)
    head = nn.Linear(3, 3)
    opt = LearnedOptimizer(model.parameters(), lr=1e-2, net=perturbed_net())
    _train(model, opt, x, y, 3)
    opt.new_task()
    opt.state = defaultdict(dict)  # what Avalanche's reset_optimizer does
    opt.add_param_group({"params": list(head.parameters()), "lr": 1e-3})
    for _ in range(3):
        opt.zero_grad()
        (_loss(model, x, y) + head(model(x)).pow(2).mean()).backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in [*model.parameters(), *head.parameters()])
    assert float(opt.state[head.weight][".step"]) == 3.0
    assert float(opt.state[head.weight][".task_index"]) == 1.0  # the optimizer's task index
    depths = [float(opt.state[p][".descriptor"][6]) for p in [*model.parameters(), head.bias]]
    assert depths == sorted(depths) and depths[-1] == 1.0


def test_frozen_and_tied_parameters():
    torch.manual_seed(8)
    emb = nn.Embedding(10, 6)
    out = nn.Linear(6, 10, bias=False)
    out.weight = emb.weight  # tied
    frozen = nn.Linear(6, 6)
    frozen.requires_grad_(False)
    modules = nn.ModuleList([emb, frozen, out])
    before = copy.deepcopy(modules)
    opt = LearnedOptimizer(modules.parameters(), lr=1e-2, net=perturbed_net())
    tokens = torch.randint(0, 10, (16,))
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(out(frozen(emb(tokens))), tokens).backward()
        opt.step()
    assert len(opt.param_groups[0]["params"]) == 3  # the tied weight appears once
    assert torch.equal(frozen.weight, before[1].weight) and not opt.state.get(frozen.weight)
    assert not torch.equal(emb.weight, before[0].weight) and out.weight is emb.weight
    assert float(opt.state[emb.weight][".step"]) == 3.0


def test_grad_scaler_matches_adam_at_init_and_skips_inf_steps():
    model, x, y = build("mlp", 4, seed=9, dtype=torch.float32)
    twin = copy.deepcopy(model)
    results = []
    for m, opt in (
        (model, LearnedOptimizer(model.parameters(), lr=1e-2, net=LearnedRuleNet())),
        (twin, torch.optim.Adam(twin.parameters(), lr=1e-2)),
    ):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        for step in range(6):
            opt.zero_grad()
            loss = _loss(m, x, y) * (float("inf") if step == 2 else 1.0)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        results.append(scaler.get_scale())
    assert results[0] == results[1] < 2.0**10  # the inf step was skipped by both
    _assert_params_close(model, twin, atol=1e-6)


def test_closure_loss_feeds_the_task_token():
    model, x, y = build("mlp", 4, seed=10, dtype=torch.float32)
    opt = LearnedOptimizer(model.parameters(), lr=1e-2, net=perturbed_net())
    losses = []
    for _ in range(3):

        def closure():
            opt.zero_grad()
            loss = _loss(model, x, y)
            loss.backward()
            return loss

        losses.append(float(opt.step(closure).detach()))
    stats = opt.state[next(model.parameters())][".loss_stats"]
    assert float(stats[2]) == pytest.approx(losses[0]) and float(stats[3]) == 3.0


def test_from_pretrained_default_and_bad_options():
    model, x, y = build("mlp", 4, seed=11, dtype=torch.float32)
    opt = LearnedOptimizer.from_pretrained("default", model.parameters(), lr=1e-3)
    assert "description" in opt.net.metadata
    _train(model, opt, x, y, 2)
    assert isinstance(LearnedOptimizer(model.parameters()).net, LearnedRuleNet)
    with pytest.raises(ValueError, match="learning rate"):
        LearnedOptimizer(model.parameters(), lr=-1.0, net=LearnedRuleNet())
    with pytest.raises(ValueError, match="importance"):
        LearnedOptimizer(model.parameters(), net=LearnedRuleNet(), importance="bogus")
    with pytest.raises(TypeError, match="LearnedRuleNet"):
        LearnedOptimizer(model.parameters(), net=nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"torch\.dtype"):  # was an AttributeError of str
        LearnedOptimizer(model.parameters(), net=LearnedRuleNet(), aux_dtype="bfloat16")
    assert isinstance(opt, metaopt.FunctionalOptimizer)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str, closure: bool) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, x, y = build("mlp", 4, seed=12, dtype=torch.float32)
        ddp = DistributedDataParallel(model)
        group = dist.group.WORLD if closure else None
        opt = LearnedOptimizer(ddp.parameters(), lr=1e-2, net=perturbed_net(),
                               process_group=group)
        shard = slice(rank * 6, (rank + 1) * 6)

        def step_closure():
            opt.zero_grad()
            loss = _loss(ddp, x[shard], y[shard])
            loss.backward()
            return loss

        for step in range(4):
            if step == 2:
                opt.new_task()
            if closure:  # each rank's own loss; the rule must see their mean
                opt.step(step_closure)
            else:
                step_closure()
                opt.step()
        torch.save([p.detach() for p in model.parameters()], f"{out}.{rank}")
        dist.barrier()  # no rank tears gloo down while its peer still talks to it
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("closure", [False, True], ids=["step", "closure"])
def test_inside_distributed_data_parallel(tmp_path, closure):
    """Replicas stay identical and equal one process on the full batch; with a closure,
    the rule sees the ranks' mean loss through ``process_group`` (each rank's own loss
    made the replicas drift apart)."""
    out = str(tmp_path / "params")
    mp.spawn(_ddp_worker, args=(2, _free_port(), out, closure), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    model, x, y = build("mlp", 4, seed=12, dtype=torch.float32)
    opt = LearnedOptimizer(model.parameters(), lr=1e-2, net=perturbed_net())

    def full_batch():  # single process: the same averaged gradients and mean loss
        opt.zero_grad()
        loss = 0.5 * (_loss(model, x[:6], y[:6]) + _loss(model, x[6:], y[6:]))
        loss.backward()
        return loss

    for step in range(4):
        if step == 2:
            opt.new_task()
        if closure:
            opt.step(full_batch)
        else:
            full_batch()
            opt.step()
    for a, b, p in zip(ranks[0], ranks[1], model.parameters(), strict=True):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, p.detach(), rtol=1e-5, atol=1e-6)


SCHEDULERS = {
    "cosine": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10),
    "onecycle": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=20),
    "cyclic": lambda o: torch.optim.lr_scheduler.CyclicLR(
        o, base_lr=1e-3, max_lr=1e-2, step_size_up=4, cycle_momentum=True
    ),
    "lambda": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1.0 / (1 + t)),
    "plateau": lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=0, factor=0.5),
}


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_lr_schedulers_drive_the_rule_like_adam(name):
    model, x, y = build("mlp", 3, seed=13, dtype=torch.float64)
    twin = copy.deepcopy(model)
    runs = []
    for m, opt in (
        (model, LearnedOptimizer(model.parameters(), lr=1e-2, net=LearnedRuleNet())),
        (twin, torch.optim.Adam(twin.parameters(), lr=1e-2)),
    ):
        sched = SCHEDULERS[name](opt)
        for _ in range(20):
            opt.zero_grad()
            loss = _loss(m, x, y)
            loss.backward()
            opt.step()
            if name == "plateau":
                sched.step(float(loss.detach()))
            else:
                sched.step()
        runs.append([dict(g) for g in opt.param_groups])
    _assert_params_close(model, twin, atol=1e-10)
    assert runs[0][0]["lr"] == pytest.approx(runs[1][0]["lr"])
    assert tuple(runs[0][0]["betas"]) == pytest.approx(tuple(runs[1][0]["betas"]))


class PatchViT(nn.Module):
    """ViT-style: 2x2 patches of a 4x4 image, a learned position parameter, one encoder
    layer, mean pooling."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.patch = nn.Linear(4, d)
        self.pos = nn.Parameter(torch.zeros(4, d))
        layer = nn.TransformerEncoderLayer(d, 2, 2 * d, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = x.unfold(1, 2, 2).unfold(2, 2, 2).reshape(x.shape[0], 4, 4)
        return self.head(self.encoder(self.patch(patches) + self.pos).mean(1))


def test_vit_style_model_trains_like_adam_at_init():
    torch.manual_seed(14)
    model = PatchViT().double()
    twin = copy.deepcopy(model)
    x, y = torch.randn(16, 4, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    ours = LearnedOptimizer(model.named_parameters(), lr=1e-2, net=LearnedRuleNet())
    ref = torch.optim.Adam(twin.parameters(), lr=1e-2)
    first = float(_loss(model, x, y).detach())
    _train(model, ours, x, y, 30)
    _train(twin, ref, x, y, 30)
    _assert_params_close(model, twin, atol=1e-6)
    assert float(_loss(model, x, y).detach()) < 0.5 * first


def _compile_as_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """``torch.compile`` returns the function itself: ``compile=True`` takes its fused
    in-place path (and its bookkeeping: view and field caches, counters updated in
    place) eagerly, without minutes of compilation."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
@pytest.mark.parametrize("case", ["mlp", "shorter last tokens", "every tensor factored"])
def test_optimizer_fast_paths_follow_the_pure_rule_across_a_task_boundary(
    case, fused, monkeypatch
):
    """In-place moments, scratch workspace, skipped importance terms in the first task and
    the direct optimizer.state round trip give the pure functional rule's trajectory,
    also for tensors cut into equal tokens and a shorter last one, and with factored
    second moments for every tensor (a bias-free model: no dense moment at all); so does
    the fused in-place step of ``compile=True`` (run eagerly here)."""
    from metaopt.learned import learned_rule, new_task
    from metaopt.learned.features import layout_of
    from metaopt.rules import apply_updates

    # (an MLP: a conv bias before batchnorm has rounding-noise gradients, whose
    # scale-free token features make trajectories differ at the level of rounding)
    model, x, y = build("mlp", 3, seed=15, dtype=torch.float64)
    options = {"max_block": 16}
    torch.manual_seed(15)
    if case == "shorter last tokens":  # at max_block 5: a bias of 23 is 4 x 5 + 3
        model = nn.Sequential(
            nn.Flatten(), nn.Linear(x[0].numel(), 23), nn.Tanh(), nn.Linear(23, 3)
        ).double()
        options = {"max_block": 5}
        assert layout_of(23, 5, 23).tail == 3
    elif case == "every tensor factored":
        model = nn.Sequential(
            nn.Flatten(), nn.Linear(x[0].numel(), 6, bias=False), nn.Tanh(),
            nn.Linear(6, 3, bias=False),
        ).double()
        options = {"max_block": 16, "factored": True}
    twin = copy.deepcopy(model)  # evaluates the gradients of the functional trajectory
    net = perturbed_net(dtype=torch.float64)
    if fused:
        _compile_as_identity(monkeypatch)
    opt = LearnedOptimizer(model.named_parameters(), lr=1e-2, net=net, compile=fused, **options)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    rule = learned_rule(net, lr=1e-2, **options)
    state = rule.init(params)
    for step in range(6):
        if step == 3:
            opt.new_task()
            state = new_task(state, params)
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step()
        twin.zero_grad()
        _loss(twin, x, y).backward()
        grads = {k: p.grad for k, p in twin.named_parameters()}
        updates, state = rule.update(grads, state, params)  # autograd on: the pure path
        params = apply_updates(params, updates)
        with torch.no_grad():
            for k, p in twin.named_parameters():
                p.copy_(params[k])
    assert bool(opt._fused_steps) == fused  # the path under test was taken
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), params[name], rtol=0, atol=1e-12)
        assert float(opt.state[p][".importance"].float().abs().sum()) > 0


def test_fused_step_increments_the_state_counters_in_place_like_torch_adam(monkeypatch):
    """``compile=True``'s fused step (run eagerly here) moves ``optimizer.state[p]``'s
    moments and step counters in place, as ``torch.optim.Adam`` does its ``step``: a
    reference held by the caller follows, the state keeps its tensors. A counter the
    caller replaces is used, then moved in place in turn."""
    _compile_as_identity(monkeypatch)
    model, x, y = build("mlp", 3, seed=3)
    adam_model = copy.deepcopy(model)
    opt = LearnedOptimizer(model.parameters(), lr=1e-2, net=perturbed_net(), compile=True)
    adam = torch.optim.Adam(adam_model.parameters(), lr=1e-2)
    _train(model, opt, x, y, 2)
    _train(adam_model, adam, x, y, 2)
    p, adam_p = next(model.parameters()), next(adam_model.parameters())
    held = dict(opt.state[p])
    adam_step = adam.state[adam_p]["step"]
    _train(model, opt, x, y, 3)
    _train(adam_model, adam, x, y, 3)
    assert adam.state[adam_p]["step"] is adam_step and float(adam_step) == 5.0
    for name in (".step", ".task_step", ".exp_avg", ".exp_avg_sq"):
        assert opt.state[p][name] is held[name], name
    assert float(held[".step"]) == float(held[".task_step"]) == 5.0
    opt.state[p][".step"] = torch.tensor(100.0)  # replaced by the caller: read, then moved
    replaced = opt.state[p][".step"]
    _train(model, opt, x, y, 2)
    assert float(opt.state[p][".step"]) == 102.0
    assert float(replaced) == 100.0  # its value was copied into a new stack
    assert float(held[".task_step"]) == 7.0


def test_factored_second_moment_equals_adam_for_rank_one_squared_gradients():
    torch.manual_seed(16)
    shapes = {"w": (5, 3, 2), "m": (4, 6), "b": (4,)}
    ours = {k: nn.Parameter(torch.randn(s, dtype=torch.float64)) for k, s in shapes.items()}
    ref = {k: nn.Parameter(p.detach().clone()) for k, p in ours.items()}
    u = {k: torch.randn(s[0], dtype=torch.float64) for k, s in shapes.items()}
    v = {
        k: torch.randn(s[1:], dtype=torch.float64) if len(s) > 1 else None
        for k, s in shapes.items()
    }
    opt = LearnedOptimizer(ours.items(), lr=1e-2, net=LearnedRuleNet(), factored=True)
    adam = torch.optim.Adam(ref.values(), lr=1e-2)
    for step in range(20):
        sign = (-1.0) ** step * (1 + 0.1 * step)  # g = s_t u v^T: g^2 is rank one
        for params in (ours, ref):
            for k, p in params.items():
                p.grad = sign * (
                    torch.einsum("i,...->i...", u[k], v[k]) if v[k] is not None else u[k]
                )
        opt.step()
        adam.step()
    for k in shapes:
        torch.testing.assert_close(ours[k].detach(), ref[k].detach(), rtol=0, atol=1e-10)
    assert opt.state[ours["w"]][".exp_avg_sq"].shape == (5 + 6,)
    assert opt.state[ours["b"]][".exp_avg_sq"].shape == (4,)


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values())


def test_factored_state_is_about_adams_size_and_survives_tasks_and_reload(tmp_path):
    model, x, y = build("mlp", 64, seed=17, dtype=torch.float32)
    twin = copy.deepcopy(model)
    opt = LearnedOptimizer(model.parameters(), lr=1e-2, net=perturbed_net(), factored=True)
    adam = torch.optim.Adam(twin.parameters(), lr=1e-2)
    _train(model, opt, x, y, 3)
    _train(twin, adam, x, y, 3)
    per_tensor = 3 * 4 + 4 * 4 + 11 * 4  # counters, loss statistics, static descriptor
    counted = _state_bytes(opt) - per_tensor * len(opt.state)
    n = sum(p.numel() for p in model.parameters())
    assert counted < 1.1 * 8 * n  # matrices: 4 (m) + 2 + 2 bytes; small vectors dense
    opt.new_task()
    _train(model, opt, x, y, 3)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    twin_opt = LearnedOptimizer(twin.parameters(), lr=1e-2, net=opt.net, factored=True)
    twin.load_state_dict(model.state_dict())
    twin_opt.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    _train(model, opt, x, y, 2)
    _train(twin, twin_opt, x, y, 2)
    _assert_params_close(model, twin, atol=0)
    assert all(torch.isfinite(p).all() for p in model.parameters())


_EVENTS = ("step", "closure step", "new task", "empty state", "reload", "no grad", "lr")


def _reloaded(opt: LearnedOptimizer, fresh: LearnedOptimizer) -> LearnedOptimizer:
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
    return fresh


def _step(opt, model, x, y, *, closure: bool, drop_grad: int | None) -> None:
    """One step, by closure or not; ``drop_grad``: a parameter left without gradient."""

    def loss_and_grads():
        opt.zero_grad()
        loss = _loss(model, x, y)
        loss.backward()
        if drop_grad is not None:
            list(model.parameters())[drop_grad].grad = None
        return loss

    if closure:
        opt.step(loss_and_grads)
    else:
        loss_and_grads()
        opt.step()


@settings(max_examples=8, deadline=None)
@given(
    kind=st.sampled_from(["mlp", "transformer"]),
    events=st.lists(st.sampled_from(_EVENTS), min_size=4, max_size=12),
    seed=st.integers(0, 50),
)
def test_fused_path_follows_the_eager_optimizer_through_training_loop_events(kind, events, seed):
    """``compile=True``'s fused in-place step (run eagerly) and the eager optimizer take
    the same steps through what training loops and frameworks do between them: closures
    (the loss feeds the task token), task boundaries, a parameter's state emptied
    (Avalanche), a state_dict round trip into a new optimizer, a parameter without a
    gradient, a changed learning rate (float64; parameters and state within 1e-9)."""
    with pytest.MonkeyPatch.context() as patch:
        _compile_as_identity(patch)
        model, x, y = build(kind, 4, seed=seed)
        models = [model, copy.deepcopy(model)]
        net = perturbed_net(dtype=torch.float64)
        chosen = seed % len(list(model.parameters()))

        def make(m, fused):
            return LearnedOptimizer(m.parameters(), lr=1e-2, net=net, compile=fused, max_block=8)

        opts = [make(models[0], False), make(models[1], True)]
        for event in [*events, "step"]:
            for i, (opt, m) in enumerate(zip(opts, models, strict=True)):
                if event == "new task":
                    opt.new_task()
                elif event == "empty state":
                    opt.state[list(m.parameters())[chosen]] = {}
                elif event == "reload":
                    opts[i] = _reloaded(opt, make(m, fused=i == 1))
                elif event == "lr":
                    opt.param_groups[0]["lr"] *= 0.5
                else:
                    drop = chosen if event == "no grad" else None
                    _step(opt, m, x, y, closure=event == "closure step", drop_grad=drop)
        assert opts[1]._fused_steps  # the fused path was taken
        for a, b in zip(*(m.parameters() for m in models), strict=True):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-9)
            sa, sb = opts[0].state[a], opts[1].state[b]
            assert sa.keys() == sb.keys()
            for k in sa:
                torch.testing.assert_close(sb[k], sa[k], rtol=0, atol=1e-9, msg=k)


def test_fused_step_inputs_are_made_once_per_value():
    """The compiled step's lr, betas and eps tensors are kept while their values stay
    (no new tensors, no host-to-device copy per step) and remade when a scheduler
    changes one; lr in the parameters' dtype, betas and eps in float64."""
    p = nn.Parameter(torch.randn(4, 3))
    opt = LearnedOptimizer([p], lr=1e-3)
    group = opt.param_groups[0]
    first = opt._step_inputs(group, torch.float32, p.device)
    assert [t.dtype for t in first] == [torch.float32] + [torch.float64] * 3
    assert [t.item() for t in first[1:]] == [0.9, 0.999, 1e-8]
    again = opt._step_inputs(group, torch.float32, p.device)
    assert all(a is b for a, b in zip(again, first, strict=True))
    group["lr"] = 5e-4
    lr, *adam = opt._step_inputs(group, torch.float32, p.device)
    assert lr is not first[0] and lr.item() == pytest.approx(5e-4)
    assert torch.equal(torch.stack(adam), torch.stack(first[1:]))
    group["lr"] = torch.tensor(2e-4)  # a tensor lr is passed on, never cached
    assert opt._step_inputs(group, torch.float32, p.device)[0] is group["lr"]


class _HostTensorOps(TorchDispatchMode):
    """Counts the operators that get a CPU tensor among their inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: defaultdict[str, int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = pytree.tree_leaves((args, kwargs))
        if any(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in leaves):
            self.seen[str(func)] += 1
        return func(*args, **kwargs)


@pytest.mark.parametrize("kind", KINDS)
def test_a_step_on_another_device_uses_no_host_tensor(kind):
    """Parameters and net off the CPU (here on the ``meta`` device): after the first
    steps, an unchecked step touches no CPU tensor, i.e. copies nothing from host memory
    (on a GPU such a copy waits for the device, and a CUDA graph cannot capture it; the
    token and sample indices were copied at every step before they were cached per
    device: 7 copies per MLP step, 17 per transformer step)."""
    model = build(kind, 8, 0, torch.float32)[0].to("meta")
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.ones_like(p)
    net = perturbed_net().to("meta")
    opt = LearnedOptimizer(params, lr=1e-3, net=net, check_finite=False)
    opt.step()
    opt.new_task()
    opt.step()
    with _HostTensorOps() as host:
        opt.step()
    assert dict(host.seen) == {}


def test_a_closure_loss_under_distributed_without_a_group_warns_once(monkeypatch, caplog):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    model, x, y = build("mlp", 3, seed=14, dtype=torch.float32)
    opt = LearnedOptimizer(model.parameters(), lr=1e-2, net=LearnedRuleNet())

    def closure():
        opt.zero_grad()
        loss = _loss(model, x, y)
        loss.backward()
        return loss

    with caplog.at_level("WARNING", logger="metaopt.optim.learned"):
        opt.step(closure)
        opt.step(closure)
    assert sum("process_group=" in r.getMessage() for r in caplog.records) == 1
    grouped = LearnedOptimizer(model.parameters(), net=LearnedRuleNet(), process_group=object())
    assert copy.deepcopy(grouped)._process_group is None  # process groups are not copied
