"""Each compiled step has its own Dynamo cache: a process can build many of them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import metaopt
from metaopt._inductor import inductor
from metaopt._own_cache import compile_own, with_own_cache
from metaopt.compile import make_step

LIMIT = torch._dynamo.config.recompile_limit


def _double(x: torch.Tensor) -> torch.Tensor:
    return x * 2


def test_shared_code_hits_the_recompile_limit_own_copies_do_not():
    torch._dynamo.reset()
    shapes = [(n,) for n in range(1, LIMIT + 3)]
    with pytest.raises(torch._dynamo.exc.FailOnRecompileLimitHit):
        for shape in shapes:  # one code object: one cache, LIMIT entries at most
            torch.compile(_double, backend="eager", fullgraph=True, dynamic=False)(
                torch.ones(shape)
            )
    torch._dynamo.reset()
    for shape in shapes:
        out = torch.compile(
            with_own_cache(_double), backend="eager", fullgraph=True, dynamic=False
        )(torch.ones(shape))
        assert torch.equal(out, torch.full(shape, 2.0))


def test_own_cache_copies_keep_behaviour_and_bound_methods():
    class Scale:
        def __init__(self, k: float) -> None:
            self.k = k

        def apply(self, x: torch.Tensor, *, shift: float = 0.0) -> torch.Tensor:
            """Doc."""
            return x * self.k + shift

    method = with_own_cache(Scale(3.0).apply)
    assert method(torch.ones(2), shift=1.0).tolist() == [4.0, 4.0]
    assert method.__doc__ == "Doc." and method.__func__.__code__ is not Scale.apply.__code__
    with pytest.raises(TypeError, match="Python function"):
        with_own_cache(len)


def test_more_compiled_steps_than_the_recompile_limit_in_one_process():
    torch._dynamo.reset()
    for width in range(1, LIMIT + 3):  # each model its own graph
        model = torch.nn.Linear(3, width)
        step = make_step(model, F.mse_loss, metaopt.rules.sgd(lr=0.1), backend="eager")
        params, buffers, state = step.init(model)
        batch = (torch.randn(4, 3), torch.randn(4, width))
        new, _, _, metrics = step(params, buffers, state, batch)
        assert not torch.equal(new["weight"], params["weight"])
        assert metrics["loss"] > 0


@pytest.mark.parametrize(
    ("given", "expected_options"),
    [
        ({}, {"size_asserts": False}),
        ({"fullgraph": True}, {"size_asserts": False}),
        ({"options": {"max_autotune": True}}, {"max_autotune": True}),
        ({"mode": "max-autotune-no-cudagraphs"}, None),
        ({"backend": "aot_eager"}, None),
    ],
)
def test_compile_own_adds_inductor_options_only_where_allowed(monkeypatch, given, expected_options):
    seen = {}

    def fake_compile(fn, **kwargs):
        seen.update(kwargs, fn=fn)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    compiled = compile_own(_double, **given)
    assert seen.get("options") == expected_options
    assert compiled is seen["fn"] and compiled is not _double  # its own copy
    # Inductor (the default backend) is metaopt's: Inductor minus a wrong decomposition
    assert seen["backend"] is (given["backend"] if "backend" in given else inductor)
    assert {k: v for k, v in seen.items() if k not in ("fn", "options", "backend")} == {
        k: v for k, v in given.items() if k not in ("options", "backend")
    }


def test_compile_own_compiles_and_runs():
    out = compile_own(_double, backend="eager", fullgraph=True)(torch.arange(3.0))
    assert torch.equal(out, torch.tensor([0.0, 2.0, 4.0]))
