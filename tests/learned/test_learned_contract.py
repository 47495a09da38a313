"""Adversarial contract tests of the learned rule: tensors of odd shapes (empty, 0-d,
split into row blocks), missing gradients, mixed dtypes, and checkpoint files that are
damaged or do not fit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import metaopt
from metaopt.learned import (
    CheckpointError,
    LearnedRuleNet,
    learned_rule,
    load_checkpoint,
    new_task,
    observe_loss,
    save_checkpoint,
)
from metaopt.learned.features import layout_of
from metaopt.learned.fused import fusable
from metaopt.rules import adam, apply_updates
from tests.learned.helpers import perturbed_net


def _grads(params: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in params.items()}


def _params(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype = torch.float64) -> dict:
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=gen, dtype=dtype) for k, s in shapes.items()}


_DEPTH = {"w": 0.0, "e": 0.3, "s": 0.6, "b": 1.0}
"""Fixed depths, so that leaving a tensor out of a tree changes no other descriptor."""


def _update_twice(
    rule: metaopt.rules.UpdateRule, params: dict, grads: dict, state: dict | None = None
) -> tuple[dict, dict]:
    """Two updates with the same gradients (the second after a task boundary, where the
    importance terms are live); returns the second's updates and state."""
    state = rule.init(params) if state is None else state
    _, state = rule.update(grads, state, params)
    state = new_task(observe_loss(state, 2.0), params)
    return rule.update(grads, state, params)


@pytest.mark.parametrize("grad_enabled", [True, False])
def test_an_empty_tensor_gets_an_empty_update_and_no_token(grad_enabled: bool) -> None:
    """A tensor with no elements (``nn.Linear(0, 3)``, a pruned head) must neither crash
    the step nor change the other tensors' updates: it has nothing to attend with."""
    net = perturbed_net(dtype=torch.float64)
    rule = learned_rule(net, lr=1e-2, depth=_DEPTH, aux_dtype=None)
    with_empty = _params({"w": (3, 4), "e": (0, 3), "b": (4,)})
    without = {k: v for k, v in with_empty.items() if k != "e"}
    grads = _grads(with_empty, 1)
    with torch.set_grad_enabled(grad_enabled):
        updates, state = _update_twice(rule, with_empty, grads)
        ref, ref_state = _update_twice(rule, without, {k: grads[k] for k in without})
    assert updates["e"].shape == (0, 3) and updates["e"].dtype == torch.float64
    assert float(state["e"].step) == 2.0 and float(state["e"].task_index) == 1.0
    for k in without:
        torch.testing.assert_close(updates[k], ref[k], rtol=0, atol=0)
        torch.testing.assert_close(state[k].exp_avg, ref_state[k].exp_avg, rtol=0, atol=0)
    # the fused in-place step of LearnedOptimizer(compile=True) must leave such a group
    # to the eager path (it views every tensor as [n_tokens, length])
    assert not fusable(list(with_empty.values()), list(state.values()))


def test_learned_optimizer_steps_a_model_with_an_empty_parameter() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model.register_parameter("empty", torch.nn.Parameter(torch.zeros(0, 3)))
    opt = metaopt.LearnedOptimizer(model.parameters(), lr=1e-2)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    for _ in range(2):
        opt.zero_grad()
        loss = model(torch.randn(5, 4)).pow(2).mean() + model.empty.sum()
        loss.backward()
        opt.step()
    for k, p in model.named_parameters():
        assert torch.equal(p, before[k]) == (k == "empty"), k
    assert float(opt.state[model.empty][".step"]) == 2.0


