"""One optimizer step captured in a CUDA graph and replayed, against the same step launched
as usual: LearnedOptimizer (eager, and ``compile=True``) and ``torch.optim.Adam(fused=True)``
(with ``capturable=True`` for its graph), on MLPs of ~1M and 10M parameters.

On a GPU the learned step is bound by kernel launches and Python, not by memory (412
kernels per step for 8 tensors, see docs/learned.md); a graph replays every kernel of
the step with one launch. Gradients are fixed random tensors, as in ``step_cost.py``;
each optimizer steps once, marks a task boundary and steps twice more (so the importance
terms are on) before it is captured, with ``check_finite=False`` (the finite check reads
a flag back to the host, which a graph cannot do). A captured step is first checked
against the uncaptured one: the same parameters after the same number of steps, up to
:data:`REPLAY_TOLERANCE` of their movement, or its graph is not timed (the eager learned
step makes new step-counter tensors at every step; a replay keeps reading the captured
ones, so it repeats the captured step). Times are
medians over repeats, round-robin, on a synchronised clock, all in this process::

    python benchmarks/cuda_graph_step.py --sizes 1M 10M --steps 50 --repeats 7
    python benchmarks/cuda_graph_step.py --learned compiled   # one kind per process
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from metaopt import LearnedOptimizer
from metaopt.learned import load_pretrained

sys.path.insert(0, str(Path(__file__).resolve().parent))  # step_cost.py, beside this script
from step_cost import SIZES, mlp

Factory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]


def _params(size: str, device: str) -> list[torch.Tensor]:
    """The MLP's parameters with fixed random gradients (seeded)."""
    torch.manual_seed(0)
    params = list(mlp(SIZES[size]).to(device).parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-2
    return params


def factories(learned_kinds: list[str], device: str) -> dict[str, Factory]:
    """Fused Adam (the baseline, always) and the learned optimizer of each kind
    (``eager``, ``compiled``)."""
    net = load_pretrained("default").to(device)

    def learned(compile: bool) -> Factory:
        return lambda ps: LearnedOptimizer(
            ps, lr=1e-3, net=net, check_finite=False, compile=compile
        )

    return {
        "Adam fused": lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True, capturable=True),
        **{f"learned {kind}": learned(kind == "compiled") for kind in learned_kinds},
    }


def warm_up(opt: torch.optim.Optimizer) -> None:
    """First step, a task boundary (learned only), two more steps: the general case."""
    opt.step()
    if isinstance(opt, LearnedOptimizer):
        opt.new_task()
    opt.step()
    opt.step()


class Captured:
    """``opt.step()`` captured once in a CUDA graph; ``step()`` replays it."""

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the default stream, as CUDA graphs ask
            warm_up(opt)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            opt.step()
        self.opt = opt

    def step(self) -> None:
        self.graph.replay()


class Launched:
    """``opt.step()`` as usual, after the same warm-up."""

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        warm_up(opt)
        self.opt = opt

    def step(self) -> None:
        self.opt.step()


REPLAY_TOLERANCE = 1e-6
"""Largest difference between a replayed and a launched step's parameters, as a fraction
of how far the launched steps moved them, for the graph to be timed: a replay reads the
tensors it was captured with, so a step that makes new state tensors (the eager learned
step's counters) replays the captured step again, not the next one."""


def max_difference(launched: Launched, captured: Captured, steps: int) -> tuple[float, float]:
    """Largest |difference| of any parameter after ``steps`` more steps of each (both
    started from the same parameters and took the same warm-up steps; the capture itself
    runs nothing), and the largest |movement| of the launched parameters in those steps."""
    before = [p.detach().clone() for p in _params_of(launched.opt)]
    for _ in range(steps):
        launched.step()
        captured.step()
    torch.cuda.synchronize()
    pairs = zip(_params_of(launched.opt), _params_of(captured.opt), strict=True)
    difference = max((a - b).abs().max().item() for a, b in pairs)
    after = _params_of(launched.opt)
    moved = max((a - b).abs().max().item() for a, b in zip(after, before, strict=True))
    return difference, moved


def _params_of(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in opt.param_groups for p in group["params"]]


def time_runners(
    runners: dict[str, Launched | Captured], steps: int, repeats: int
) -> dict[str, float]:
    """Median seconds per step of each runner, round-robin within repeats."""
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, runner in runners.items():
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(steps):
                runner.step()
            torch.cuda.synchronize()
            samples[name].append((time.perf_counter() - start) / steps)
    return {name: statistics.median(v) for name, v in samples.items()}


def bench(
    size: str, steps: int, repeats: int, learned_kinds: list[str], device: str = "cuda"
) -> None:
    """Builds, checks and times every optimizer both ways; one that cannot be built or
    captured is reported with its error and left out."""
    runners: dict[str, Launched | Captured] = {}
    for name, make in factories(learned_kinds, device).items():
        built: dict[str, Launched | Captured] = {}
        for wrap, how in ((Launched, "launched"), (Captured, "graph")):
            label, start = f"{name}, {how}", time.perf_counter()
            try:
                built[how] = wrap(make(_params(size, device)))
            except Exception:  # a step that cannot be captured: say why, go on
                print(f"  {label}: failed\n{traceback.format_exc(limit=-4)}")
            else:
                print(f"  {label}: ready in {time.perf_counter() - start:.1f} s", flush=True)
        if len(built) == 2:
            diff, moved = max_difference(built["launched"], built["graph"], 5)
            print(f"  {name}: max |replayed - launched| after 5 more steps {diff:.2e} "
                  f"(moved {moved:.2e})")
            if diff > REPLAY_TOLERANCE * moved:
                print(f"  {name}, graph: replays another step than the launched one "
                      "(it makes new state tensors that a graph cannot follow): not timed")
                del built["graph"]
        runners.update({f"{name}, {how}": runner for how, runner in built.items()})
    times = time_runners(runners, steps, repeats)
    base = times.get("Adam fused, launched")
    for label, seconds in times.items():
        ratio = f"  x{seconds / base:.2f} of fused Adam" if base else ""
        print(f"  {label:32s} {1e3 * seconds:8.3f} ms/step{ratio}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["1M", "10M"], choices=list(SIZES))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--learned",
        nargs="+",
        default=["eager", "compiled"],
        choices=["eager", "compiled"],
        help="which learned optimizers (fused Adam is always timed beside them); one per "
        "process keeps a failed capture from affecting the others",
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, "
          f"{args.steps} steps x {args.repeats} repeats (medians)", flush=True)
    for size in args.sizes:
        print(f"mlp {size}:", flush=True)
        bench(size, args.steps, args.repeats, args.learned)


if __name__ == "__main__":
    main()
