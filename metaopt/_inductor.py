"""The Inductor backend metaopt compiles with: Inductor, minus one wrong decomposition
and, for max-pool graphs, with ATen's max-pool backward kernel.

torch 2.13 decomposes ``aten.max_pool2d_with_indices_backward`` into a ``scatter_add``
before Inductor sees it. In graphs AOT autograd compiles for training (inputs that
require grad), Inductor then computes wrong gradients for what precedes a
batch-norm -> ReLU -> max-pool block: ``torch.func.grad`` of a CNN with that block, compiled
while its parameters require grad, returned exactly 0 instead of the gradient of the
layers before the pool (what ``make_meta_step(remat=False)`` and the meta-trainer's
compiled inner steps do). Without the decomposition Inductor lowers the op itself (its own
gather-based kernel) and the gradients match eager; channels-last CNN steps also got
faster (the scatter wrote a channels-first buffer one element at a time).

:func:`inductor` is ``torch.compile``'s Inductor (same ``mode`` and ``options``) with that
decomposition removed, for graphs that contain a max-pool only: for every other graph it
is Inductor, including its on-disk caches (every graph builds its C++ kernels a few
libraries at a time, see :mod:`metaopt._kernel_batching`). Graphs with a max-pool are compiled
with the caches off (their keys do not include the decomposition table, so a cached
entry compiled with the wrong decomposition would be served: seen here), hence afresh in
every process.

Inductor's own kernel for that op was slow on a CPU: it recomputes each window's
maximum from the pooled input instead of reading the saved indices, and, fused with the
batch-norm backward around it, took 24 ms of a 48 ms training step of the benchmark CNN
(``benchmarks/compiled_step.py``; ``torch.profiler`` with Inductor's kernel profiling).
So max-pool graphs lower it to ATen's kernel (``fallback_max_pool2d_with_indices_backward``,
which Inductor itself uses for dilated pools), swapped in around each of their Inductor
compilations only (AOT autograd's lazily compiled backward included, through
``inner_compile``); and on a CPU they keep the convolutions in the layout eager mode
uses (``layout_optimization=False``): channels-last convolutions cost more in layout
copies than they saved there. Measured side by side (one process, medians of 9, one
thread): the benchmark CNN's compiled step went from 0.78x to 0.49x of the eager
functional step (49.8 to 30.9 ms; each change alone gave 0.63x and 0.69x).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import fx

from metaopt._kernel_batching import batched_cpp_kernels

__all__ = ["inductor", "uses_max_pool"]

_MAX_POOL_BACKWARD = torch.ops.aten.max_pool2d_with_indices_backward.default
_WRONG_DECOMPOSITIONS = (_MAX_POOL_BACKWARD,)


def uses_max_pool(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` or a graph nested in it (the body of a ``torch.func`` transform)
    calls a max-pool."""
    for module in gm.modules():
        if isinstance(module, fx.GraphModule):
            for node in module.graph.nodes:
                name = getattr(node.target, "__name__", str(node.target))
                if node.op in ("call_function", "call_method") and "max_pool" in name:
                    return True
    return False


