"""Where an optimizer step's time goes: operator calls (and, on a GPU, kernel launches) per
``step()`` of LearnedOptimizer (eager and compiled) against torch.optim.Adam (fused), from
``torch.profiler``, with the most frequent operators of the learned step. On a GPU a step
that launches hundreds of small kernels is bound by launch overhead, not memory::

    python benchmarks/step_profile.py                      # CPU, 1M-parameter MLP
    python benchmarks/step_profile.py --device cuda --compiled
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from metaopt import LearnedOptimizer
from metaopt.learned import load_pretrained

sys.path.insert(0, str(Path(__file__).resolve().parent))  # step_cost.py, beside this script
from step_cost import SIZES, mlp


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def profile_steps(
    opt: torch.optim.Optimizer, steps: int, device: torch.device
) -> tuple[float, int, int, int, collections.Counter[str]]:
    """Seconds per step (profiled, so slower than unprofiled), the step's own ATen calls
    (those not inside another ATen operator), all ATen calls (nested ones included) and
    device kernels per step (memory copies and sets included), and the operator-call
    counts of the profiled steps (nested included)."""
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    for _ in range(2):
        opt.step()
    _synchronize(device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            opt.step()
        _synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    ops: collections.Counter[str] = collections.Counter()
    outermost = kernels = 0
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels += 1
        elif event.name.startswith("aten::"):
            ops[event.name] += 1
            outermost += not _inside_aten_call(event)
    return seconds, outermost // steps, sum(ops.values()) // steps, kernels // steps, ops


def _inside_aten_call(event: Any) -> bool:
    """Whether a profiler event runs inside another ATen operator (``aten::add_`` inside
    ``aten::_foreach_add_``), so that it is not one of the step's own calls."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", choices=list(SIZES), default="1M")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--compiled", action="store_true", help="also compile=True")
    parser.add_argument("--top", type=int, default=12, help="operators listed")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    params = list(mlp(SIZES[args.size]).to(device).parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-2
    net = load_pretrained("default").to(device)
    opts: dict[str, torch.optim.Optimizer] = {
        "Adam fused": torch.optim.Adam(params, lr=1e-3, fused=True),
        "learned": LearnedOptimizer(params, lr=1e-3, net=net),
    }
    if args.compiled:
        opts["learned compiled"] = LearnedOptimizer(params, lr=1e-3, net=net, compile=True)
    for opt in opts.values():
        if isinstance(opt, LearnedOptimizer):
            opt.step()
            opt.new_task()  # the general case: importance terms on
    print(f"torch {torch.__version__}, {args.device}, MLP {sum(p.numel() for p in params)} "
          f"parameters in {len(params)} tensors; {args.steps} profiled steps")
    results = {name: profile_steps(opt, args.steps, device) for name, opt in opts.items()}
    _, base_calls, base_ops, base_kernels, _ = results["Adam fused"]
    for name, (seconds, calls, ops, kernels, _) in results.items():
        print(f"{name:<17} {1e3 * seconds:8.3f} ms/step (profiled)  {calls:5d} ATen calls/step "
              f"(x{calls / max(base_calls, 1):.0f}; {ops} with the calls inside them, "
              f"x{ops / max(base_ops, 1):.0f})  {kernels:5d} kernels/step "
              f"(x{kernels / max(base_kernels, 1):.0f} of fused Adam)")
    for name in opts:
        if name != "Adam fused":
            counts = results[name][4]
            print(f"\nmost frequent operators, {name} (calls per step):")
            for op, n in counts.most_common(args.top):
                print(f"  {op:<40} {n / args.steps:6.1f}")


if __name__ == "__main__":
    main()
