"""Contract tests of ``metaopt.meta``'s public API, written the way a researcher uses it in
place of ``higher`` / TorchOpt: estimators on models with dropout or frozen parameters,
edge arguments, implicit differentiation on singular Hessians, trainer checkpoints that
are corrupt or mismatched, bad command-line arguments. Every number is compared with a
closed form, finite differences or a plain PyTorch loop."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

import metaopt
from metaopt.continual.streams import stream_from_tensors
from metaopt.meta import (
    ES,
    PES,
    ContinualProblem,
    FamilyConfig,
    Implicit,
    SupervisedProblem,
    Unrolled,
    conjugate_gradient,
    implicit_root,
)
from metaopt.meta.trainer import MetaTrainer, TrainConfig, plot_history
from tests.meta.meta_helpers import classification_problem
from tests.meta.test_trainer import tiny_config

F64 = torch.float64


def lr_rule(mp):
    """Plain SGD whose learning rate is the meta-parameter ``lr``."""
    return metaopt.rules.sgd(lr=mp["lr"])


def dropout_problem(steps: int = 3) -> SupervisedProblem:
    """A float64 MLP with dropout in train mode: every inner loss is random."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 2)).double()
    batches = [
        (torch.randn(8, 3, generator=gen, dtype=F64), torch.randint(0, 2, (8,), generator=gen))
        for _ in range(steps)
    ]
    meta = (torch.randn(16, 3, generator=gen, dtype=F64), torch.randint(0, 2, (16,), generator=gen))
    return SupervisedProblem(model, batches, meta)


# ---------------------------------------------------------------- ES / PES


def _es(cls: type, sigma: float, seed: int = 1, **kw) -> ES | PES:
    """An ES or PES estimator of ``lr_rule`` (4 pairs, PES windows of 1 step by default)
    with a generator seeded by ``seed``."""
    if cls is PES:
        kw.setdefault("truncation", 1)
    return cls(lr_rule, sigma=sigma, num_pairs=4, generator=torch.Generator().manual_seed(seed),
               **kw)


@pytest.mark.parametrize("cls", [ES, PES])
def test_es_with_dropout_is_reproducible_and_antithetic_pairs_share_the_masks(cls):
    """A seeded generator must make the estimate reproducible even when the inner model
    draws dropout masks, and the two runs of an antithetic pair must see the same masks
    (common random numbers): otherwise ``(L+ - L-) / 2 sigma`` is dominated by the mask
    difference and grows like ``1 / sigma``."""
    problem = dropout_problem()
    mp = {"lr": torch.tensor(0.3, dtype=F64)}
    a = _es(cls, 1e-4)(mp, problem).grads["lr"]
    b = _es(cls, 1e-4)(mp, problem).grads["lr"]
    assert torch.equal(a, b)
    # same noise, ten times smaller sigma: a smooth estimate barely moves
    c = _es(cls, 1e-5)(mp, problem).grads["lr"]
    assert float(c) == pytest.approx(float(a), rel=1e-2)


@pytest.mark.parametrize("cls", [ES, PES])
def test_es_refuses_empty_meta_params_before_running(cls):
    """No meta-parameters used to run every trajectory, then fail with StopIteration."""
    calls = []

    def rule_fn(mp):
        calls.append(1)
        return metaopt.rules.sgd(lr=0.1)

    kw = {"truncation": 1} if cls is PES else {}
    with pytest.raises(ValueError, match="empty"):
        cls(rule_fn, num_pairs=1, **kw)({}, classification_problem())
    assert not calls


@pytest.mark.parametrize(
    "make",
    [
        lambda: Unrolled(lr_rule, truncation=2.5),
        lambda: PES(lr_rule, truncation=2.5),
        lambda: ES(lr_rule, num_pairs=2.5),
        lambda: PES(lr_rule, num_pairs=1.5),
    ],
)
def test_fractional_window_or_pair_counts_are_refused(make):
    """``truncation=2.5`` used to cut windows at steps 0, 4, 5...; ``num_pairs=2.5`` failed
    only when called."""
    with pytest.raises(TypeError, match="integer"):
        make()


# ---------------------------------------------------------------- implicit differentiation


