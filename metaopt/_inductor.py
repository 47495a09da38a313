"""The Inductor backend metaopt compiles with: Inductor, minus one wrong decomposition.

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
is exactly Inductor, including its on-disk caches. Graphs with a max-pool are compiled
with the caches off (their keys do not include the decomposition table, so a cached
entry compiled with the wrong decomposition would be served: seen here), hence afresh in
every process.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

__all__ = ["inductor", "uses_max_pool"]

_WRONG_DECOMPOSITIONS = (torch.ops.aten.max_pool2d_with_indices_backward.default,)


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
    ``torch.compile(backend="inductor", mode=..., options=...)`` would apply them, without
    torch's ``scatter_add`` decomposition of max-pool backward (see the module doc)."""
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table

    config = dict(list_mode_options(mode)) if mode and mode != "default" else {}
    config.update(options or {})
    decompositions = None
    if uses_max_pool(gm):
        table = select_decomp_table()
        if any(op in table for op in _WRONG_DECOMPOSITIONS):
            decompositions = {k: v for k, v in table.items() if k not in _WRONG_DECOMPOSITIONS}
            # the caches' keys do not include the decomposition table: an entry compiled
            # with the wrong decomposition would be served (AOT autograd's cache is off
            # whenever the FX graph cache is)
            config["fx_graph_cache"] = False
    return compile_fx(gm, example_inputs, config_patches=config, decompositions=decompositions)