def test_a_missing_gradient_skips_its_parameter() -> None:
    """``None`` gradient (``autograd.grad(..., allow_unused=True)``): ``None`` update,
    state kept as it is (a pending task boundary included), and the other tensors are
    updated as if it were not in the tree."""
    net = perturbed_net(dtype=torch.float64)
    rule = learned_rule(net, lr=1e-2, depth=_DEPTH, aux_dtype=None)
    params = _params({"w": (3, 4), "s": (), "b": (4,)})
    state = rule.init(params)
    _, state = rule.update(_grads(params, 0), state, params)
    state = new_task(state)  # pending: folded at each parameter's next update
    grads = _grads(params, 1)
    updates, new_state = rule.update({**grads, "s": None}, state, params)
    assert updates["s"] is None
    assert new_state["s"] is state["s"] and state["s"].pending.numel() == 1
    rest = {k: params[k] for k in ("w", "b")}
    ref, _ = rule.update({k: grads[k] for k in rest}, {k: state[k] for k in rest}, rest)
    for k in rest:
        torch.testing.assert_close(updates[k], ref[k], rtol=0, atol=0)
        assert new_state[k].pending.numel() == 0
    assert torch.equal(apply_updates(params, updates)["s"], params["s"])
    nothing, same = rule.update(dict.fromkeys(params), state, params)
    assert all(u is None for u in nothing.values())
    assert all(same[k] is state[k] for k in params)


@pytest.mark.parametrize("grad_enabled", [True, False])
@pytest.mark.parametrize("max_block", [1, 4, 7, 64])
def test_fresh_net_is_adam_for_odd_shapes_and_row_blocks(max_block: int, grad_enabled: bool):
    """0-d tensors, single elements, and tensors cut into row blocks at every kind of
    boundary (rows, parts of rows, sizes with few divisors, a shorter last token): the
    fresh net is Adam."""
    shapes = {"s": (), "one": (1,), "rows": (6, 5), "odd": (13, 11), "prime": (2, 17), "c": (3,)}
    params = _params({**shapes, "tail": (2, 1009)})
    rule = learned_rule(LearnedRuleNet(), lr=1e-2, max_block=max_block)
    ours, ref = dict(params), dict(params)
    ours_state, ref_state = rule.init(ours), adam(lr=1e-2).init(ref)
    for t in range(4):
        grads = _grads(params, t)
        with torch.set_grad_enabled(grad_enabled):
            u, ours_state = rule.update(grads, ours_state, ours)
        ours = apply_updates(ours, u)
        u, ref_state = adam(lr=1e-2).update(grads, ref_state, ref)
        ref = apply_updates(ref, u)
    for k in params:
        torch.testing.assert_close(ours[k], ref[k], rtol=0, atol=1e-12)


@pytest.mark.parametrize("grad_enabled", [True, False])
@pytest.mark.parametrize(
    ("shape", "max_block"),
    [
        ((13, 11), 7),
        ((6, 5), 4),
        ((2, 17), 4),
        ((8, 3, 3), 10),
        ((1000,), 64),
        ((23,), 5),  # 4 tokens of 5 and one of 3
        ((1009, 2), 64),  # 31 tokens of 32 rows and one of 17
    ],
)
def test_row_blocks_move_as_whole_contiguous_tokens(
    shape: tuple[int, ...], max_block: int, grad_enabled: bool
) -> None:
    """With a hard top-1 selection exactly one token of a tensor cut into row blocks
    moves: one contiguous block of the flattened tensor, one of the layout's tokens
    (coefficients broadcast over the right elements, whatever the split)."""
    net = perturbed_net(dtype=torch.float64)
    params = _params({"w": shape})
    rule = learned_rule(net, lr=1e-2, max_block=max_block, topk_fraction=1e-9)
    with torch.set_grad_enabled(grad_enabled):
        updates, _ = rule.update(_grads(params, 2), rule.init(params), params)
    layout = layout_of(params["w"].numel(), max_block, shape[0])
    assert layout.total_tokens > 1
    tokens = [range(i * layout.length, (i + 1) * layout.length) for i in range(layout.n_tokens)]
    if layout.tail:
        tokens.append(range(layout.n_tokens * layout.length, params["w"].numel()))
    moved = updates["w"].reshape(-1).ne(0).nonzero().flatten().tolist()
    assert [list(t) for t in tokens].count(moved) == 1