class Underdetermined:
    """Least squares with more weights than examples: ``H = X^T X`` is singular.

    Inner loss ``0.5 ||X w - (y + phi u)||^2``; meta-loss ``0.5 ||w - c||^2``; the solver
    returns the minimum-norm solution. With damping ``lambda`` the implicit gradient is
    ``u^T X (H + lambda I)^{-1} (w - c)`` in closed form.
    """

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(3)
        self.X = torch.randn(3, 5, generator=gen, dtype=F64)
        self.y = torch.randn(3, generator=gen, dtype=F64)
        self.u = torch.randn(3, generator=gen, dtype=F64)
        self.c = torch.randn(5, generator=gen, dtype=F64)

    def solve(self, mp):
        return {"w": torch.linalg.pinv(self.X) @ (self.y + mp["phi"] * self.u)}

    def inner_loss(self, params, mp):
        r = self.X @ params["w"] - (self.y + mp["phi"] * self.u)
        return 0.5 * (r @ r)

    def meta_loss(self, params, mp):
        d = params["w"] - self.c
        return 0.5 * (d @ d)

    def damped_gradient(self, phi: torch.Tensor, damping: float) -> torch.Tensor:
        w = self.solve({"phi": phi})["w"]
        H = self.X.T @ self.X + damping * torch.eye(5, dtype=F64)
        return self.u @ self.X @ torch.linalg.solve(H, w - self.c)


def test_implicit_on_a_singular_hessian_fails_clearly_and_damping_matches_closed_form():
    """An overparameterised inner problem has a singular Hessian: conjugate gradient
    breaks down (``p^T H p = 0``). That must be a clear error pointing at ``damping``,
    not a NaN meta-gradient; with damping the result is the closed form above."""
    problem = Underdetermined()
    mp = {"phi": torch.tensor(0.4, dtype=F64)}
    with pytest.raises(torch.linalg.LinAlgError, match="damping"):
        Implicit()(mp, problem)
    for damping in (1e-3, 0.5):
        got = Implicit(damping=damping, cg_iters=200)(mp, problem).grads["phi"]
        torch.testing.assert_close(got, problem.damped_gradient(mp["phi"], damping),
                                   rtol=1e-8, atol=1e-12)


def test_conjugate_gradient_refuses_an_indefinite_operator():
    """``diag(1, 0)``: the second direction has ``p^T A p = 0``; CG returned NaN."""
    A = torch.diag(torch.tensor([1.0, 0.0], dtype=F64))
    with pytest.raises(torch.linalg.LinAlgError, match="positive definite"):
        conjugate_gradient(lambda v: {"x": A @ v["x"]}, {"x": torch.ones(2, dtype=F64)})


def test_implicit_root_refuses_second_derivatives_instead_of_dropping_them():
    """The implicit backward is first-order only. Differentiating it again used to
    return the direct second-order term alone (2.0 instead of 2.0166 below): silently
    wrong. It must raise."""
    gen = torch.Generator().manual_seed(0)
    X, y = torch.randn(20, 3, generator=gen, dtype=F64), torch.randn(20, generator=gen, dtype=F64)

    def inner(p, mp):
        return 0.5 * ((X @ p["w"] - y) ** 2).sum() + 0.5 * mp["l2"] * (p["w"] @ p["w"])

    @implicit_root(inner)
    def solve(mp):
        return {"w": torch.linalg.solve(X.T @ X + mp["l2"] * torch.eye(3, dtype=F64), X.T @ y)}

    l2 = torch.tensor(0.5, dtype=F64, requires_grad=True)
    w = solve({"l2": l2})["w"]
    (g,) = torch.autograd.grad((w**2).sum() + l2**2, l2, create_graph=True)
    exact = torch.linalg.solve(X.T @ X + l2 * torch.eye(3, dtype=F64), X.T @ y)
    (g_exact,) = torch.autograd.grad((exact**2).sum() + l2**2, l2)
    torch.testing.assert_close(g.detach(), g_exact, rtol=1e-8, atol=0)  # first order is right
    with pytest.raises(RuntimeError, match="first-order only"):
        torch.autograd.grad(g, l2)


# ---------------------------------------------------------------- models: frozen, MAML init


def _frozen_body_model() -> nn.Module:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    model[0].requires_grad_(False)  # a frozen body, a trained head (ANIL-style)
    return model


def _plain_loop_loss(model: nn.Module, problem: SupervisedProblem, lr: float) -> float:
    """The meta-loss of ``problem`` trained by ``torch.optim.SGD`` on a copy of ``model``."""
    copy = _frozen_body_model()
    copy.load_state_dict(model.state_dict())
    opt = torch.optim.SGD([p for p in copy.parameters() if p.requires_grad], lr=lr)
    for step in range(problem.num_steps):
        x, y = problem.batches[step % len(problem.batches)]
        opt.zero_grad()
        nn.functional.cross_entropy(copy(x.double()), y).backward()
        opt.step()
    x, y = problem.meta_batch
    with torch.no_grad():
        return float(nn.functional.cross_entropy(copy(x.double()), y))


