"""What the learned rule's memory savings cost in accuracy: bfloat16 auxiliary buffers
(anchor, importance; 1.5x Adam's state) against float32 ones (2x), and Adafactor-style
factored second moments (about 1x), on Split-digits (domain-incremental, 5 tasks), several
seeds.

The shipped default rule is Adam at initialisation and does not read these buffers, so
the comparison uses a hand-set rule that does: every token gets the same soft importance
gate (``lambda``) and importance-scaled pull-back (``rho``), set through the head's bias.
Adam and the Adam-identity rule are listed for reference. Prints ACC, BWT and the mean
diagonal of R (mean and standard deviation over seeds)::

    python benchmarks/aux_precision.py --seeds 3 --steps 100
"""

from __future__ import annotations

import argparse
import functools
import statistics
from collections.abc import Callable

import torch

from metaopt import LearnedOptimizer
from metaopt.continual.data import load_digits_tensors
from metaopt.continual.metrics import acc, bwt
from metaopt.continual.models import build_model
from metaopt.continual.runner import run_stream
from metaopt.continual.streams import n_outputs, split_stream
from metaopt.learned import LearnedRuleNet
from metaopt.learned.network import TokenCoefficients


def hand_set_net(gate_lambda: float, rho_raw: float) -> LearnedRuleNet:
    """Adam plus a constant soft importance gate and importance-scaled pull-back."""
    net = LearnedRuleNet()
    fields = TokenCoefficients._fields
    with torch.no_grad():
        net.head.bias[fields.index("gate_lambda")] = gate_lambda
        net.head.bias[fields.index("rho")] = rho_raw
    return net


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per task")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--gate-lambda", type=float, default=1.0)
    parser.add_argument("--rho-raw", type=float, default=5.0, help="rho = 0.01 x this")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    stream = split_stream(
        *load_digits_tensors("train"),
        *load_digits_tensors("test"),
        n_tasks=5,
        scenario="domain",
    )
    model = functools.partial(build_model, "mlp", (1, 8, 8), n_outputs(stream))
    net = hand_set_net(args.gate_lambda, args.rho_raw)
    variants: dict[str, Callable] = {
        "Adam": functools.partial(torch.optim.Adam, lr=args.lr),
        "learned, Adam identity": functools.partial(
            LearnedOptimizer, lr=args.lr, net=LearnedRuleNet()
        ),
        "learned, gate + pull-back, aux bfloat16": functools.partial(
            LearnedOptimizer, lr=args.lr, net=net, aux_dtype=torch.bfloat16
        ),
        "learned, gate + pull-back, aux float32": functools.partial(
            LearnedOptimizer, lr=args.lr, net=net, aux_dtype=None
        ),
        "learned, Adam identity, factored v": functools.partial(
            LearnedOptimizer, lr=args.lr, net=LearnedRuleNet(), factored=True
        ),
        "learned, gate + pull-back, aux bfloat16, factored v": functools.partial(
            LearnedOptimizer, lr=args.lr, net=net, factored=True
        ),
    }
    print(
        f"Split-digits, domain-IL, 5 tasks, MLP, {args.steps} steps/task, lr {args.lr}, "
        f"seeds 0..{args.seeds - 1}; lambda {args.gate_lambda}, rho {0.01 * args.rho_raw}"
    )
    print("optimizer | ACC | BWT | mean diag R")
    print("---|---|---|---")
    for name, factory in variants.items():
        rows = []
        for seed in range(args.seeds):
            result = run_stream(model, factory, stream, steps=args.steps, seed=seed)
            rows.append((acc(result.R), bwt(result.R), float(result.R.diagonal().mean())))
        cells = []
        for values in zip(*rows, strict=True):
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.4f} ± {spread:.4f}")
        print(f"{name} | " + " | ".join(cells))


if __name__ == "__main__":
    main()