def test_mixed_dtypes_in_one_tree_keep_their_dtypes() -> None:
    net = perturbed_net()
    params = {
        "w64": torch.randn(4, 3, dtype=torch.float64),
        "w32": torch.randn(5, dtype=torch.float32),
        "wbf": torch.randn(2, 3, dtype=torch.bfloat16),
    }
    rule = learned_rule(net, lr=1e-2, aux_dtype=None)
    updates, state = _update_twice(rule, params, _grads(params, 3))
    for k, p in params.items():
        assert updates[k].dtype == p.dtype and bool(torch.isfinite(updates[k]).all())
        for field in ("exp_avg", "exp_avg_sq", "anchor", "importance"):
            assert getattr(state[k], field).dtype == p.dtype, (k, field)
        assert state[k].step.dtype == torch.float32


# ---------------------------------------------------------------- checkpoints


def _rewritten(tmp_path: Path, change: Any) -> Path:
    """A valid checkpoint with ``change(payload)`` applied, saved to a new file."""
    path = save_checkpoint(LearnedRuleNet(), tmp_path / "ok.pt", {"description": "x"})
    payload = torch.load(path, weights_only=True)
    change(payload)
    out = tmp_path / "changed.pt"
    torch.save(payload, out)
    return out


def _set(where: str, key: str, value: Any) -> Any:
    def change(payload: dict) -> None:
        (payload if where == "top" else payload[where])[key] = value

    return change


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (_set("top", "metadata", [1, 2]), "metadata must be a dict"),
        (_set("top", "metadata", "abc"), "metadata must be a dict"),
        (_set("config", "n_heads", 0), "n_heads must be positive"),
        (_set("config", "d_model", -4), "d_model must be positive"),
        (_set("config", "d_model", 32.0), "d_model must be an int"),
        (_set("config", "rho_scale", float("nan")), "rho_scale must be finite"),
        (_set("config", "max_log_scale", "3"), "max_log_scale must be a number"),
        (_set("state_dict", "head.bias", torch.full((7,), float("nan"))), "NaN or infinite"),
        (_set("state_dict", "token_embed.weight", torch.full((32, 19), float("inf"))), "NaN"),
    ],
    ids=[
        "metadata-list",
        "metadata-str",
        "zero-heads",
        "negative-width",
        "float-width",
        "nan-rho-scale",
        "str-log-scale",
        "nan-weights",
        "inf-weights",
    ],
)
def test_checkpoints_that_do_not_fit_raise_checkpoint_error(
    tmp_path: Path, change: Any, match: str
) -> None:
    """Every damaged or ill-fitting file is a CheckpointError naming the problem (not a
    ZeroDivisionError, nor a net whose NaN weights would turn every update into NaN)."""
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(_rewritten(tmp_path, change))