def test_frozen_parameters_stay_frozen_in_the_inner_loop():
    """Parameters with ``requires_grad=False`` are not trained by ``torch.optim``; the
    unrolled inner loop used to train them anyway (its meta-loss and meta-gradient then
    belong to another model). Compared with a plain SGD loop and its finite differences."""
    model = _frozen_body_model()
    base = classification_problem(steps=3)
    problem = SupervisedProblem(model, base.batches, base.meta_batch, num_steps=3, dtype=F64)
    before = model[0].weight.detach().clone()
    lr = 0.4
    result = Unrolled(lr_rule)({"lr": torch.tensor(lr, dtype=F64)}, problem)
    assert float(result.loss) == pytest.approx(_plain_loop_loss(model, problem, lr), rel=1e-12)
    h = 1e-6
    fd = (_plain_loop_loss(model, problem, lr + h) - _plain_loop_loss(model, problem, lr - h)) / (
        2 * h
    )
    assert float(result.grads["lr"]) == pytest.approx(fd, rel=1e-6)
    es = ES(lr_rule, sigma=1e-4, num_pairs=1, generator=torch.Generator().manual_seed(0))
    es_loss = es({"lr": torch.tensor(lr, dtype=F64)}, problem).loss
    assert float(es_loss) == pytest.approx(_plain_loop_loss(model, problem, lr), rel=1e-6)
    assert torch.equal(model[0].weight, before)
    params, buffers = problem.init({})
    assert "0.weight" not in params and torch.equal(buffers["0.weight"], before)


def test_maml_init_with_an_unknown_parameter_name_is_refused():
    """A typo in a learned-initialisation key used to be ignored silently: its
    meta-gradient was exactly zero and the inner loop started from the module's weights."""
    problem = classification_problem(init_prefix="init.")
    weight = dict(problem.model.module.named_parameters())["0.weight"].detach().double()
    mp = {"init.0.weigth": weight.clone(), "lr": torch.tensor(0.1, dtype=F64)}
    with pytest.raises(ValueError, match=r"init\.0\.weigth"):
        Unrolled(lr_rule)(mp, problem)
    mp = {"init.0.weight": weight.clone(), "lr": torch.tensor(0.1, dtype=F64)}
    grads = Unrolled(lr_rule)(mp, problem).grads
    assert float(grads["init.0.weight"].abs().sum()) > 0


# ---------------------------------------------------------------- trainer checkpoints


@pytest.fixture(scope="module")
def trainer_with_checkpoint(tmp_path_factory):
    """A fresh tiny meta-trainer and a valid checkpoint of it (step 0)."""
    trainer = MetaTrainer(tiny_config(), tmp_path_factory.mktemp("ckpt"), progress=False)
    trainer.save()
    return trainer


def _snapshot(trainer) -> dict:
    return {
        "net": {k: v.clone() for k, v in trainer.net.state_dict().items()},
        "opt": repr(trainer.meta_optimizer.state_dict()),
        "sampler": trainer.sampler.get_state().clone(),
        "torch_rng": torch.get_rng_state().clone(),
        "step": trainer.step,
        "history": list(trainer.history),
    }


def _same(a: dict, b: dict) -> bool:
    return (
        a["net"].keys() == b["net"].keys()
        and all(torch.equal(a["net"][k], b["net"][k]) for k in a["net"])
        and a["opt"] == b["opt"]
        and torch.equal(a["sampler"], b["sampler"])
        and torch.equal(a["torch_rng"], b["torch_rng"])
        and a["step"] == b["step"]
        and a["history"] == b["history"]
    )


