"""An Avalanche-style continual-learning loop: the framework edits the optimizer between
experiences, and the learned optimizer keeps working.

Avalanche's strategies call ``reset_optimizer`` before each experience (empty
``optimizer.state`` and put the model's current parameters into ``param_groups[0]``), or,
in recent versions, ``update_optimizer`` (keep the state of parameters that still exist,
add new ones such as a new task head). This script does the same in plain PyTorch (no
Avalanche dependency) on Split-digits, task-incremental, with a multi-head model that
grows a head per experience, and calls ``new_task()`` where an Avalanche plugin would
(``before_training_exp``).

    python examples/avalanche_style.py --mode reset      # state emptied each experience
    python examples/avalanche_style.py --mode update     # state kept, new head added
    python examples/avalanche_style.py --smoke
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
import torch.nn.functional as F

import metaopt
from metaopt.continual import data, streams


class MultiHeadMLP(torch.nn.Module):
    """A shared body and one linear head per task, added when a task is first seen
    (like Avalanche's ``MultiHeadClassifier``)."""

    def __init__(self, n_inputs: int, hidden: int = 128) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(n_inputs, hidden), torch.nn.ReLU())
        self.heads = torch.nn.ModuleDict()
        self.hidden = hidden

    def adapt(self, task_id: int, n_classes: int) -> None:
        if str(task_id) not in self.heads:
            self.heads[str(task_id)] = torch.nn.Linear(self.hidden, n_classes)

    def forward(self, x: torch.Tensor, task_id: int) -> torch.Tensor:
        return self.heads[str(task_id)](self.body(x.flatten(1)))


def reset_optimizer(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> None:
    """What ``avalanche.training.utils.reset_optimizer`` does."""
    optimizer.state = defaultdict(dict)
    optimizer.param_groups[0]["params"] = list(model.parameters())


def update_optimizer(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> None:
    """Keep the state of parameters still in the model, drop the others, add new ones."""
    current = list(model.parameters())
    alive = {id(p) for p in current}
    for p in [p for p in optimizer.state if id(p) not in alive]:
        del optimizer.state[p]
    optimizer.param_groups[0]["params"] = current


def accuracy(model: MultiHeadMLP, task: streams.Task) -> float:
    with torch.no_grad():
        return (model(task.x_test, task.task_id).argmax(1) == task.y_test).float().mean().item()


def run(make_optimizer, stream, mode: str, epochs: int, seed: int) -> torch.Tensor:
    """Train on the experiences in order; returns R [T, T] (accuracy on j after i)."""
    torch.manual_seed(seed)
    model = MultiHeadMLP(stream[0].x_train[0].numel())
    model.adapt(0, stream[0].n_classes)
    optimizer = make_optimizer(model.parameters())
    R = torch.zeros(len(stream), len(stream))
    for i, task in enumerate(stream):
        model.adapt(task.task_id, task.n_classes)                # model adaptation
        (reset_optimizer if mode == "reset" else update_optimizer)(optimizer, model)
        if i > 0 and hasattr(optimizer, "new_task"):             # a plugin's before_training_exp
            optimizer.new_task()
        gen = torch.Generator().manual_seed(seed + i)
        for _ in range(epochs):
            for idx in torch.randperm(len(task.y_train), generator=gen).split(32):
                optimizer.zero_grad()
                logits = model(task.x_train[idx], task.task_id)
                F.cross_entropy(logits, task.y_train[idx]).backward()
                optimizer.step()
        R[i] = torch.tensor([accuracy(model, t) if j <= i else 0.0 for j, t in enumerate(stream)])
    return R


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("reset", "update"), default="reset")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny run for the tests")
    args = parser.parse_args(argv)
    epochs = 2 if args.smoke else args.epochs

    x, y = data.load_digits_tensors("train")
    xt, yt = data.load_digits_tensors("test")
    stream = streams.split_stream(x, y, xt, yt, n_tasks=5, scenario="task", seed=args.seed)
    optimizers = {
        "adam": lambda params: torch.optim.Adam(params, lr=args.lr),
        "learned": lambda params: metaopt.LearnedOptimizer.from_pretrained(
            "default", params, lr=args.lr
        ),
    }
    final = {}
    for name, make in optimizers.items():
        R = run(make, stream, args.mode, epochs, args.seed)
        final[name] = R[-1].mean().item()
        just_trained = R.diagonal().mean().item()
        print(
            f"{name:8s} mode={args.mode}: final mean accuracy {final[name]:.3f}, "
            f"accuracy right after each experience {just_trained:.3f}"
        )
    return final


if __name__ == "__main__":
    main()
