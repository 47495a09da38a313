"""Memory stays flat over a long inner loop when the unroll is truncated."""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from metaopt.meta import Unrolled
from tests.meta.meta_helpers import classification_problem, toy_meta_params, toy_rule


class LiveTensorMeter(TorchDispatchMode):
    """Peak bytes of tensor storage created by ops (forward, backward, double backward)
    and still alive. A tensor counts until its storage is freed, wherever the reference
    is held (Python, or autograd graphs in C++)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._tracked: dict[int, weakref.ref] = {}

    def _release(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t._is_view():
                continue
            known = self._tracked.get(id(t))
            if known is None or known() is not t:  # in-place ops return tensors seen before
                nbytes = t.untyped_storage().nbytes()
                self._tracked[id(t)] = weakref.ref(t)
                self.live += nbytes
                weakref.finalize(t, self._release, nbytes)
        self.peak = max(self.peak, self.live)
        return out


def peak_bytes(steps: int, truncation: int | None) -> tuple[int, int]:
    """(peak, still alive at the end) bytes of one unrolled meta-gradient."""
    problem = classification_problem(steps=steps, every_step=True, dtype=torch.float32)
    mp = toy_meta_params(torch.float32)
    with LiveTensorMeter() as meter:
        result = Unrolled(toy_rule, truncation)(mp, problem)
    del result
    return meter.peak, meter.live


def test_memory_is_flat_over_1000_inner_steps_with_truncation():
    short, _ = peak_bytes(100, truncation=10)
    long, leftover = peak_bytes(1000, truncation=10)
    assert short > 0
    assert long == short  # the same peak: nothing accumulates across windows
    assert leftover == 0  # and nothing outlives the call


def test_meter_sees_graph_growth_without_truncation():
    assert peak_bytes(40, None)[0] > 1.8 * peak_bytes(20, None)[0]