def _truncated(path, payload):
    data = path.read_bytes()
    return data[: len(data) // 2]


def _tampered(edit):
    """A checkpoint whose net differs from the trainer's (so a partial load shows) and
    that ``edit`` then breaks."""

    def make(path, payload):
        payload = {**payload, "net": {k: v + 1 for k, v in payload["net"].items()}, "step": 3}
        payload["meta_optimizer"] = dict(payload["meta_optimizer"])
        edit(payload)
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        return buffer.getvalue()

    return make


def _drop(key):
    return lambda payload: payload.pop(key)


def _bad_groups(payload):
    groups = [dict(g) for g in payload["meta_optimizer"]["param_groups"]]
    groups[0]["params"] = groups[0]["params"][:1]
    payload["meta_optimizer"]["param_groups"] = groups


def _bad_net(payload):
    payload["net"].pop(next(iter(payload["net"])))


def _bad_rng(payload):
    payload["rng"] = {**payload["rng"], "sampler": torch.zeros(3, dtype=torch.uint8)}


@pytest.mark.slow  # the trainer fixture builds task families (~4 s on a loaded machine)
@pytest.mark.parametrize(
    "make",
    [
        _truncated,
        lambda path, payload: b"",
        lambda path, payload: b"not a checkpoint at all",
        _tampered(_drop("meta_optimizer")),
        _tampered(_drop("rng")),
        _tampered(_bad_groups),
        _tampered(_bad_net),
        _tampered(_bad_rng),
    ],
    ids=["truncated", "empty", "garbage", "no-optimizer", "no-rng", "optimizer-groups",
         "net-keys", "rng-state"],
)
def test_resume_from_a_corrupt_checkpoint_fails_clearly_and_changes_nothing(
    trainer_with_checkpoint, tmp_path, make
):
    """A checkpoint cut short by a full disk, or written by another version, must give a
    ValueError naming the file (what ``metaopt meta-train`` reports as a clean error), and
    the trainer must be exactly as before: the net used to be loaded before the optimiser
    state failed, and torch's own errors (RuntimeError, EOFError, KeyError) escaped."""
    trainer = trainer_with_checkpoint
    payload = torch.load(trainer.checkpoint_path, weights_only=True)
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(make(trainer.checkpoint_path, payload))
    before = _snapshot(trainer)
    with pytest.raises(ValueError, match="checkpoint"):
        trainer.resume(bad)
    assert _same(before, _snapshot(trainer))
    assert trainer.resume()  # the trainer's own checkpoint still loads


# ---------------------------------------------------------------- configuration and CLI


@pytest.mark.parametrize(
    "bad",
    [
        {"estimator": "pes", "truncation": 0},  # PES silently used a window of 10
        {"estimator": "unrolled", "truncation": 0},
        {"truncation": 2.5},
        {"estimator": "es", "sigma": 0.0},
        {"estimator": "es", "sigma": float("nan")},
        {"estimator": "es", "es_pairs": 0},
        {"meta_lr": float("inf")},
        {"inner_lr": float("inf")},
    ],
)
def test_train_config_refuses_estimator_settings_up_front(bad):
    """Settings the estimator would refuse (or, for PES, silently replace) are refused when
    the configuration is built, before any data is loaded."""
    with pytest.raises((ValueError, TypeError)):
        tiny_config(**bad)


@pytest.mark.parametrize(
    "bad",
    [
        {"mnist_size": 0},
        {"mnist_size": 29, "datasets": ("mnist",)},  # pooling to 29 upsampled MNIST
        {"n_tasks": (3, 6)},  # 6 split tasks of 2 classes need 12 classes
        {"meta_batch_size": 0},
        {"batch_size": ()},
        {"batch_size": (0,)},
        {"speed_weight": -1.0},
        {"earlier_weight": -1.0},
        {"earlier_weight": float("inf")},  # every meta-loss NaN
        {"speed_weight": float("nan")},
        {"model_sizes": {"mlp": {"hidden": (0,)}}},
    ],
)
def test_family_config_refuses_bad_ranges_before_loading_data(bad):
    """Each of these passed the configuration and failed (or gave NaN losses) only when a
    sequence was drawn or a model built, after the images had been loaded."""
    with pytest.raises(ValueError):
        FamilyConfig(**bad)


def test_pes_without_truncation_is_one_window_as_documented():
    """``TrainConfig.truncation=None`` means the whole sequence; the trainer used to give
    PES a window of 10 steps instead. ``PES(truncation=None)`` (and any window at least
    as long as the horizon) is one window: exactly ES with the same noise."""
    problem = classification_problem(steps=4)
    mp = {"lr": torch.tensor(0.2, dtype=F64)}
    es = _es(ES, 1e-3)(mp, problem)
    for window in (None, 4, 7):
        pes = _es(PES, 1e-3, truncation=window)(mp, problem)
        assert torch.equal(pes.grads["lr"], es.grads["lr"])
        assert torch.equal(pes.loss, es.loss)
    trainer = MetaTrainer.__new__(MetaTrainer)  # only what _make_estimator reads
    trainer.config, trainer.compile = tiny_config(estimator="pes", truncation=None), False
    trainer.noise = torch.Generator()
    assert trainer._make_estimator().truncation is None


def _cli_args(tmp_path) -> list[str]:
    return ["meta-train", "--out", str(tmp_path / "run"), "--steps", "1", "--no-progress"]


@pytest.mark.parametrize(
    "extra",
    [
        ["--threads", "0"],
        ["--device", "gpu"],
        ["--compare", "-1"],
        ["--mlp-hidden", "0"],
        ["--cnn-channels", "8", "0"],
        ["--transformer-size", "10", "1", "3"],
        ["--mnist-size", "0"],
        ["--datasets", "mnist", "--mnist-size", "29"],
        ["--n-tasks", "2", "6"],
        ["--estimator", "pes", "--truncation", "0"],
        ["--truncation", "0"],
        ["--estimator", "es", "--sigma", "0"],
        ["--estimator", "es", "--es-pairs", "0"],
        ["--speed-weight", "-1"],
        ["--earlier-weight", "-1"],
        ["--meta-lr", "inf"],
        ["--out", "FILE"],
        ["--out", "FILE/run"],
        ["--export", "DIR"],
        ["--export", "FILE/rule.pt"],  # refused after the training, with a traceback
        ["--export", "/proc/rule.pt"],  # root may write anywhere os.access is asked about
        ["--out", "/proc/run"],
    ],
)
def test_cli_refuses_bad_arguments_before_any_work(tmp_path, monkeypatch, capsys, extra):
    """Each of these used to start work (load data, train, even for hours) and then end
    in a traceback or at the very end (``--compare -1``: IndexError after training;
    ``--out`` an existing file: FileExistsError at the first checkpoint; ``--threads 0``:
    RuntimeError) or to run with another setting (PES with ``--truncation 0``)."""
    import metaopt.cli
    import metaopt.meta.cli as meta_cli

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(meta_cli, "MetaTrainer", no_work)
    monkeypatch.setattr(meta_cli, "init_distributed", no_work)
    monkeypatch.setattr(torch, "set_num_threads", no_work)
    (tmp_path / "FILE").write_text("")
    (tmp_path / "DIR").mkdir()
    extra = [str(tmp_path / a) if a.startswith(("FILE", "DIR")) else a for a in extra]
    with pytest.raises(SystemExit) as exit_info:
        metaopt.cli.main([*_cli_args(tmp_path), *extra])
    assert exit_info.value.code == 1
    assert "metaopt meta-train: error:" in capsys.readouterr().err


@pytest.mark.parametrize("cls", [ES, PES])
def test_es_sigma_below_the_meta_parameters_resolution_is_refused(cls):
    """``0.3 + 1e-9 * eps`` is ``0.3`` in float32: both runs of every pair were the same
    and the estimate was exactly zero, silently. An infinite sigma gave NaN."""
    problem = classification_problem(dtype=torch.float32)
    mp = {"lr": torch.tensor(0.3)}
    with pytest.raises(ValueError, match="resolution"):
        _es(cls, 1e-9)(mp, problem)
    assert float(_es(cls, 1e-3)(mp, problem).grads["lr"]) != 0.0
    with pytest.raises(ValueError, match="sigma"):
        _es(cls, float("inf"))


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"cg_iters": 0}, ValueError),
        ({"cg_iters": 2.5}, TypeError),
        ({"damping": float("nan")}, ValueError),
        ({"damping": float("inf")}, ValueError),
    ],
)
@pytest.mark.parametrize("api", ["Implicit", "implicit_root"])
def test_implicit_refuses_bad_solver_settings(api, kwargs, error):
    """``implicit_root(cg_iters=0)`` returned an implicit gradient of exactly zero
    (conjugate gradient never ran); ``cg_iters=2.5`` failed only in the backward pass;
    a NaN damping gave NaN gradients and an infinite one dropped the implicit term."""
    with pytest.raises(error, match=r"cg_iters|damping"):
        if api == "Implicit":
            Implicit(**kwargs)
        else:
            implicit_root(lambda p, mp: (p["w"] ** 2).sum(), **kwargs)


