"""Tutorial (b): continual learning on Split-MNIST with ``new_task()`` at task boundaries.

Compares Adam and the learned optimizer on the same stream, seeds and budget, and prints
the accuracy matrix and ACC / BWT / FWT / forgetting / learning accuracy.

    METAOPT_DATA_DIR=../shared/data python examples/split_mnist.py
    python examples/split_mnist.py --data-dir DIR --smoke
"""

from __future__ import annotations

import argparse
import functools

import torch

import metaopt
from metaopt.continual import data, models, runner, streams


def build_stream(args: argparse.Namespace) -> list[streams.Task]:
    x, y = data.load_mnist("mnist", data_dir=args.data_dir, split="train")
    xt, yt = data.load_mnist("mnist", data_dir=args.data_dir, split="test")
    stream = streams.split_stream(x, y, xt, yt, n_tasks=5, scenario=args.scenario, seed=args.seed)
    return streams.subsample(stream, n_train=args.train_per_task, n_test=args.test_per_task)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="folder with mnist/ (default $METAOPT_DATA_DIR)")
    parser.add_argument("--scenario", choices=("domain", "task", "class"), default="domain")
    parser.add_argument("--train-per-task", type=int, default=2000)
    parser.add_argument("--test-per-task", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny run for the tests")
    args = parser.parse_args(argv)
    if args.smoke:
        args.train_per_task, args.test_per_task = 200, 100
    stream = build_stream(args)

    def model_factory() -> torch.nn.Module:
        return models.build_model("mlp", (1, 28, 28), streams.n_outputs(stream))

    optimizers = {
        "adam": functools.partial(torch.optim.Adam, lr=args.lr),
        "learned": functools.partial(
            metaopt.LearnedOptimizer.from_pretrained, "default", lr=args.lr
        ),
    }
    summaries = {}
    for name, factory in optimizers.items():
        result = runner.run_stream(
            model_factory, factory, stream, epochs=args.epochs, seed=args.seed
        )
        summaries[name] = result.metrics()
        print(f"{name}: R[i, j] = accuracy on task j after training task i")
        print(result.R)
        print("  " + "  ".join(f"{k} {v:.3f}" for k, v in summaries[name].items()))
    return summaries


if __name__ == "__main__":
    main()
