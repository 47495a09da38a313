"""metaopt's C++ kernel batching: a graph's Inductor kernels built in a few shared
libraries (one g++ call each) instead of one library per kernel."""

from __future__ import annotations

import logging

import pytest
import torch

from metaopt import _kernel_batching
from metaopt._inductor import inductor
from metaopt._kernel_batching import DISABLE_VARIABLE, batched_cpp_kernels, combined_source

KERNEL_A = """#include <torch/csrc/inductor/cpp_prefix.h>
extern "C"  void  kernel(const float* in_ptr0, float* out_ptr0, const int64_t ks0)
{
    for (int64_t i = 0; i < ks0; ++i) out_ptr0[i] = 2 * in_ptr0[i];
}
"""
KERNEL_B = """#include <torch/csrc/inductor/cpp_prefix.h>
#include <c10/util/generic_math.h>
extern "C" void kernel(float* in_out_ptr0, const double scale)
{
    in_out_ptr0[0] *= scale;
}
"""


def test_combined_source_puts_each_kernel_in_its_own_namespace_with_a_binding():
    code = combined_source([(["const float*", "float*", "const int64_t"], KERNEL_A),
                            (["float*", "const double"], KERNEL_B)])
    assert code.count("#include <torch/csrc/inductor/cpp_prefix.h>") == 1
    assert code.count("#include <c10/util/generic_math.h>") == 1
    assert code.index("#include <c10/util/generic_math.h>") < code.index("namespace")
    assert 'extern "C"' not in code  # C linkage would clash across namespaces
    assert "namespace metaopt_kernel_0 {" in code and "namespace metaopt_kernel_1 {" in code
    assert (
        "metaopt_kernel_0::kernel(static_cast<float*>(metaopt_pointer_arg(args, 0)), "
        "static_cast<float*>(metaopt_pointer_arg(args, 1)), "
        "static_cast<int64_t>(metaopt_integer_arg(args, 2)))" in code
    )
    assert "static_cast<double>(metaopt_float_arg(args, 1))" in code
    assert code.count("METH_VARARGS") == 2 and "PyInit_kernel" in code


@pytest.mark.parametrize(
    "kernels, message",
    [
        ([(["float*"], "void other(float* x) {}")], "defines kernel\\(\\) 0 times"),
        ([(["float*"], KERNEL_B + KERNEL_B)], "defines kernel\\(\\) 2 times"),
        ([(["std::string"], KERNEL_B)], "'std::string' has no conversion"),
    ],
)
def test_combined_source_rejects_what_it_cannot_combine(kernels, message):
    with pytest.raises(ValueError, match=message):
        combined_source(kernels)


def test_the_patch_is_reentrant_and_undone_also_on_error(monkeypatch):
    from torch._inductor.async_compile import AsyncCompile

    monkeypatch.delenv(DISABLE_VARIABLE, raising=False)
    own = AsyncCompile.cpp_pybinding, AsyncCompile.wait
    with pytest.raises(RuntimeError, match="inner"):
        with batched_cpp_kernels():
            with batched_cpp_kernels():
                assert AsyncCompile.cpp_pybinding is not own[0]
            assert AsyncCompile.cpp_pybinding is not own[0]  # still inside the outer one
            raise RuntimeError("inner")
    assert (AsyncCompile.cpp_pybinding, AsyncCompile.wait) == own
    monkeypatch.setenv(DISABLE_VARIABLE, "0")
    with batched_cpp_kernels():
        assert AsyncCompile.cpp_pybinding is own[0]


def _several_kernels(x, y):
    """Three reductions over different inputs and an elementwise epilogue: Inductor
    makes several C++ kernels of it."""
    a = (x.sin() * 2).sum(0)
    b = y.cos().amax(1)
    return a.exp() + b.mean(), (x @ y).relu().sum()