def _two_tasks():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(80, 1, 4, 4, generator=gen), torch.arange(80) % 4
    return stream_from_tensors(x, y, kind="split", n_tasks=2, scenario="domain", seed=0)


@pytest.mark.parametrize(
    "bad",
    [{"batch_size": 0}, {"meta_batch_size": 0}, {"speed_every": 0}, {"speed_every": -2},
     {"steps_per_task": [2.5, 3]}, {"earlier_weight": float("inf")},
     {"speed_weight": float("nan")}],
)
def test_continual_problem_refuses_sizes_that_give_nan_or_drop_the_speed_term(bad):
    """An empty batch made every loss NaN; ``speed_every <= 0`` silently used the default
    spacing (0) or removed the learning-speed term (negative); a fractional step count
    was truncated; an infinite weight made every meta-loss NaN."""
    with pytest.raises((ValueError, TypeError)):
        ContinualProblem(nn.Sequential(nn.Flatten(), nn.Linear(16, 2)), _two_tasks(), **{
            "steps_per_task": 3, **bad})


def test_supervised_problem_refuses_a_fractional_step_count():
    """``num_steps=2.5`` used to run 2 steps."""
    base = classification_problem()
    with pytest.raises(TypeError, match="integer"):
        SupervisedProblem(base.model, base.batches, base.meta_batch, num_steps=2.5)


