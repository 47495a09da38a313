"""Data-parallel meta-training of the learned rule with torchrun (gloo on CPU, nccl on GPU).

Every rank draws the same task sequences, computes the meta-gradient of its share and
the sums are all-reduced, so N processes compute the same meta-gradient as one process
on the same samples, N times faster per meta-step. Rank 0 writes the checkpoint, the
history and the exported rule.

    torchrun --standalone --nproc_per_node 2 examples/distributed_meta_train.py --out runs/ddp
    torchrun --standalone --nproc_per_node 2 examples/distributed_meta_train.py --out r --smoke
    python examples/distributed_meta_train.py --out runs/single --smoke   # one process
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist

from metaopt.meta.distributed import init_distributed
from metaopt.meta.tasks import FamilyConfig
from metaopt.meta.trainer import MetaTrainer, TrainConfig


def config_for(args: argparse.Namespace) -> TrainConfig:
    if args.smoke:  # 2 meta-steps on tiny digits sequences: seconds
        family = FamilyConfig(
            datasets=("digits",), models=("mlp",), kinds=("split",),
            n_tasks=(2, 2), steps_per_task=(3, 3), examples=100,
        )
        return TrainConfig(
            steps=2, tasks_per_step=2, truncation=3, val_every=2, val_tasks=1,
            ckpt_every=2, seed=args.seed, family=family.to_dict(),
        )
    return TrainConfig(steps=args.steps, tasks_per_step=args.tasks_per_step, seed=args.seed)


def main(argv: list[str] | None = None) -> dict[str, float] | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder (checkpoint, history)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--tasks-per-step", type=int, default=4, help="split across ranks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny run for the tests")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    ctx = init_distributed()                      # reads torchrun's environment
    trainer = MetaTrainer(config_for(args), args.out, ctx=ctx, progress=False)
    trainer.resume()                              # continue a killed run
    best = trainer.train()
    summary = None
    if ctx.is_main:
        trainer.export(Path(args.out) / "rule.pt", {"description": "distributed example"})
        summary = {
            "world_size": ctx.world_size,
            "meta_steps": trainer.step,
            "best_val_meta_loss": best["meta_loss"],
            "last_train_meta_loss": trainer.history[-2]["meta_loss"],
        }
        print(json.dumps(summary))
    if dist.is_initialized():
        dist.barrier()  # every rank is done before any tears gloo down
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
