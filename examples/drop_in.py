"""Tutorial (a): replace torch.optim.Adam with metaopt.LearnedOptimizer in a training loop.

    python examples/drop_in.py              # digits, 10 epochs, cosine LR schedule
    python examples/drop_in.py --smoke      # a few seconds
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import metaopt


def load_data(seed: int) -> tuple[torch.Tensor, ...]:
    """Shuffled digits: ``x_train [1400, 64], y_train [1400], x_test [397, 64], y_test``."""
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    return x[:1400], y[:1400], x[1400:], y[1400:]


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))


def train(model, optimizer, data, epochs: int, seed: int) -> float:
    """Train with a per-epoch cosine schedule; returns the test accuracy in [0, 1]."""
    x_train, y_train, x_test, y_test = data
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(y_train), generator=gen).split(32):
            optimizer.zero_grad()
            F.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
            optimizer.step()
        scheduler.step()
    with torch.no_grad():
        return (model(x_test).argmax(1) == y_test).float().mean().item()


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny run for the tests")
    args = parser.parse_args(argv)
    epochs = 2 if args.smoke else args.epochs
    data = load_data(args.seed)

    results = {}
    model = make_model(args.seed)
    results["adam"] = train(
        model, torch.optim.Adam(model.parameters(), lr=args.lr), data, epochs, args.seed
    )
    model = make_model(args.seed)
    opt = metaopt.LearnedOptimizer.from_pretrained("default", model.parameters(), lr=args.lr)
    results["learned"] = train(model, opt, data, epochs, args.seed)
    for name, acc in results.items():
        print(f"{name:8s} test accuracy {acc:.3f}")
    return results


if __name__ == "__main__":
    main()