def inductor(
    gm: fx.GraphModule,
    example_inputs: list[Any],
    mode: str | None = None,
    options: dict[str, Any] | None = None,
):
    """A ``torch.compile`` backend: Inductor with ``mode`` and ``options`` as
    ``torch.compile(backend="inductor", mode=..., options=...)`` would apply them; graphs
    with a max-pool without torch's ``scatter_add`` decomposition of max-pool backward,
    with ATen's kernel for it and, on a CPU, ``layout_optimization=False`` unless
    ``options`` set it (see the module doc); C++ kernels built a few libraries at a time
    (:func:`metaopt._kernel_batching.batched_cpp_kernels`)."""
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner
    from torch._inductor.decomposition import select_decomp_table

    config = dict(list_mode_options(mode)) if mode and mode != "default" else {}
    config.update(options or {})
    if _runs_on_cpu(example_inputs, any):
        _probe_cpu_simd_once()
    with batched_cpp_kernels():
        if not uses_max_pool(gm):
            return compile_fx(
                gm,
                example_inputs,
                inner_compile=_with_batched_kernels(compile_fx_inner),
                config_patches=config,
            )
        # max-pool graphs: see the module doc
        table = select_decomp_table()
        decompositions = {
            k: v for k, v in table.items() if k not in _WRONG_DECOMPOSITIONS
        }
        # the caches' keys include neither the decomposition table nor the lowering: an
        # entry compiled without these changes would be served (AOT autograd's cache is
        # off whenever the FX graph cache is)
        config["fx_graph_cache"] = False
        if _runs_on_cpu(example_inputs, all):
            config.setdefault("layout_optimization", False)
        return compile_fx(
            gm,
            example_inputs,
            inner_compile=_with_batched_kernels(_with_aten_max_pool_backward(compile_fx_inner)),
            config_patches=config,
            decompositions=decompositions,
        )


def _runs_on_cpu(example_inputs: list[Any], quantifier: Callable[..., bool]) -> bool:
    """Whether ``quantifier`` (``any`` or ``all``) of the tensor inputs are on a CPU
    (``True`` for a graph without tensor inputs)."""
    devices = [x.device.type for x in example_inputs if isinstance(x, torch.Tensor)]
    return not devices or quantifier(d == "cpu" for d in devices)


def _probe_cpu_simd_once() -> None:
    """Find the SIMD instruction sets this CPU can build for, with ``cpp.vec_isa_ok``
    unset, before a compilation applies its options.

    torch 2.13 caches that list (``cpu_vec_isa.valid_vec_isa_list``) on first use, under
    whatever ``cpp.vec_isa_ok`` is set then: a process whose first compilation passes
    ``options={"cpp.vec_isa_ok": False}`` is left without SIMD for good. Its later
    compilations then generate scalar code, and the SIMD code the FX graph cache serves
    from other processes for the same graphs fails to build (``'at::vec' has not been
    declared``: the kernels are built without the SIMD macros); this failed a CI run.
    ``cpp.vec_isa_ok`` is still read by every compilation, so ``False`` keeps turning
    SIMD off for the compilations that ask. Cached by torch, so a no-op after the first
    call."""
    from torch._inductor import config as inductor_config
    from torch._inductor import cpu_vec_isa

    with inductor_config.patch({"cpp.vec_isa_ok": None}):
        cpu_vec_isa.valid_vec_isa_list()


def _within(
    context: Callable[[], AbstractContextManager[Any]], inner_compile: Callable[..., Any]
) -> Callable[..., Any]:
    """``inner_compile`` run inside ``context()`` (AOT autograd compiles a backward
    lazily, outside the backend call, so what the backend sets up is redone here)."""

    @functools.wraps(inner_compile)
    def compile_within(*args: Any, **kwargs: Any) -> Any:
        with context():
            return inner_compile(*args, **kwargs)

    return compile_within


def _with_batched_kernels(inner_compile: Callable[..., Any]) -> Callable[..., Any]:
    """``inner_compile`` building each graph's C++ kernels a few libraries at a time."""
    return _within(batched_cpp_kernels, inner_compile)


@contextlib.contextmanager
def _aten_max_pool_backward() -> Iterator[None]:
    """Inductor lowers max-pool backward to ATen's kernel while this is active."""
    from torch._inductor import lowering

    own = lowering.lowerings[_MAX_POOL_BACKWARD]
    lowering.lowerings[_MAX_POOL_BACKWARD] = lowering.fallback_max_pool2d_with_indices_backward
    try:
        yield
    finally:
        lowering.lowerings[_MAX_POOL_BACKWARD] = own


def _with_aten_max_pool_backward(inner_compile: Callable[..., Any]) -> Callable[..., Any]:
    """``inner_compile`` lowering max-pool backward to ATen's kernel while it runs."""
    return _within(_aten_max_pool_backward, inner_compile)