def _compile_and_check(threads: int) -> None:
    torch._dynamo.reset()
    x, y = torch.randn(6, 5), torch.randn(5, 6)
    with torch._inductor.config.patch(force_disable_caches=True, compile_threads=threads):
        got = torch.compile(_several_kernels, backend=inductor, fullgraph=True)(x, y)
    for g, w in zip(got, _several_kernels(x, y), strict=True):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_compiled_graph_builds_its_kernels_in_few_libraries(monkeypatch, threads):
    """Same results as eager; every kernel comes from a shared library (none through
    Inductor's one-kernel path), as many libraries as the rule says, with and without
    Inductor's compile workers."""
    from torch._inductor.codecache import CppPythonBindingsCodeCache

    monkeypatch.delenv(DISABLE_VARIABLE, raising=False)
    libraries, alone = [], []
    cache = _kernel_batching._library_cache()
    load_library = cache.load_async
    monkeypatch.setattr(
        cache, "load_async",
        lambda code, *a, **k: libraries.append(code.count("METH_VARARGS"))
        or load_library(code, *a, **k),
    )
    load_one = CppPythonBindingsCodeCache.load_pybinding_async
    monkeypatch.setattr(
        CppPythonBindingsCodeCache, "load_pybinding_async",
        lambda *a, **k: alone.append(1) or load_one(*a, **k),
    )
    _compile_and_check(threads)
    n_kernels = sum(libraries)
    assert n_kernels >= 2 and alone == []
    # one g++ call per compile worker at most, each with MIN_KERNELS_PER_LIBRARY or more
    want = max(1, min(threads, n_kernels // _kernel_batching.MIN_KERNELS_PER_LIBRARY))
    assert len(libraries) == want


def test_a_library_that_fails_to_build_falls_back_to_one_kernel_each(monkeypatch, caplog):
    monkeypatch.delenv(DISABLE_VARIABLE, raising=False)

    def broken(*args, **kwargs):
        raise RuntimeError("g++ failed")

    monkeypatch.setattr(_kernel_batching._library_cache(), "load_async", broken)
    with caplog.at_level(logging.WARNING, logger="metaopt._kernel_batching"):
        _compile_and_check(threads=1)
    assert "building them one by one" in caplog.text and "g++ failed" in caplog.text


def test_chunks_balance_source_sizes():
    """Largest first, each to the lightest group: 100 | 60, 50 | +10 | +5 -> 115 vs 110."""
    assert _kernel_batching._chunks([100, 10, 60, 50, 5], 2) == [[0, 1, 4], [2, 3]]
    assert _kernel_batching._chunks([3, 2], 4) == [[0], [1]]  # no empty groups


def test_a_kernel_that_cannot_be_combined_is_built_on_its_own(monkeypatch):
    """Two kernels share one library; a third, whose definition has another form, goes
    through Inductor's one-kernel path; all three compute what their C++ says."""
    from torch._inductor.codecache import CppPythonBindingsCodeCache

    other_form = """#include <torch/csrc/inductor/cpp_prefix.h>
extern "C" __attribute__((visibility("default"))) void kernel(float* out_ptr0)
{
    out_ptr0[0] = 7.0f;
}
"""
    alone = []
    load_one = CppPythonBindingsCodeCache.load_pybinding
    monkeypatch.setattr(
        CppPythonBindingsCodeCache, "load_pybinding",
        lambda *a, **k: alone.append(a[1]) or load_one(*a, **k),
    )
    batch = _kernel_batching._KernelBatch(submit=None)
    pending = [
        batch.add(["const float*", "float*", "const int64_t"], KERNEL_A),
        batch.add(["float*"], other_form),
        batch.add(["float*", "const double"], KERNEL_B),
    ]
    double, seven, scale = (p.result() for p in pending)
    assert alone == [other_form]
    x, out = torch.arange(4.0), torch.zeros(4)
    double(x, out, 4)
    assert out.tolist() == [0.0, 2.0, 4.0, 6.0]
    seven(out)
    scale(out, 0.5)
    assert out.tolist() == [3.5, 2.0, 4.0, 6.0]
