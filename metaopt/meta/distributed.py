"""Data-parallel meta-training over task samples with :mod:`torch.distributed`.

Every rank draws the SAME task samples from the same seeded generator, computes the
meta-gradient of its share (``samples[rank::world_size]``), and the per-sample sums are
all-reduced, so the averaged meta-gradient equals the single-process one on the same
samples (up to float summation order). Launch with ``torchrun --nproc_per_node N``.

The meta-trainer computes on the CPU, so its all-reduces take CPU tensors: the default
backend is gloo, and on a machine with CUDA ``"cpu:gloo,cuda:nccl"`` (gloo for CPU
tensors, nccl for CUDA ones). A plain ``"nccl"`` group, which ``torch.distributed``'s
examples pick whenever CUDA is available, cannot all-reduce CPU tensors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from metaopt.tree import Params

__all__ = [
    "DistributedContext",
    "all_reduce_mean",
    "check_ranks_agree",
    "default_backend",
    "init_distributed",
    "shard",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits: ``rank`` of ``world_size`` (``1`` when not distributed)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """True on the rank that writes checkpoints, logs and plots."""
        return self.rank == 0


def init_distributed(backend: str | None = None) -> DistributedContext:
    """Join the process group described by torchrun's environment, if any.

    Args:
        backend: a ``torch.distributed`` backend string; default :func:`default_backend`.

    Returns:
        The context; a single-process context when ``WORLD_SIZE`` is unset or 1.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistributedContext()
    if not dist.is_initialized():
        backend = backend or default_backend()
        _import_modules_that_would_pin_the_group()
        dist.init_process_group(backend)
        logger.info("joined %s process group: rank %d of %d", backend, dist.get_rank(), world)
    return DistributedContext(dist.get_rank(), dist.get_world_size())


def _import_modules_that_would_pin_the_group() -> None:
    """Import ``torch._dynamo`` (and with it ``torch.distributed.fsdp``) before the group
    exists.

    Some of torch's modules take ``dist.group.WORLD`` as a default argument, evaluated
    when they are imported; imported after ``init_process_group`` (``torch.optim``
    imports ``torch._dynamo`` on first use, which imports ``torch.distributed.fsdp``),
    they hold the group for good. ``destroy_process_group`` then cannot free it, and gloo's
    worker threads are torn down during interpreter shutdown, which now and then aborts
    a rank that has finished ("terminate called without an active exception").
    """
    import torch._dynamo  # noqa: F401


def default_backend() -> str:
    """``"cpu:gloo,cuda:nccl"`` when CUDA is available, else ``"gloo"``: a process group
    that all-reduces CPU tensors (the meta-trainer's) with gloo either way."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def check_ranks_agree(fingerprint: Any, ctx: DistributedContext) -> None:
    """Raise ``ValueError`` on every rank unless ``fingerprint`` (plain data: numbers,
    strings, lists, dicts) is the same on all of them. Every rank must call it.

    Ranks that disagree about where a run stands (one resumed a checkpoint that another
    did not see, with a node-local ``--out``) or about its settings (``--steps``,
    ``--val-every`` given to one rank only) paired all-reduces of different meanings:
    they mixed validation sums into the training counts, then waited for each other
    for good.
    """
    if ctx.world_size <= 1:
        return
    text = json.dumps(fingerprint, sort_keys=True, allow_nan=True)
    digest = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little", signed=True)
    mine = torch.tensor([digest], dtype=torch.int64)  # a CPU tensor: gloo on every backend
    every = [torch.empty_like(mine) for _ in range(ctx.world_size)]
    dist.all_gather(every, mine)
    differ = [rank for rank, theirs in enumerate(every) if not torch.equal(theirs, every[0])]
    if differ:
        raise ValueError(
            f"ranks {differ} do not run the same meta-training as rank 0 (another step "
            "resumed from, other settings or another starting net): give every rank the "
            "same arguments and the same --out checkpoint"
        )


def shard(items: Sequence[T], ctx: DistributedContext) -> list[T]:
    """This rank's share of ``items`` (round-robin)."""
    return list(items[ctx.rank :: ctx.world_size])


def all_reduce_mean(
    sums: Params, loss_sum: torch.Tensor, count: int, ctx: DistributedContext
) -> tuple[Params, torch.Tensor]:
    """Average per-sample sums over all ranks.

    Args:
        sums: ``{name: sum of this rank's per-sample meta-gradients}``.
        loss_sum: 0-d sum of this rank's per-sample meta-losses.
        count: total number of samples over ALL ranks.
        ctx: the distributed context.

    Returns:
        ``(mean_grads, mean_loss)``.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    names = list(sums)
    # the loss sum is a CPU float64 on every device; the gradients set dtype and device
    flat = torch.cat(
        [sums[k].reshape(-1) for k in names] + [loss_sum.reshape(1).to(sums[names[0]])]
    )
    if ctx.world_size > 1:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat = flat / count
    out, offset = {}, 0
    for k in names:
        n = sums[k].numel()
        out[k] = flat[offset : offset + n].view_as(sums[k])
        offset += n
    return out, flat[-1]
