"""``metaopt meta-train``: meta-train the learned rule (resumable; torchrun-ready).

Example::

    metaopt meta-train --out runs/meta --steps 500 --datasets digits mnist
    torchrun --nproc_per_node 2 -m metaopt.cli meta-train --out runs/meta --steps 500
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import logging
import os
import shlex
from pathlib import Path

import torch
import torch.distributed as dist

from metaopt.continual.data import check_dataset_name
from metaopt.meta.distributed import DistributedContext, check_ranks_agree, init_distributed
from metaopt.meta.tasks import DATASETS, KINDS, MODELS, SMALL_MODELS, FamilyConfig
from metaopt.meta.trainer import MetaTrainer, TrainConfig, check_out_dir

__all__ = ["check_args", "config_from_args", "register"]

logger = logging.getLogger(__name__)


def _dataset_name(name: str) -> str:
    """``--datasets`` values: a built-in pool or a folder name (a usage error otherwise)."""
    try:
        check_dataset_name(name)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return name


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``meta-train`` command to a top-level ``metaopt`` parser."""
    p = subparsers.add_parser(
        "meta-train",
        help="meta-train the learned optimizer on random continual task sequences",
        description=(
            "Meta-train metaopt's learned rule on short task sequences drawn from digits / "
            "MNIST TRAINING images (never test images, never Fashion-MNIST). The "
            "meta-loss counts the held-out loss on the current and all earlier tasks plus "
            "a learning-speed term. Resumes from <out>/checkpoint.pt when it exists."
        ),
    )
    p.add_argument("--out", required=True, help="output folder (checkpoint, history, plot)")
    p.add_argument("--steps", type=int, default=200, help="meta-steps to reach")
    p.add_argument("--tasks-per-step", type=int, default=2)
    p.add_argument("--meta-lr", type=float, default=1e-3)
    p.add_argument("--clip", type=float, default=1.0, help="meta-gradient global-norm clip")
    p.add_argument("--inner-lr", type=float, default=1e-3, help="the rule's lr in inner loops")
    p.add_argument("--estimator", choices=("unrolled", "es", "pes"), default="unrolled")
    p.add_argument("--truncation", type=int, default=20, help="unroll/PES window (steps)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the unrolled estimator's inner steps (faster per meta-step "
        "after compiling once per dataset x model x batch size; minutes each on a CPU)",
    )
    p.add_argument("--sigma", type=float, default=0.01, help="ES/PES perturbation scale")
    p.add_argument("--es-pairs", type=int, default=4)
    p.add_argument("--val-every", type=int, default=20)
    p.add_argument("--val-tasks", type=int, default=8)
    p.add_argument("--ckpt-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--datasets",
        nargs="+",
        type=_dataset_name,
        default=["digits"],
        metavar="NAME",
        help=f"image pools: {' / '.join(DATASETS)} or folders of IDX files in the data "
        "directory (their training files only)",
    )
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    p.add_argument("--n-tasks", nargs=2, type=int, default=[2, 3], metavar=("LOW", "HIGH"))
    p.add_argument(
        "--steps-per-task", nargs=2, type=int, default=[10, 20], metavar=("LOW", "HIGH")
    )
    p.add_argument("--examples", type=int, default=600, help="training images per sequence")
    p.add_argument("--speed-weight", type=float, default=0.25)
    p.add_argument(
        "--earlier-weight", type=float, default=1.0, help="weight of earlier tasks vs current"
    )
    p.add_argument(
        "--mnist-size", type=int, default=14, help="MNIST side after pooling (28: none; at most 28)"
    )
    p.add_argument(
        "--mlp-hidden",
        nargs="+",
        type=int,
        default=list(SMALL_MODELS["mlp"]["hidden"]),
        help="hidden widths of the MLPs (the paper suite's MLP: 400 400)",
    )
    p.add_argument(
        "--cnn-channels",
        nargs="+",
        type=int,
        default=list(SMALL_MODELS["cnn"]["channels"]),
        help="channels of the CNNs' conv blocks (the paper suite's CNN: 16 32)",
    )
    p.add_argument(
        "--transformer-size",
        nargs=3,
        type=int,
        default=[SMALL_MODELS["transformer"][k] for k in ("dim", "depth", "heads")],
        metavar=("DIM", "DEPTH", "HEADS"),
        help="width, layers and attention heads of the ViT-style transformers (the paper "
        "suite's: 64 2 4)",
    )
    p.add_argument(
        "--init",
        metavar="CHECKPOINT",
        help="start from this learned checkpoint (a shipped name such as 'default', or a "
        ".pt path) instead of the Adam-identity initialisation",
    )
    p.add_argument(
        "--data-dir", help="folder holding mnist/ and other datasets (default $METAOPT_DATA_DIR)"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument(
        "--device",
        default="cpu",
        help="device of the net and the inner models, e.g. cuda (default cpu); under "
        "torchrun, cuda means each process's cuda:LOCAL_RANK",
    )
    p.add_argument("--no-resume", action="store_true", help="start afresh (overwrites)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--export", metavar="PATH", help="save the best-validation rule as a learned checkpoint"
    )
    p.add_argument(
        "--compare",
        type=int,
        metavar="N",
        default=0,
        help="after training, compare the best rule with Adam on N fresh validation sequences",
    )
    p.set_defaults(func=meta_train_command)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` described by parsed ``meta-train`` arguments."""
    family = FamilyConfig(
        datasets=tuple(args.datasets),
        models=tuple(args.models),
        kinds=tuple(args.kinds),
        n_tasks=tuple(args.n_tasks),
        steps_per_task=tuple(args.steps_per_task),
        examples=args.examples,
        speed_weight=args.speed_weight,
        earlier_weight=args.earlier_weight,
        mnist_size=args.mnist_size,
    )
    dim, depth, heads = args.transformer_size
    family = dataclasses.replace(  # validated again with the model sizes
        family,
        model_sizes={
            "mlp": {"hidden": tuple(args.mlp_hidden)},
            "cnn": {"channels": tuple(args.cnn_channels)},
            "transformer": {"dim": dim, "depth": depth, "heads": heads},
        },
    )
    return TrainConfig(
        steps=args.steps,
        tasks_per_step=args.tasks_per_step,
        meta_lr=args.meta_lr,
        clip=args.clip,
        inner_lr=args.inner_lr,
        estimator=args.estimator,
        truncation=args.truncation,
        sigma=args.sigma,
        es_pairs=args.es_pairs,
        val_every=args.val_every,
        val_tasks=args.val_tasks,
        ckpt_every=args.ckpt_every,
        seed=args.seed,
        family=family.to_dict(),
        init=args.init,
    )


def check_args(args: argparse.Namespace) -> None:
    """Refuse ``meta-train`` arguments that would only fail after work has started
    (``ValueError``, which ``metaopt`` prints as one error line)."""
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    try:
        torch.device(args.device)
    except RuntimeError as exc:
        raise ValueError(f"--device {args.device!r}: {exc}") from None
    if args.compare < 0:
        raise ValueError(f"--compare must be >= 0, got {args.compare}")
    check_out_dir(Path(args.out))
    if args.export:
        export = Path(args.export)
        if export.is_dir():
            raise ValueError(f"--export {args.export} is a directory; give a file path")
        try:  # its folder is made when the rule is written, after the training
            check_out_dir(export.parent)
        except ValueError as exc:
            raise ValueError(f"--export {args.export}: {exc}") from None


def process_device(device: str, ctx: DistributedContext) -> torch.device:
    """``device`` for this process: a bare ``"cuda"`` in a distributed run is the
    process's own GPU, ``cuda:$LOCAL_RANK`` (as ``torchrun`` sets it)."""
    chosen = torch.device(device)
    if chosen.type == "cuda" and chosen.index is None and ctx.world_size > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", ctx.rank)))
    return chosen


def meta_train_command(args: argparse.Namespace) -> int:
    """Handler of ``metaopt meta-train``: every argument is checked before any work."""
    check_args(args)
    config = config_from_args(args)
    torch.set_num_threads(args.threads)
    ctx = init_distributed()
    trainer = MetaTrainer(
        config,
        args.out,
        ctx=ctx,
        data_dir=args.data_dir,
        progress=not args.no_progress,
        compile=args.compile,
        device=process_device(args.device, ctx),
    )
    if not args.no_resume and trainer.resume():
        logger.info("continuing at meta-step %d of %d", trainer.step, config.steps)
    try:
        check_ranks_agree(trainer.fingerprint(), ctx)  # else their all-reduces mix and hang
        best = trainer.train()
        if dist.is_initialized():
            dist.barrier()  # every rank is done before any tears gloo down
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if ctx.is_main:
        print(
            f"meta-step {trainer.step}: best validation meta-loss {best['meta_loss']:.4f} "
            f"(acc {best['acc']:.3f}) at step {best['step']}; Adam "
            f"{trainer.baseline['adam']['meta_loss']:.4f} (acc "
            f"{trainer.baseline['adam']['acc']:.3f}); curves in {Path(args.out) / 'curves.png'}"
        )
        if args.compare:
            comparison = trainer.heldout_comparison(args.compare)
            for name, metrics in comparison.items():
                print(f"{args.compare} fresh validation sequences, {name}: "
                      + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if args.export:
            command = "metaopt " + shlex.join(getattr(args, "argv", []) or [])
            path = trainer.export(
                args.export,
                {
                    "description": "metaopt learned rule, meta-trained with metaopt meta-train",
                    "trained_on": (
                        f"{'+'.join(args.datasets)} training images; models "
                        f"{'+'.join(args.models)}; streams {'+'.join(args.kinds)}"
                    ),
                    "command": command,
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                        timespec="seconds"
                    ),
                },
            )
            print(f"exported the best-validation rule to {path}")
    return 0
