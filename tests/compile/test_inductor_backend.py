"""metaopt's Inductor backend: torch.compile's Inductor without torch 2.13's scatter-add
decomposition of max-pool backward, which gave wrong gradients in training graphs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

import metaopt
from metaopt._inductor import inductor, uses_max_pool
from metaopt.compile import make_meta_step, module_state

MAX_POOL_BACKWARD = torch.ops.aten.max_pool2d_with_indices_backward.default


def _bn_relu_pool_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10),
    )


def _captured_graph(fn, *args) -> torch.fx.GraphModule:
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=capture, fullgraph=True)(*args)
    return graphs[0]


@pytest.mark.parametrize("pool", [nn.MaxPool2d(2), nn.MaxPool1d(2), nn.AdaptiveMaxPool2d(1)])
def test_max_pools_are_found_also_inside_a_func_transform(pool):
    x = torch.randn(2, 3, 4, 4) if not isinstance(pool, nn.MaxPool1d) else torch.randn(2, 3, 4)
    assert uses_max_pool(_captured_graph(pool, x))

    def grad_of_pool(x):
        return grad(lambda t: pool(t).square().sum())(x)

    assert uses_max_pool(_captured_graph(grad_of_pool, x))
    assert not uses_max_pool(_captured_graph(nn.AvgPool2d(2), torch.randn(2, 3, 4, 4)))


@pytest.mark.parametrize("with_pool", [True, False])
def test_the_decomposition_is_dropped_only_for_max_pool_graphs(monkeypatch, with_pool):
    """Graphs without a max-pool reach Inductor as torch.compile would send them
    (default decompositions, caches as configured; only the C++ kernels are built a few
    at a time); mode and options become Inductor config patches as in torch.compile."""
    from torch._inductor.compile_fx import compile_fx_inner

    seen = {}

    def fake_compile_fx(
        gm, example_inputs, inner_compile=None, config_patches=None, decompositions=None
    ):
        seen.update(config=config_patches, decompositions=decompositions, inner=inner_compile)
        return gm.forward

    monkeypatch.setattr("torch._inductor.compile_fx.compile_fx", fake_compile_fx)
    module = nn.MaxPool2d(2) if with_pool else nn.AvgPool2d(2)
    gm = _captured_graph(module, torch.randn(1, 1, 4, 4))
    inductor(gm, [], mode="max-autotune-no-cudagraphs", options={"size_asserts": False})
    assert seen["config"]["max_autotune"] is True and seen["config"]["size_asserts"] is False
    if with_pool:
        assert MAX_POOL_BACKWARD not in seen["decompositions"]
        assert torch.ops.aten.max_pool2d_with_indices.default in seen["decompositions"]
        assert seen["config"]["fx_graph_cache"] is False  # the caches ignore the table
        assert seen["config"]["layout_optimization"] is False  # CPU (no tensor elsewhere)
        # batches the C++ kernels, lowers max-pool backward with ATen's kernel
        assert seen["inner"].__wrapped__.__wrapped__ is compile_fx_inner
    else:
        assert seen["decompositions"] is None
        assert seen["inner"].__wrapped__ is compile_fx_inner  # batches the C++ kernels
        assert "fx_graph_cache" not in seen["config"]
        assert "layout_optimization" not in seen["config"]
    from torch._inductor.decomposition import select_decomp_table

    assert MAX_POOL_BACKWARD in select_decomp_table()  # torch's own table is untouched


def test_max_pool_graphs_lower_the_backward_with_atens_kernel_only_while_compiling():
    """The inner compile of a max-pool graph sees ATen's max-pool backward as the
    lowering (Inductor's own kernel recomputed every window's maximum: half of a CNN
    step); before and after it, also when it raises, the table is Inductor's own."""
    from torch._inductor import lowering

    from metaopt._inductor import _with_aten_max_pool_backward

    own = lowering.lowerings[MAX_POOL_BACKWARD]
    seen = []

    def inner(*args, fail=False):
        seen.append(lowering.lowerings[MAX_POOL_BACKWARD])
        if fail:
            raise RuntimeError("compile failed")
        return "compiled"

    wrapped = _with_aten_max_pool_backward(inner)
    assert wrapped() == "compiled"
    with pytest.raises(RuntimeError, match="compile failed"):
        wrapped(fail=True)
    assert seen == [lowering.fallback_max_pool2d_with_indices_backward] * 2
    assert lowering.lowerings[MAX_POOL_BACKWARD] is own


