"""Data-parallel meta-gradients: 2 gloo CPU processes give the single-process result."""

from __future__ import annotations

import os
import socket
import weakref

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from metaopt.meta import distributed
from metaopt.meta.distributed import (
    DistributedContext,
    all_reduce_mean,
    check_ranks_agree,
    init_distributed,
    shard,
)
from metaopt.meta.trainer import MetaTrainer
from tests.meta.test_trainer import tiny_config

N_SAMPLES = 4


def _meta_gradient(trainer: MetaTrainer):
    gen = torch.Generator().manual_seed(5)
    problems = [trainer.family.sample(gen) for _ in range(N_SAMPLES)]
    return trainer.meta_gradient(problems, noise_seeds=[11, 12, 13, 14])


def _worker(rank: int, world: int, port: int, out_dir: str, result: str) -> None:
    """One rank, joined as under torchrun: its environment, then ``init_distributed``."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    ctx = init_distributed()
    assert (ctx.rank, ctx.world_size) == (rank, world)
    group = weakref.ref(dist.distributed_c10d._get_default_group())
    try:
        trainer = MetaTrainer(tiny_config(), out_dir, ctx=ctx, progress=False)
        loss, grads = _meta_gradient(trainer)
        if rank == 0:
            torch.save({"loss": loss, "grads": grads}, result)
        dist.barrier()  # no rank tears gloo down while its peer still talks to it
    finally:
        dist.destroy_process_group()
    # freed now, with its gloo threads, not during interpreter shutdown (where a thread
    # still running can abort the process): nothing imported after init holds the group
    assert group() is None, "the process group outlived destroy_process_group"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_gloo_processes_match_single_process(tmp_path):
    result = tmp_path / "result.pt"
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "out"), str(result)),
             nprocs=2, join=True)
    distributed = torch.load(result, weights_only=True)
    single = MetaTrainer(tiny_config(), tmp_path / "single", progress=False)
    loss, grads = _meta_gradient(single)
    torch.testing.assert_close(distributed["loss"], loss, rtol=1e-6, atol=1e-9)
    assert grads.keys() == distributed["grads"].keys()
    for k, g in grads.items():
        torch.testing.assert_close(distributed["grads"][k], g, rtol=1e-5, atol=1e-7)
    assert sum(float(g.abs().sum()) for g in grads.values()) > 0


def test_shard_and_mean_without_a_process_group():
    ctx = DistributedContext(rank=1, world_size=3)
    assert shard(list(range(7)), ctx) == [1, 4]
    grads, loss = all_reduce_mean({"a": torch.tensor([3.0, 6.0])}, torch.tensor(9.0), 3,
                                  DistributedContext())
    torch.testing.assert_close(grads["a"], torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(loss, torch.tensor(3.0))


def test_default_backend_all_reduces_cpu_tensors_also_where_cuda_is(monkeypatch):
    """The meta-trainer's tensors are on the CPU: a plain nccl group cannot all-reduce
    them, so with CUDA the default group maps CPU tensors to gloo."""
    joined = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend: joined.append(backend))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for cuda, expected in ((True, "cpu:gloo,cuda:nccl"), (False, "gloo")):
        monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda cuda=cuda: cuda)
        assert init_distributed() == DistributedContext(1, 2)
        assert joined.pop() == expected
    init_distributed("nccl")  # an explicit backend is taken as given
    assert joined.pop() == "nccl"
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_distributed() == DistributedContext() and not joined


def _agreement_worker(rank: int, world: int, port: int, fingerprints: list, result: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    ctx = init_distributed()
    try:
        try:
            check_ranks_agree(fingerprints[rank], ctx)
            outcome = "agree"
        except ValueError as error:
            outcome = str(error)
        torch.save(outcome, f"{result}.{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ranks_that_run_different_meta_trainings_all_stop_with_the_reason(tmp_path):
    """Ranks at different steps (one resumed, one not) or with other settings paired
    all-reduces of different meanings, then hung: every rank now raises, naming the
    ranks that differ from rank 0; ranks that agree go on."""
    result = str(tmp_path / "outcome")
    same = {"step": 2, "config": {"steps": 4}, "net": [0.5]}
    for fingerprints, expected in (
        ([same, dict(same)], "agree"),
        ([same, {**same, "step": 0}], "ranks [1] do not run the same meta-training"),
    ):
        mp.spawn(_agreement_worker, args=(2, _free_port(), fingerprints, result), nprocs=2,
                 join=True)
        for rank in range(2):
            assert expected in torch.load(f"{result}.{rank}", weights_only=True)