@pytest.mark.parametrize("init", ["no-such-rule", "MISSING"])
def test_trainer_checks_its_init_checkpoint_before_loading_data(tmp_path, monkeypatch, init):
    """A mistyped ``--init`` failed only after the task families had loaded their images
    (seconds for MNIST); it must fail first."""
    import metaopt.meta.trainer as trainer_module

    def no_work(*args, **kwargs):
        raise AssertionError("data loaded before the init checkpoint was checked")

    monkeypatch.setattr(trainer_module, "TaskFamily", no_work)
    init = str(tmp_path / "missing.pt") if init == "MISSING" else init
    with pytest.raises(ValueError):
        MetaTrainer(tiny_config(init=init), tmp_path / "run", progress=False)


class _Ridge:
    """Ridge regression with a bias: ``0.5 ||X w + b - y||^2 + 0.5 l2 ||w||^2``, its
    closed-form solution and a validation loss; ``pack`` lays ``(w, b)`` out as the
    parameter structure under test (tuple, nested dict, one tensor)."""

    def __init__(self, pack, unpack) -> None:
        gen = torch.Generator().manual_seed(7)

        def randn(*shape):
            return torch.randn(*shape, generator=gen, dtype=F64)

        self.X, self.y, self.Xv, self.yv = randn(20, 3), randn(20), randn(9, 3), randn(9)
        self.pack, self.unpack = pack, unpack

    def closed_form(self, l2):
        A = torch.cat([self.X, torch.ones(20, 1, dtype=F64)], 1)
        reg = torch.diag(torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=F64)) * l2
        s = torch.linalg.solve(A.T @ A + reg, A.T @ self.y)
        return s[:3], s[3]

    def solve(self, mp):
        return self.pack(*self.closed_form(mp["l2"]))

    def inner_loss(self, params, mp):
        w, b = self.unpack(params)
        return 0.5 * ((self.X @ w + b - self.y) ** 2).sum() + 0.5 * mp["l2"] * (w @ w)

    def meta_loss(self, params, mp):
        w, b = self.unpack(params)
        return 0.5 * ((self.Xv @ w + b - self.yv) ** 2).sum()


STRUCTURES = {
    "tuple": (lambda w, b: (w, b), lambda p: p),
    "nested-dict": (lambda w, b: {"lin": {"w": w}, "b": b}, lambda p: (p["lin"]["w"], p["b"])),
    "tensor": (lambda w, b: torch.cat([w, b.reshape(1)]), lambda p: (p[:3], p[3])),
}


@pytest.mark.parametrize("structure", list(STRUCTURES))
def test_implicit_accepts_any_parameter_pytree(structure):
    """Inner parameters as a tuple, a nested dict or one tensor (what a user's solver
    returns) used to fail with ``AttributeError: ... has no attribute 'items'``; the
    implicit gradient must equal autograd through the closed-form solution."""
    problem = _Ridge(*STRUCTURES[structure])
    l2 = torch.tensor(0.3, dtype=F64, requires_grad=True)
    (exact,) = torch.autograd.grad(problem.meta_loss(problem.solve({"l2": l2}), {}), l2)
    got = Implicit()({"l2": l2}, problem)
    torch.testing.assert_close(got.grads["l2"], exact, rtol=1e-8, atol=1e-12)
    solve = implicit_root(problem.inner_loss)(problem.solve)
    params = solve({"l2": l2})
    assert type(params) is type(problem.solve({"l2": l2}))
    (decorated,) = torch.autograd.grad(problem.meta_loss(params, {}), l2)
    torch.testing.assert_close(decorated, exact, rtol=1e-8, atol=1e-12)


