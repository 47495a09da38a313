"""Data-parallel meta-gradients: 2 gloo CPU processes give the single-process result."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from metaopt.meta.distributed import DistributedContext, all_reduce_mean, shard
from metaopt.meta.trainer import MetaTrainer
from tests.meta.test_trainer import tiny_config

N_SAMPLES = 4


def _meta_gradient(trainer: MetaTrainer):
    gen = torch.Generator().manual_seed(5)
    problems = [trainer.family.sample(gen) for _ in range(N_SAMPLES)]
    return trainer.meta_gradient(problems, noise_seeds=[11, 12, 13, 14])


def _worker(rank: int, world: int, init_file: str, out_dir: str, result: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        trainer = MetaTrainer(tiny_config(), out_dir, ctx=DistributedContext(rank, world),
                              progress=False)
        loss, grads = _meta_gradient(trainer)
        if rank == 0:
            torch.save({"loss": loss, "grads": grads}, result)
        dist.barrier()  # no rank tears gloo down while its peer still talks to it
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_match_single_process(tmp_path):
    result = tmp_path / "result.pt"
    mp.spawn(_worker, args=(2, str(tmp_path / "pg"), str(tmp_path / "out"), str(result)),
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
