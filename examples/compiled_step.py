"""Tutorial (e): a torch.compile'd training step (forward + gradient + update as one graph).

Trains an MLP on digits with a compiled ``metaopt.rules.adam`` step, checks it against
the same step run eagerly, and prints the median time per step of both.

    python examples/compiled_step.py
    python examples/compiled_step.py --smoke
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import metaopt
from metaopt.compile import make_step, tensor_hyper
from metaopt.continual.data import load_digits_tensors


def run(step, init, model, batches, epochs: int) -> tuple[dict, list[float], list[float]]:
    """Train from the module's weights (``init(model)``); returns the final params, the
    losses and the step times (s)."""
    params, buffers, opt_state = init(model)
    losses, times = [], []
    for _ in range(epochs):
        for batch in batches:
            start = time.perf_counter()
            params, buffers, opt_state, metrics = step(params, buffers, opt_state, batch)
            losses.append(metrics["loss"].item())      # .item() waits for the step
            times.append(time.perf_counter() - start)
    return params, losses, times


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--smoke", action="store_true", help="tiny run for the tests")
    args = parser.parse_args(argv)
    epochs, hidden = (1, 32) if args.smoke else (args.epochs, args.hidden)

    x, y = load_digits_tensors("train")
    x = x.flatten(1)
    n = len(y) // args.batch_size * args.batch_size         # equal batch shapes
    bs = args.batch_size
    batches = [(x[i : i + bs], y[i : i + bs]) for i in range(0, n, bs)]
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10)
    )
    rule, _ = tensor_hyper(metaopt.rules.adam, lr=1e-2)
    step = make_step(model, F.cross_entropy, rule)

    start = time.perf_counter()
    step(*step.init(model), batches[0])                       # compiles
    compile_s = time.perf_counter() - start
    compiled, losses, compiled_times = run(step, step.init, model, batches, epochs)
    eager, eager_losses, eager_times = run(step.eager, step.init, model, batches, epochs)
    max_diff = max((compiled[k] - eager[k]).abs().max().item() for k in compiled)
    result = {
        "compile_s": compile_s,
        "compiled_ms": 1e3 * statistics.median(compiled_times),
        "eager_ms": 1e3 * statistics.median(eager_times),
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "eager_last_loss": eager_losses[-1],
        "max_param_diff": max_diff,
    }
    ratio = result["compiled_ms"] / result["eager_ms"]
    print(
        f"compile {compile_s:.1f} s; median step {result['compiled_ms']:.2f} ms compiled vs "
        f"{result['eager_ms']:.2f} ms eager (ratio {ratio:.2f}); loss {losses[0]:.3f} -> "
        f"{losses[-1]:.3f} (eager {eager_losses[-1]:.3f}); max |compiled - eager| {max_diff:.1e}"
    )
    return result


if __name__ == "__main__":
    main()