@pytest.mark.slow  # three tiny meta-trainers (~10 s on a loaded machine)
@pytest.mark.parametrize("estimator", ["es", "pes"])
def test_interrupted_es_training_resumes_identically(tmp_path, estimator):
    """Interrupted between checkpoints (every 2 steps, validation every 3), a run restarted
    from its checkpoint ends exactly where an uninterrupted run ends: parameters,
    meta-optimiser state, history and best state, with the ES/PES noise drawn per sample."""
    config = tiny_config(estimator=estimator, steps=5, ckpt_every=2, val_every=3)
    full = MetaTrainer(config, tmp_path / "full", progress=False)
    full.train()

    interrupted = MetaTrainer(config, tmp_path / "run", progress=False)
    step = interrupted.train_step

    def crash_at_step_4():
        if interrupted.step == 3:
            raise KeyboardInterrupt
        return step()

    interrupted.train_step = crash_at_step_4
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    resumed = MetaTrainer(config, tmp_path / "run", progress=False)
    assert resumed.resume() and resumed.step == 2
    resumed.train()
    for a, b in ((full.net.state_dict(), resumed.net.state_dict()),
                 (full.best["state"], resumed.best["state"])):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert full.history == resumed.history
    assert repr(full.meta_optimizer.state_dict()) == repr(resumed.meta_optimizer.state_dict())


def test_maml_init_of_another_shape_is_refused_and_another_dtype_is_cast():
    """A learned initialisation of the wrong shape failed deep in the forward pass
    ("mat1 and mat2 shapes cannot be multiplied"); a float32 one in a float64 problem
    failed with a dtype mismatch. The shape is checked up front, naming both; the dtype
    follows the problem's (the cast is differentiable): the meta-gradient equals the one
    of the float64 initialisation, in float32."""
    problem = classification_problem(init_prefix="init.")
    weight = dict(problem.model.module.named_parameters())["0.weight"].detach()
    lr = torch.tensor(0.1, dtype=F64)
    with pytest.raises(ValueError, match=r"init\.0\.weight.*\(3, 4\).*\(4, 3\)"):
        Unrolled(lr_rule)({"init.0.weight": weight.T.double().contiguous(), "lr": lr}, problem)
    as_f32 = Unrolled(lr_rule)({"init.0.weight": weight.float(), "lr": lr}, problem)
    as_f64 = Unrolled(lr_rule)({"init.0.weight": weight.double(), "lr": lr}, problem)
    assert as_f32.grads["init.0.weight"].dtype == torch.float32
    torch.testing.assert_close(as_f32.grads["init.0.weight"],
                               as_f64.grads["init.0.weight"].float())


@pytest.mark.parametrize("cls", [Unrolled, ES])
def test_per_example_losses_are_refused_clearly_and_one_element_losses_accepted(cls):
    """``reduction="none"`` (a loss per example) failed with "grad can be implicitly
    created only for scalar outputs"; a meta-loss of shape ``[1]`` failed with "output
    with shape [] doesn't match the broadcast shape [1]". The first is refused naming
    the problem's method, the second counts as the number it holds."""

    def est(mp, problem):
        if cls is Unrolled:
            return cls(lr_rule)(mp, problem)
        return cls(lr_rule, sigma=1e-3, num_pairs=1, generator=torch.Generator().manual_seed(0))(
            mp, problem)

    mp = {"lr": torch.tensor(0.1, dtype=F64)}
    per_example = classification_problem(
        loss_fn=lambda out, y: nn.functional.cross_entropy(out, y, reduction="none"))
    with pytest.raises(ValueError, match=r"inner_loss.*0-d"):
        est(mp, per_example)

    class OneElement(SupervisedProblem):
        def meta_loss(self, params, buffers, step):
            loss = super().meta_loss(params, buffers, step)
            return None if loss is None else loss.reshape(1)

    base = classification_problem()
    one = OneElement(base.model, base.batches, base.meta_batch, base.num_steps, dtype=F64)
    got, want = est(mp, one), est(mp, base)
    assert torch.equal(got.loss, want.loss)
    torch.testing.assert_close(got.grads["lr"], want.grads["lr"], rtol=1e-12, atol=0)


@pytest.mark.slow  # the trainer fixture builds task families (~4 s on a loaded machine)
def test_resume_accepts_a_checkpoint_written_before_a_config_field_existed(
    trainer_with_checkpoint, tmp_path
):
    """A checkpoint written by a version without a newer ``TrainConfig`` field (``init``
    was added later) holds the same configuration when that field has its default; it
    used to be refused as "written with another configuration (differs in [])". A
    field this version does not know is refused by name."""
    trainer = trainer_with_checkpoint
    payload = torch.load(trainer.checkpoint_path, weights_only=True)
    older = tmp_path / "older.pt"
    torch.save({**payload, "config": {k: v for k, v in payload["config"].items()
                                      if k != "init"}}, older)
    assert trainer.resume(older)
    newer = tmp_path / "newer.pt"
    torch.save({**payload, "config": {**payload["config"], "warp_drive": 1}}, newer)
    with pytest.raises(ValueError, match="warp_drive"):
        trainer.resume(newer)