def test_options_can_keep_the_layout_optimisation(monkeypatch):
    """``layout_optimization`` is only a default: options that set it win."""
    seen = {}

    def fake_compile_fx(gm, example_inputs, inner_compile=None, config_patches=None,
                        decompositions=None):
        seen.update(config=config_patches)
        return gm.forward

    monkeypatch.setattr("torch._inductor.compile_fx.compile_fx", fake_compile_fx)
    gm = _captured_graph(nn.MaxPool2d(2), torch.randn(1, 1, 4, 4))
    inductor(gm, [torch.randn(1, 1, 4, 4)], options={"layout_optimization": True})
    assert seen["config"]["layout_optimization"] is True


@pytest.mark.slow
def test_training_graph_gradients_through_batchnorm_relu_maxpool_match_eager():
    """The case torch 2.13's decomposition got wrong: torch.func.grad of a BN -> ReLU ->
    max-pool CNN compiled while the parameters require grad. Also its second-order use
    (a Hessian-vector product through the compiled gradient) matches eager."""
    model = _bn_relu_pool_cnn()
    params = {k: v.detach().requires_grad_() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))

    def gradient(params):
        def loss(p):
            fresh = {k: b.clone() for k, b in buffers.items()}
            return F.cross_entropy(functional_call(model, {**p, **fresh}, (x,)), y)

        return grad(loss)(params)

    def with_hvp(fn):
        g = fn(params)
        dot = sum((v * (i + 1)).sum() for i, v in enumerate(g.values()))
        return g, torch.autograd.grad(dot, list(params.values()))

    torch._dynamo.reset()
    eager_g, eager_h = with_hvp(gradient)
    compiled_g, compiled_h = with_hvp(torch.compile(gradient, backend=inductor, fullgraph=True))
    for k, g in eager_g.items():
        torch.testing.assert_close(compiled_g[k], g, rtol=1e-4, atol=1e-5)
    for a, b in zip(compiled_h, eager_h, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_meta_step_without_remat_on_a_pooling_cnn_matches_eager():
    """make_meta_step(remat=False) runs compiled steps under autograd: with torch's
    decomposition its meta-gradient on this CNN was 0.146 instead of 0.088."""
    model = _bn_relu_pool_cnn()
    factory = lambda m: metaopt.rules.sgd(lr=m["lr"])  # noqa: E731
    data = [(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))) for _ in range(3)]
    params, buffers = module_state(model)
    meta = {"lr": torch.tensor(0.1)}
    state = factory(meta).init(params)
    eager = make_meta_step(model, F.cross_entropy, factory, compile=False, remat=False)
    compiled = make_meta_step(model, F.cross_entropy, factory, remat=False)
    want = eager(meta, params, buffers, state, data[:2], data[2])
    got = compiled(meta, params, buffers, state, data[:2], data[2])
    torch.testing.assert_close(got.meta_grads["lr"], want.meta_grads["lr"], rtol=1e-4, atol=1e-6)
    for k, g in want.init_grads.items():
        torch.testing.assert_close(got.init_grads[k], g, rtol=1e-4, atol=1e-6)


_SIMD_SCRIPT = """
import sys
import torch
from torch._inductor import cpu_vec_isa
from metaopt._inductor import inductor

def double_sin(x):
    return x.sin() * 2

x = torch.randn(1000)
if sys.argv[1] == "no-simd-first":
    no_simd = {"cpp.vec_isa_ok": False}
    without = torch.compile(lambda x: x.cos() + 1, backend=inductor, options=no_simd)
    torch.testing.assert_close(without(x), x.cos() + 1)
    assert cpu_vec_isa.pick_vec_isa() != cpu_vec_isa.invalid_vec_isa, "SIMD lost for the process"
torch.testing.assert_close(torch.compile(double_sin, backend=inductor)(x), double_sin(x))
"""


def _run_simd_script(mode: str, cache_dir) -> None:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir)}
    result = subprocess.run(
        [sys.executable, "-c", _SIMD_SCRIPT, mode], env=env, capture_output=True, text=True,
        cwd=Path(__file__).parents[2],
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_a_compile_without_simd_leaves_simd_on_for_the_next_ones_and_the_cache(tmp_path):
    """torch 2.13 caches the CPU's SIMD sets under the first compilation's options: a first
    ``cpp.vec_isa_ok=False`` compile left the process without SIMD, and SIMD code the FX
    graph cache held from another process then failed to build (a CI failure). The
    second process here gets ``double_sin`` from the cache the first one filled."""
    if subprocess.run(
        [sys.executable, "-c", "from torch._inductor import cpu_vec_isa as c;"
         "assert c.pick_vec_isa() != c.invalid_vec_isa"],
        env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)},
    ).returncode:
        pytest.skip("Inductor finds no SIMD instruction set on this machine")
    _run_simd_script("simd", tmp_path)
    _run_simd_script("no-simd-first", tmp_path)
