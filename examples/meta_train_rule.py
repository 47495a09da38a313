"""Tutorial (d): write a small learned update rule and meta-train it on digits tasks.

The rule: momentum plus a per-element MLP on (gradient, momentum), both normalised by
the tensor's gradient RMS; its output layer starts at zero, so the untrained rule is
normalised SGD with momentum. Meta-training follows the gradient of the held-out loss
after 12 inner steps (``metaopt.meta.Unrolled``) with respect to the rule's parameters.

    python examples/meta_train_rule.py              # 200 meta-steps, a few minutes
    python examples/meta_train_rule.py --smoke
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import metaopt
from metaopt import rules
from metaopt.continual.data import load_digits_tensors
from metaopt.meta import SupervisedProblem, Unrolled


def init_meta_params(hidden: int = 8) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "log_lr": torch.tensor(-5.0),
        "logit_beta": torch.tensor(2.0),
        "w1": torch.randn(2, hidden, generator=gen) * 0.5,
        "b1": torch.zeros(hidden),
        "w2": torch.zeros(hidden, 1),
    }


def my_rule(mp: dict[str, torch.Tensor]) -> rules.UpdateRule:
    """The learned rule built from meta-parameters ``mp`` (differentiable in them)."""
    lr, beta = mp["log_lr"].exp(), torch.sigmoid(mp["logit_beta"])

    def update_leaf(g, m, p):
        m = beta * m + (1 - beta) * g
        rms = (g.pow(2).mean() + 1e-12).sqrt()
        features = torch.stack([g / rms, m / rms], dim=-1)
        correction = torch.tanh(features @ mp["w1"] + mp["b1"]) @ mp["w2"]
        return -lr * (features.sum(-1) + correction.squeeze(-1)), m

    return rules.per_leaf(torch.zeros_like, update_leaf, name="my_rule")


def mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))


def sample_problem(gen: torch.Generator, x, y, steps: int = 12) -> SupervisedProblem:
    """A fresh MLP, ``steps`` minibatches of 32 and 200 held-out images from ``(x, y)``."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (), generator=gen)))
    idx = torch.randperm(len(y), generator=gen)
    batches = [(x[i], y[i]) for i in idx[: 32 * steps].split(32)]
    return SupervisedProblem(mlp(), batches, (x[idx[-200:]], y[idx[-200:]]))


def validate(mp, x, y, n: int) -> float:
    gen = torch.Generator().manual_seed(999)
    return sum(Unrolled(my_rule)(mp, sample_problem(gen, x, y)).loss.item() for _ in range(n)) / n


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meta-steps", type=int, default=200)
    parser.add_argument("--meta-lr", type=float, default=5e-2)
    parser.add_argument("--val-tasks", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny run for the tests")
    args = parser.parse_args(argv)
    meta_steps, val_tasks = (10, 4) if args.smoke else (args.meta_steps, args.val_tasks)

    x, y = load_digits_tensors("train")        # training images only
    x = x.flatten(1)
    train_pool, val_pool = (x[:1000], y[:1000]), (x[1000:], y[1000:])
    meta_params = init_meta_params()
    meta_opt = torch.optim.Adam(list(meta_params.values()), lr=args.meta_lr)
    estimator = Unrolled(my_rule)

    before = validate(meta_params, *val_pool, val_tasks)
    gen = torch.Generator().manual_seed(args.seed)
    for _ in range(meta_steps):
        result = estimator(meta_params, sample_problem(gen, *train_pool))
        for name, p in meta_params.items():
            p.grad = result.grads[name]
        torch.nn.utils.clip_grad_norm_(list(meta_params.values()), 1.0)
        meta_opt.step()
    after = validate(meta_params, *val_pool, val_tasks)
    print(f"validation meta-loss {before:.3f} -> {after:.3f} after {meta_steps} meta-steps")

    # the trained rule as a torch.optim optimizer, on the digits test split
    trained = {k: v.detach() for k, v in meta_params.items()}
    xt, yt = load_digits_tensors("test")
    torch.manual_seed(args.seed)
    model = mlp()
    opt = metaopt.FunctionalOptimizer(model.parameters(), my_rule(trained))
    for epoch in range(3):
        for i in torch.randperm(len(y), generator=torch.Generator().manual_seed(epoch)).split(32):
            opt.zero_grad()
            F.cross_entropy(model(x[i]), y[i]).backward()
            opt.step()
    with torch.no_grad():
        test_acc = (model(xt.flatten(1)).argmax(1) == yt).float().mean().item()
    print(f"test accuracy of an MLP trained with the meta-trained rule: {test_acc:.3f}")
    return {"before": before, "after": after, "test_acc": test_acc}


if __name__ == "__main__":
    main()