def test_plotting_an_empty_history_warns_nothing(tmp_path):
    """A checkpoint saved before the first validation (``MetaTrainer.save()`` right after
    construction) plotted empty axes and matplotlib warned "No artists with labels found
    to put in legend"."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = plot_history([], {}, tmp_path / "curves.png")
    assert path.is_file()


_BATCH = (torch.zeros(3, 2), torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize(
    "build",
    [
        lambda: Implicit(tol=float("nan")),
        lambda: Implicit(tol=-1.0),
        lambda: implicit_root(lambda p, mp: 0.0, tol=float("inf")),
        lambda: conjugate_gradient(lambda v: v, {"a": torch.ones(2)}, tol=float("nan")),
        lambda: conjugate_gradient(lambda v: v, {"a": torch.ones(2)}, max_iters=0),
        lambda: Unrolled(None),
        lambda: ES("sgd"),
        lambda: PES(None),
        lambda: TrainConfig(steps=1.5),
        lambda: TrainConfig(val_every=2.0),
        lambda: SupervisedProblem(nn.Linear(2, 2), [_BATCH], _BATCH, dtype=torch.int64),
    ],
)
def test_estimators_and_config_refuse_bad_options_when_built(build):
    """Each was accepted and failed or misbehaved later: a NaN or negative CG tolerance
    never converged (every solve ran all its iterations and warned), ``max_iters=0``
    returned zeros with a warning, a missing rule factory failed at the first estimate,
    ``steps=1.5`` ran two meta-steps, an integer ``dtype`` failed inside the inner loop."""
    with pytest.raises((ValueError, TypeError)):
        build()


# ---------------------------------------------------------------- parameters without gradient


class _TwoHeads(nn.Module):
    """A body and two heads; the forward uses head ``a`` only (``b`` gets no gradient)."""

    def __init__(self, with_b: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(4, 8).double()
        self.head_a = nn.Linear(8, 3).double()
        if with_b:
            self.head_b = nn.Linear(8, 3).double()

    def forward(self, x):
        return self.head_a(torch.tanh(self.body(x)))


def _head_problem(with_b: bool) -> SupervisedProblem:
    gen = torch.Generator().manual_seed(3)
    batches = [
        (torch.randn(8, 4, generator=gen, dtype=F64), torch.randint(0, 3, (8,), generator=gen))
        for _ in range(3)
    ]
    return SupervisedProblem(_TwoHeads(with_b), batches, batches[0])


@pytest.mark.parametrize("estimator", ["unrolled", "es", "pes"])
def test_estimators_skip_a_parameter_the_inner_loss_does_not_use(estimator):
    """An inactive head (multi-head models, a mixture's idle expert) gets no gradient: it
    is skipped as torch.optim skips a parameter without .grad (momentum and weight decay
    do not move it), and the meta-gradient is that of the model without it."""

    def rule(mp):
        return metaopt.rules.sgd(lr=mp["lr"], momentum=0.9, weight_decay=0.1)

    def make():
        if estimator == "unrolled":
            return Unrolled(rule)
        gen = torch.Generator().manual_seed(5)
        if estimator == "es":
            return ES(rule, sigma=0.01, num_pairs=2, generator=gen)
        return PES(rule, sigma=0.01, truncation=2, num_pairs=2, generator=gen)

    meta = {"lr": torch.tensor(0.1, dtype=F64)}
    with_b, without_b = make()(meta, _head_problem(True)), make()(meta, _head_problem(False))
    torch.testing.assert_close(with_b.loss, without_b.loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(with_b.grads["lr"], without_b.grads["lr"], rtol=1e-10, atol=0)


def test_estimators_refuse_a_problem_without_trainable_parameters():
    batches = [(torch.randn(4, 3), torch.randint(0, 3, (4,)))]
    problem = SupervisedProblem(nn.Flatten(), batches, batches[0])
    with pytest.raises(ValueError, match="no trainable parameters"):
        Unrolled(lr_rule)({"lr": torch.tensor(0.1)}, problem)
    from metaopt.compile import make_meta_step

    step = make_meta_step(nn.Flatten(), nn.functional.cross_entropy, lr_rule, compile=False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        step({"lr": torch.tensor(0.1)}, {}, {}, {}, batches, batches[0])
