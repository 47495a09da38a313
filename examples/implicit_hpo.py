"""Tutorial (f): tune an L2 penalty by gradient descent on the validation loss, with
implicit meta-gradients through an L-BFGS solver (``metaopt.meta.implicit_root``).

    python examples/implicit_hpo.py
    python examples/implicit_hpo.py --smoke
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from metaopt.continual.data import load_digits_tensors
from metaopt.meta import implicit_root


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=100)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--init-log-l2", type=float, default=-6.0)
    parser.add_argument("--smoke", action="store_true", help="tiny run for the tests")
    args = parser.parse_args(argv)
    iterations = 3 if args.smoke else args.iterations

    x, y = load_digits_tensors("train")
    x = x.flatten(1).double()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, val = order[: args.n_train], order[args.n_train :]

    def inner_loss(params, hyper):
        logits = x[train] @ params["w"] + params["b"]
        penalty = 0.5 * hyper["log_l2"].exp() * params["w"].pow(2).sum()
        return F.cross_entropy(logits, y[train]) + penalty

    @implicit_root(inner_loss, cg_iters=100)
    def solve(hyper):
        params = {
            "w": torch.zeros(64, 10, dtype=torch.float64, requires_grad=True),
            "b": torch.zeros(10, dtype=torch.float64, requires_grad=True),
        }
        lbfgs = torch.optim.LBFGS(
            list(params.values()), max_iter=500, tolerance_grad=1e-10,
            tolerance_change=1e-14, line_search_fn="strong_wolfe",
        )

        def closure():
            lbfgs.zero_grad()
            loss = inner_loss(params, hyper)
            loss.backward()
            return loss

        with torch.enable_grad():
            lbfgs.step(closure)
        return {k: v.detach() for k, v in params.items()}

    log_l2 = torch.tensor(args.init_log_l2, dtype=torch.float64, requires_grad=True)
    hyper_opt = torch.optim.Adam([log_l2], lr=0.5)
    history = []
    for _ in range(iterations):
        hyper_opt.zero_grad()
        params = solve({"log_l2": log_l2})
        loss = F.cross_entropy(x[val] @ params["w"] + params["b"], y[val])
        loss.backward()
        hyper_opt.step()
        history.append(loss.item())
        print(f"l2 {log_l2.exp().item():.2e}  validation loss {loss.item():.4f}")
    return {"first": history[0], "last": history[-1], "l2": log_l2.exp().item()}


if __name__ == "__main__":
    main()
