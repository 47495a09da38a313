"""Plain single-task training: the shipped learned optimizer at its defaults (untuned,
lr 1e-3) against Adam with its learning rate tuned per model, measured by the final loss.

The learned rule is meant to cost nothing when there is no continual learning to do;
the target is a final loss at most 5 % above tuned Adam's. Every run of a model and seed
starts from the same initial weights and sees the same batches; Adam's learning rate is
chosen per model by the mean final loss over seeds (training loss for the training
column, held-out loss for the held-out column). The held-out images are training-set
images the runs never train on (never the test split)::

    METAOPT_DATA_DIR=../shared/data python benchmarks/single_task.py --seeds 3
    python benchmarks/single_task.py --dataset digits      # no data files needed
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from metaopt import LearnedOptimizer
from metaopt.continual.data import load_dataset
from metaopt.continual.models import build_model
from metaopt.learned import load_pretrained

ADAM_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
LEARNED = "learned (lr=1e-3)"


def split_train_heldout(
    dataset: str, n_train: int, n_heldout: int, data_dir: str | None
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``n_train`` and ``n_heldout`` disjoint images of the dataset's training split
    (a fixed random subset: the same for every run)."""
    x, y = load_dataset(dataset, data_dir, "train")
    if n_train + n_heldout > len(y):
        raise ValueError(
            f"{dataset} has {len(y)} training images, asked for {n_train} + {n_heldout}"
        )
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, heldout = order[:n_train], order[n_train : n_train + n_heldout]
    return (x[train], y[train]), (x[heldout], y[heldout])


@torch.no_grad()
def mean_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 1000) -> float:
    """Mean cross-entropy of ``model`` (in eval mode) over ``(x, y)``."""
    model.eval()
    total = sum(
        float(F.cross_entropy(model(x[i : i + chunk]), y[i : i + chunk], reduction="sum"))
        for i in range(0, len(y), chunk)
    )
    model.train()
    return total / len(y)


def train(
    model: nn.Module,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    data: tuple[torch.Tensor, torch.Tensor],
    epochs: int,
    batch: int,
    seed: int,
) -> None:
    """``epochs`` epochs of minibatch training, batches in a seeded order."""
    x, y = data
    opt = make_optimizer(model)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for index in torch.randperm(len(y), generator=g).split(batch):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[index]), y[index]).backward()
            opt.step()


def run(args: argparse.Namespace) -> list[dict[str, object]]:
    """Final training and held-out loss of every (model, optimizer, seed)."""
    (x, y), heldout = split_train_heldout(args.dataset, args.train, args.heldout, args.data_dir)
    net = load_pretrained(args.checkpoint)
    optimizers: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
        f"adam lr={lr:g}": (lambda m, lr=lr: torch.optim.Adam(m.parameters(), lr=lr))
        for lr in ADAM_LRS
    }
    # with names, as the rule was meta-trained and as the docs ask (without them the
    # transformer's norms read as biases and its embeddings as weights)
    optimizers[LEARNED] = lambda m: LearnedOptimizer(m.named_parameters(), lr=1e-3, net=net)
    rows = []
    for model_name in args.models:
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            initial = build_model(model_name, tuple(x.shape[1:]), 10)
            for opt_name, make in optimizers.items():
                model = build_model(model_name, tuple(x.shape[1:]), 10)
                model.load_state_dict(initial.state_dict())
                start = time.perf_counter()
                train(model, make, (x, y), args.epochs, args.batch, seed)
                rows.append({
                    "model": model_name,
                    "optimizer": opt_name,
                    "seed": seed,
                    "train loss": mean_loss(model, x, y),
                    "held-out loss": mean_loss(model, *heldout),
                    "seconds": time.perf_counter() - start,
                })
    return rows


def summarise(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """Per model: the learned rule, Adam at 1e-3 and Adam tuned per column, mean (std)
    over seeds, and the learned / tuned-Adam ratios."""
    table = []
    for model_name in dict.fromkeys(r["model"] for r in rows):
        def losses(opt_name: str, column: str, model_name: str = model_name) -> list[float]:
            return [float(r[column]) for r in rows
                    if r["model"] == model_name and r["optimizer"] == opt_name]

        adams = [f"adam lr={lr:g}" for lr in ADAM_LRS]
        learned = LEARNED
        out: dict[str, object] = {"model": model_name}
        for column in ("train loss", "held-out loss"):
            best = min(adams, key=lambda name, c=column: statistics.mean(losses(name, c)))
            ours, theirs = losses(learned, column), losses(best, column)
            out[f"learned {column}"] = _mean_std(ours)
            out[f"tuned Adam {column}"] = f"{_mean_std(theirs)} ({best.split('=')[1]})"
            out[f"Adam 1e-3 {column}"] = _mean_std(losses("adam lr=0.001", column))
            out[f"{column} learned / tuned"] = (
                f"{statistics.mean(ours) / statistics.mean(theirs):.3f}"
            )
        table.append(out)
    return table


def _mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="mnist", choices=("mnist", "digits"))
    parser.add_argument("--data-dir", default=None, help="default: $METAOPT_DATA_DIR")
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn", "transformer"])
    parser.add_argument("--train", type=int, default=4000, help="training images")
    parser.add_argument("--heldout", type=int, default=1000, help="held-out images")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--checkpoint",
        default="default",
        help="the learned rule: a shipped name or a .pt path (metaopt meta-train --export)",
    )
    args = parser.parse_args(argv)
    if args.dataset == "digits":  # 1,347 training images in all
        args.train, args.heldout = min(args.train, 1000), min(args.heldout, 347)
    torch.set_num_threads(args.threads)
    rows = run(args)
    print(
        f"single-task training, {args.dataset} ({args.train} training / {args.heldout} "
        f"held-out images), {args.epochs} epochs at batch {args.batch}, {args.seeds} "
        f"seed(s), {args.threads} thread(s); Adam lr tuned per model over {ADAM_LRS}; "
        f"learned rule {args.checkpoint!r}"
    )
    for line in summarise(rows):
        print(" | ".join(f"{k}: {v}" for k, v in line.items()))


if __name__ == "__main__":
    main()
