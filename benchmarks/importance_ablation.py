"""Where the learned rule's plasticity goes: the shipped rule on continual streams with its
accumulated importance changed at every task boundary (a diagnostic, not a feature).

At a boundary the rule adds the finished task's importance score to the importance it
holds (:func:`metaopt.learned.fold_task`); the gate ``1 / (1 + lambda * importance)`` and
the pull-back to the anchor read it in the next tasks. The variants change what is held
before the new score is added, all else equal (same streams, seeds, batches)::

    accumulated  as shipped: old + new
    halved       0.5 * old + new
    last         new only (the last finished task's score)
    none         0 (no gate, no pull-back: the rule's other coefficients only)

Prints, per stream x model and variant, validation and test ACC and the learning accuracy
of every task (the diagonal of R: how well each task was learned when it was trained)::

    METAOPT_DATA_DIR=../shared/data python benchmarks/importance_ablation.py \\
        --streams split-mnist-domain permuted-mnist --models mlp --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
from collections.abc import Callable, Iterator
from unittest import mock

import torch

import metaopt.learned.rule
import metaopt.learned.tasks
import metaopt.optim.learned
from metaopt.continual.suite import run_suite, suite_from_preset
from metaopt.learned.state import LearnedState

VARIANTS: dict[str, float | None] = {"accumulated": 1.0, "halved": 0.5, "last": 0.0, "none": None}
"""Factor applied to the held importance before the finished task's score is added
(``None``: the importance is zero after every boundary)."""

_FOLD_SITES = (metaopt.learned.tasks, metaopt.learned.rule, metaopt.optim.learned)
"""The modules that call ``fold_task`` by name (patched together)."""


def varied_fold(factor: float | None) -> Callable[..., LearnedState]:
    """``fold_task`` with the held importance scaled by ``factor`` first, or (``None``)
    with the importance zero afterwards."""
    fold = metaopt.learned.tasks.fold_task

    def folded(leaf: LearnedState, param: torch.Tensor, importance: str = "path"):
        if factor is None:
            out = fold(leaf, param, importance)
            return out._replace(importance=torch.zeros_like(out.importance))
        held = (leaf.importance.float() * factor).to(leaf.importance.dtype)
        return fold(leaf._replace(importance=held), param, importance)

    return folded


@contextlib.contextmanager
def variant(name: str) -> Iterator[None]:
    """Run the learned optimizer with variant ``name`` of :data:`VARIANTS`."""
    fold = varied_fold(VARIANTS[name])
    with contextlib.ExitStack() as stack:
        for module in _FOLD_SITES:
            stack.enter_context(mock.patch.object(module, "fold_task", fold))
        yield


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", default="paper", help="budget preset of metaopt bench")
    parser.add_argument("--streams", nargs="+", default=["split-mnist-domain", "permuted-mnist"])
    parser.add_argument("--models", nargs="+", default=["mlp"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--data-dir", default=None, help="default: $METAOPT_DATA_DIR")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    suite = suite_from_preset(
        args.suite,
        streams=args.streams,
        models=args.models,
        optimizers=["learned"],
        seeds=args.seeds,
    )
    print(f"shipped learned rule, {args.suite} budget, seeds {args.seeds}; ACC and LA in %")
    for name in args.variants:
        with variant(name):
            rows = list(run_suite(suite, args.data_dir))
        for stream in args.streams:
            for model in args.models:
                mine = [r for r in rows if r["stream"] == stream and r["model"] == model]
                diagonal = [
                    statistics.mean(100 * r["R"][t][t] for r in mine)
                    for t in range(len(mine[0]["R"]))
                ]
                print(
                    f"{stream:<20} {model:<12} {name:<12} "
                    f"val ACC {statistics.mean(100 * r['val']['acc'] for r in mine):5.1f}  "
                    f"test ACC {statistics.mean(100 * r['test']['acc'] for r in mine):5.1f}  "
                    f"LA {statistics.mean(100 * r['test']['learning_acc'] for r in mine):5.1f}  "
                    f"per task {' '.join(f'{d:.0f}' for d in diagonal)}"
                )


if __name__ == "__main__":
    main()