def test_truncated_and_empty_checkpoint_files_raise_checkpoint_error(tmp_path: Path) -> None:
    path = save_checkpoint(LearnedRuleNet(), tmp_path / "ok.pt", {})
    data = path.read_bytes()
    for name, content in (("half.pt", data[: len(data) // 2]), ("empty.pt", b"")):
        broken = tmp_path / name
        broken.write_bytes(content)
        with pytest.raises(CheckpointError, match="cannot read"):
            load_checkpoint(broken)
    net, metadata = load_checkpoint(_rewritten(tmp_path, _set("top", "metadata", None)))
    assert metadata == {} and isinstance(net, LearnedRuleNet)


def test_learned_rule_net_rejects_invalid_options() -> None:
    with pytest.raises(ValueError, match="n_heads must be positive"):
        LearnedRuleNet(n_heads=0)
    with pytest.raises(TypeError, match="d_ff must be an int"):
        LearnedRuleNet(d_ff=True)
    with pytest.raises(ValueError, match="max_correction must be finite"):
        LearnedRuleNet(max_correction=-1.0)
    assert LearnedRuleNet(n_layers=0, rho_scale=0).config["n_layers"] == 0


def test_meta_params_must_name_parameters_of_the_net() -> None:
    """A misspelt meta-parameter name was ignored by ``functional_call``: the rule ran on
    the net's own weights and the tensor's meta-gradient stayed ``None``. An empty
    mapping raised a bare ``StopIteration``."""
    net = perturbed_net()
    params = {"w": torch.randn(3, 2), "b": torch.randn(2)}
    grads = _grads(params, 0)
    with pytest.raises(ValueError, match=r"\['head\.bais'\] are not parameters"):
        learned_rule(net, meta_params={"head.bais": net.head.bias.detach().clone()})
    rule = learned_rule(net, lr=1e-2, meta_params={})
    updates, _ = rule.update(grads, rule.init(params), params)
    ref, _ = learned_rule(net, lr=1e-2).update(grads, rule.init(params), params)
    for k in params:
        torch.testing.assert_close(updates[k], ref[k], rtol=0, atol=0)


def test_lr_tensor_must_have_one_element() -> None:
    """A tensor ``lr`` with several elements broadcast over the tokens (element ``i`` of
    ``lr`` scaled token ``i``) without an error; one of shape ``[1]`` is a number."""
    net = perturbed_net(dtype=torch.float64)
    with pytest.raises(ValueError, match="one-element tensor"):
        learned_rule(net, lr=torch.tensor([1e-2, 2e-2], dtype=torch.float64))
    params = _params({"s": (), "w": (3, 2)})
    grads = _grads(params, 0)
    rule = learned_rule(net, lr=torch.tensor([1e-2], dtype=torch.float64))
    updates, _ = rule.update(grads, rule.init(params), params)
    ref, _ = learned_rule(net, lr=1e-2).update(grads, rule.init(params), params)
    for k in params:
        assert updates[k].shape == params[k].shape
        torch.testing.assert_close(updates[k], ref[k], rtol=1e-12, atol=0)


def test_learned_state_saved_with_torch_save_loads_with_weights_only(tmp_path: Path) -> None:
    net = perturbed_net(dtype=torch.float64)
    params = _params({"w": (3, 2), "b": (2,)})
    rule = learned_rule(net, lr=1e-2)
    grads = _grads(params, 0)
    _, state = _update_twice(rule, params, grads)
    state = new_task(state)  # a pending boundary survives too
    torch.save(state, tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)
    ours, new = rule.update(grads, loaded, params)
    ref, ref_new = rule.update(grads, state, params)
    for k in params:
        assert loaded[k].anchor.dtype == torch.bfloat16 and loaded[k].pending.numel() == 1
        torch.testing.assert_close(ours[k], ref[k], rtol=0, atol=0)
        torch.testing.assert_close(new[k].importance, ref_new[k].importance, rtol=0, atol=0)


def test_a_failed_save_leaves_the_existing_checkpoint_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Overwriting a checkpoint wrote into it directly: a write that failed half-way
    (disk full, interrupted) left a truncated file in place of the good one."""
    path = save_checkpoint(perturbed_net(), tmp_path / "net.pt", {"description": "good"})
    good = path.read_bytes()

    def failing_save(obj: Any, f: Any) -> None:  # f: a path or a binary file
        if isinstance(f, (str, Path)):
            Path(f).write_bytes(b"PK\x03\x04 half a zip")
        else:
            f.write(b"PK\x03\x04 half a zip")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(LearnedRuleNet(), path, {"description": "new"})
    monkeypatch.undo()
    assert path.read_bytes() == good
    assert load_checkpoint(path)[1] == {"description": "good"}
    assert [p.name for p in tmp_path.iterdir()] == ["net.pt"]


def test_tensor_betas_and_eps_receive_meta_gradients() -> None:
    """``betas`` and ``eps`` given as tensors that require grad (meta-learned Adam
    constants): the update failed in ``torch._foreach_lerp`` (numbers only)."""
    net = perturbed_net(dtype=torch.float64)
    params = _params({"w": (3, 2), "s": ()})
    grads = _grads(params, 0)

    def updates(b1: torch.Tensor, b2: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        rule = learned_rule(net, lr=1e-2, betas=(b1, b2), eps=eps, aux_dtype=None)
        state = rule.init(params)
        _, state = rule.update(grads, state, params)
        out, _ = rule.update({k: -g for k, g in grads.items()}, state, params)
        return torch.cat([u.reshape(-1) for u in out.values()])

    hypers = tuple(
        torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (0.9, 0.99, 1e-3)
    )
    assert torch.autograd.gradcheck(updates, hypers)
    ref = learned_rule(net, lr=1e-2, betas=(0.9, 0.99), eps=1e-3, aux_dtype=None)
    _, state = ref.update(grads, ref.init(params), params)
    expected, _ = ref.update({k: -g for k, g in grads.items()}, state, params)
    got = updates(*(h.detach() for h in hypers))
    torch.testing.assert_close(
        got, torch.cat([u.reshape(-1) for u in expected.values()]), rtol=1e-12, atol=0
    )


def test_new_task_without_params_does_not_ignore_an_importance_kind() -> None:
    """``new_task(state, importance="fisher")`` marked a pending boundary that the next
    update folded with the rule's own kind ("path"): the argument was silently ignored."""
    params = _params({"w": (3, 2)})
    rule = learned_rule(LearnedRuleNet(), lr=1e-2, aux_dtype=None)
    _, state = rule.update(_grads(params, 0), rule.init(params), params)
    with pytest.raises(ValueError, match="importance is only used with params"):
        new_task(state, importance="fisher")
    with pytest.raises(ValueError, match="importance must be one of"):
        new_task(state, params, importance="nope")
    folded = new_task(state, params, importance="fisher")
    torch.testing.assert_close(folded["w"].importance, state["w"].exp_avg_sq, rtol=0, atol=0)
    deferred = new_task(state)  # folded at the next update with the rule's kind
    assert deferred["w"].pending.numel() == 1


@pytest.mark.parametrize("options", [{"max_block": 7.5}, {"max_block": True}, {"sample_size": 2.5}])
def test_token_sizes_must_be_ints(options: dict[str, Any]) -> None:
    """A float ``max_block`` silently cut tensors into tokens of fractional targets, a
    float ``sample_size`` failed deep in ``index_select``."""
    with pytest.raises(TypeError, match="must be an int"):
        learned_rule(LearnedRuleNet(), **options)


@pytest.mark.parametrize("grad_enabled", [True, False])
def test_update_new_task_and_observe_loss_mutate_nothing(grad_enabled: bool) -> None:
    """The pure API (default options) leaves its inputs as they were: gradients,
    parameters and every tensor of the state, through a pending boundary, a loss, a
    ``None`` gradient and an empty tensor."""
    net = perturbed_net(dtype=torch.float64)
    params = _params({"w": (3, 4), "e": (0, 2), "s": (), "b": (4,)})
    rule = learned_rule(net, lr=1e-2, max_block=4)
    _, state = rule.update(_grads(params, 0), rule.init(params), params)
    state = observe_loss(new_task(state), 3.0)
    grads = {**_grads(params, 1), "s": None}

    def snapshot(tree: Any) -> list[torch.Tensor]:
        leaves = torch.utils._pytree.tree_leaves(tree)
        return [x.clone() for x in leaves if isinstance(x, torch.Tensor)]

    before = [snapshot(x) for x in (grads, params, state)]
    with torch.set_grad_enabled(grad_enabled):
        updates, new_state = rule.update(grads, state, params)
        new_task(new_state, params, importance="weight_grad")
        observe_loss(new_state, float("nan"))
    for old, tree in zip(before, (grads, params, state), strict=True):
        now = snapshot(tree)
        assert len(now) == len(old)
        assert all(torch.equal(a, b) for a, b in zip(now, old, strict=True))
    assert updates["s"] is None and new_state["w"].pending.numel() == 0
