"""Cost of one optimizer step: LearnedOptimizer vs torch.optim.Adam (fused, foreach) and SGD,
optimizer-state bytes as a multiple of Adam's, and a cost replica of the reference method
(one attention token per 3x3 kernel of a 100 -> 100 conv layer).

Only ``optimizer.step()`` is timed (gradients are fixed random tensors), round-robin over
the optimizers within each repeat; the numbers are medians over repeats, measured in this
process. ``check/fused``: the learned optimizer's finite-gradient check alone (part of
every checked step) against fused Adam's whole step; ``book/fused``: a
``LearnedOptimizer(compile=True)`` step with its compiled call replaced by a no-op (the
finite check and the optimizer's Python around the call; nothing compiled) against fused
Adam's whole step::

    python benchmarks/step_cost.py --quick            # ~100k and 1M params, no replica
    python benchmarks/step_cost.py --repeats 5        # 100k, 1M, 10M and the replica
    python benchmarks/step_cost.py --compiled --sizes 1M 10M --reference-repeats 0
    python benchmarks/step_cost.py --compiled --cold-compile --models mlp --sizes 1M \
        --reference-repeats 0      # and the cold compile time
    python benchmarks/step_cost.py --device cuda --compiled   # on a GPU (synchronised clock)
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import multiprocessing
import re
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch
import torch._inductor.config
from torch import nn

from metaopt import LearnedOptimizer
from metaopt._machine import cpu_model
from metaopt.learned import LearnedRuleNet, learned_rule, load_pretrained
from metaopt.learned.features import layout_of
from metaopt.learned.fused import fused_learned_step_
from metaopt.optim import learned as learned_module

SIZES = {"100k": 100_000, "1M": 1_000_000, "10M": 10_000_000}


def mlp(target: int) -> nn.Module:
    """784 -> h -> h -> h -> 10 with ~``target`` parameters."""
    h = int((-(784 + 13) + math.sqrt((784 + 13) ** 2 + 8 * target)) / 4)
    return nn.Sequential(
        nn.Linear(784, h),
        nn.ReLU(),
        nn.Linear(h, h),
        nn.ReLU(),
        nn.Linear(h, h),
        nn.ReLU(),
        nn.Linear(h, 10),
    )


def cnn(target: int) -> nn.Module:
    """Four 3x3 convolutions with batchnorm, width c, and a linear head."""
    c = int(math.sqrt(target / 27))
    layers: list[nn.Module] = [nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
    for _ in range(3):
        layers += [nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10)]
    return nn.Sequential(*layers)


def transformer(target: int) -> nn.Module:
    """nn.TransformerEncoder, 4 layers, 4 heads, feed-forward 4d, with a token embedding."""
    d = max(8, int(math.sqrt(target / 4 / 12.6)) // 4 * 4)
    layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True)
    return nn.ModuleDict(
        {
            "embed": nn.Embedding(256, d),
            "encoder": nn.TransformerEncoder(layer, 4, enable_nested_tensor=False),
        }
    )


MODELS: dict[str, Callable[[int], nn.Module]] = {"mlp": mlp, "cnn": cnn, "transformer": transformer}


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(
        v.numel() * v.element_size()
        for state in opt.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor)
    )


def _after_boundary(opt: LearnedOptimizer) -> LearnedOptimizer:
    opt.step()
    opt.new_task()
    return opt


def _compiled_after_boundary(
    params: list[torch.Tensor], net: LearnedRuleNet, **options: object
) -> tuple[LearnedOptimizer, float]:
    """``LearnedOptimizer(compile=True)`` after a task boundary, and the seconds its two
    compilations took: the first step's graph and the graph after the boundary (where
    the importance terms switch on)."""
    start = time.perf_counter()
    opt = _after_boundary(LearnedOptimizer(params, lr=1e-3, net=net, compile=True, **options))
    opt.step()
    return opt, time.perf_counter() - start


def make_optimizers(
    params: list[torch.Tensor], compiled: bool = False, device: str = "cpu"
) -> tuple[dict[str, torch.optim.Optimizer], float | None]:
    """The baselines and the learned optimizer twice: in its first task ("learned 1st",
    where every importance is still zero and its terms are skipped) and after a task
    boundary ("learned 2nd+", the general case); with ``compiled``, also both with
    ``compile=True`` (the fused in-place step; compiled before timing) and the latter
    once more with ``check_finite=False`` ("unchecked": no finite-gradient check, which
    reads every gradient once more; torch.optim.Adam does not check).

    Returns:
        The optimizers, and with ``compiled`` the seconds the first compiled optimizer
        took to compile its two graphs (the others reuse them through Inductor's cache,
        unless it is off), else ``None``.
    """
    net = load_pretrained("default").to(device)
    opts: dict[str, torch.optim.Optimizer] = {
        "SGD": torch.optim.SGD(params, lr=1e-3),
        "Adam foreach": torch.optim.Adam(params, lr=1e-3, foreach=True),
        "Adam fused": torch.optim.Adam(params, lr=1e-3, fused=True),
        "learned 1st": LearnedOptimizer(params, lr=1e-3, net=net),
        "learned 2nd+": _after_boundary(LearnedOptimizer(params, lr=1e-3, net=net)),
    }
    if not compiled:
        return opts, None
    after, compile_seconds = _compiled_after_boundary(params, net)
    opts["learned 1st compiled"] = LearnedOptimizer(params, lr=1e-3, net=net, compile=True)
    opts["learned 2nd+ compiled"] = after
    opts["learned 2nd+ compiled unchecked"] = _compiled_after_boundary(
        params, net, check_finite=False
    )[0]
    return opts, compile_seconds


class FusedBookkeeping:
    """``LearnedOptimizer(compile=True)`` after a task boundary with its compiled call
    replaced by a no-op: what its step costs around that call (the finite check, state
    lookups, the cached token views and counter stacks), as something to ``step()`` and
    time. Nothing is compiled; the parameters do not move."""

    def __init__(self, params: list[torch.Tensor], net: LearnedRuleNet) -> None:
        no_op_step = functools.partial(fused_learned_step_, core=_no_op_core)
        with mock.patch.object(learned_module, "compiled_fused_step", lambda _: no_op_step):
            self.opt = _after_boundary(LearnedOptimizer(params, lr=1e-3, net=net, compile=True))
            self.opt.step()  # the step kept in the optimizer is the no-op one

    def step(self) -> None:
        self.opt.step()


def _no_op_core(
    views: object, v_dense: object, row_col: list[torch.Tensor | None], *args: object, **kw: object
) -> list[torch.Tensor | None]:
    """In place of :func:`metaopt.learned.fused.fused_core_`: nothing computed, every
    factored second moment (none in these models) kept."""
    return list(row_col)


class FiniteCheck:
    """The learned optimizer's finite-gradient check alone (``check_finite=True``, one
    more read of every gradient per step), as something to ``step()`` and time."""

    def __init__(self, opt: LearnedOptimizer) -> None:
        self.opt = opt
        self.plan = opt._gather()  # the parameters and their gradients, fixed here

    def step(self) -> None:
        self.opt._raise_if_nonfinite(self.plan)


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
"""``wall``: elapsed time; ``cpu``: this process's CPU time (steadier on a shared machine,
equal to the elapsed time of an undisturbed single-threaded run)."""


def cuda_wall_clock() -> float:
    """Elapsed seconds after waiting for every queued CUDA kernel (the clock of
    ``--device cuda``: a step returns before its kernels have run)."""
    torch.cuda.synchronize()
    return time.perf_counter()


def time_steps(
    opts: dict[str, torch.optim.Optimizer],
    steps: int,
    repeats: int,
    warmup: int,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Median seconds per ``step()`` for each optimizer, round-robin within repeats."""
    for opt in opts.values():
        for _ in range(warmup):
            opt.step()
    samples: dict[str, list[float]] = {name: [] for name in opts}
    for _ in range(repeats):
        for name, opt in opts.items():
            start = clock()
            for _ in range(steps):
                opt.step()
            samples[name].append((clock() - start) / steps)
    return {name: statistics.median(values) for name, values in samples.items()}


def bench_model(
    kind: str,
    size: str,
    steps: int,
    repeats: int,
    warmup: int,
    clock: Callable[[], float],
    compiled: bool = False,
    device: str = "cpu",
) -> dict[str, object]:
    torch.manual_seed(0)
    model = MODELS[kind](SIZES[size]).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-2
    opts, compile_seconds = make_optimizers(params, compiled, device)
    learned = opts["learned 2nd+"]
    timed = {
        **opts,
        "finite check": FiniteCheck(learned),
        "fused bookkeeping": FusedBookkeeping(params, learned.net),
    }
    times = time_steps(timed, steps, repeats, warmup, clock)
    tokens = sum(learned_tokens(p.numel(), p.shape[0] if p.ndim else 1) for p in params)
    return {
        "model": kind,
        "params": sum(p.numel() for p in params),
        "tensors": len(params),
        "tokens": tokens,
        **{f"{name} ms": 1e3 * t for name, t in times.items()},
        "1st/fused": times["learned 1st"] / times["Adam fused"],
        "2nd+/fused": times["learned 2nd+"] / times["Adam fused"],
        "2nd+/foreach": times["learned 2nd+"] / times["Adam foreach"],
        "check/fused": times["finite check"] / times["Adam fused"],
        "book/fused": times["fused bookkeeping"] / times["Adam fused"],
        **(
            {
                "compile s": compile_seconds,
                "1st compiled/fused": times["learned 1st compiled"] / times["Adam fused"],
                "2nd+ compiled/fused": times["learned 2nd+ compiled"] / times["Adam fused"],
                "2nd+ unchecked/fused": times["learned 2nd+ compiled unchecked"]
                / times["Adam fused"],
            }
            if compiled
            else {}
        ),
        "state/Adam": state_bytes(learned) / state_bytes(opts["Adam fused"]),
    }


def learned_tokens(numel: int, leading: int, max_block: int = 65536) -> int:
    return layout_of(numel, max_block, leading).total_tokens


class ReferenceReplica(nn.Module):
    """Cost replica of the reference network: one token per 3x3 kernel (9 weights + 1
    importance score), an embedding MLP to d_model 16, a 2-layer nn.TransformerEncoder
    (4 heads, feed-forward 64) with full attention over all kernel tokens, and a linear
    head to 9 deltas. Only its cost matters; it is not trained here. Its attention runs
    through this torch's fused ``scaled_dot_product_attention`` kernel, which does not
    materialise the 10,000 x 10,000 attention matrices as torch 1.13's encoder did."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 16))
        layer = nn.TransformerEncoderLayer(16, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 9)

    def forward(self, kernels: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
        tokens = torch.cat([kernels.reshape(-1, 9), importance.reshape(-1, 1)], dim=1)
        return self.head(self.encoder(self.embed(tokens)[None]))[0].reshape(kernels.shape)


def _peak_rss_gib(reset: bool = False) -> float:
    """This process's peak resident memory (GiB), from ``/proc/self/status`` (``VmHWM``,
    which ``reset`` sets back to the current size) where available, else ``getrusage``
    (which a spawned process inherits from its parent)."""
    status = Path("/proc/self/status")
    if not status.exists():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if reset:
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")
    match = re.search(r"VmHWM:\s+(\d+)\s+kB", status.read_text())
    return int(match.group(1)) / 2**20 if match else float("nan")


def _reference_case(
    case: str, repeats: int, threads: int, device: str = "cpu"
) -> tuple[float, float, float]:
    """Runs in a fresh process: median seconds per call of ``case`` on the reference's
    90,000-weight layer, and the memory before the calls and its peak during them (GiB):
    the process's resident memory on a CPU, CUDA's allocated memory on a GPU (after one
    untimed call there, which initialises the CUDA libraries)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    weight = nn.Conv2d(100, 100, 3, bias=False).to(device).weight
    weight.grad = torch.randn_like(weight) * 1e-2
    if case == "learned step":
        opt = LearnedOptimizer([weight], lr=1e-3, net=load_pretrained("default").to(device))
        fn: Callable[[], object] = opt.step
    elif case == "learned meta-gradient":
        net = load_pretrained("default").to(device)
        meta = {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters()}
        rule = learned_rule(net, 1e-3, meta_params=meta)
        params = {"w": weight.detach()}
        state = rule.init(params)

        def fn() -> None:
            updates, _ = rule.update({"w": weight.grad}, state, params)
            updates["w"].sum().backward()

    else:
        replica = ReferenceReplica().to(device)
        importance = torch.rand(weight.shape[0] * weight.shape[1], device=device)  # per kernel

        def fn() -> None:
            replica.zero_grad()
            replica(weight.detach(), importance).sum().backward()

    on_cuda = torch.device(device).type == "cuda"
    if on_cuda:
        fn()
        torch.cuda.reset_peak_memory_stats()
        clock, baseline = cuda_wall_clock, torch.cuda.memory_allocated() / 2**30
    else:
        clock, baseline = time.perf_counter, _peak_rss_gib(reset=True)
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if on_cuda else _peak_rss_gib()
    return statistics.median(times), baseline, peak


REFERENCE_CASES = {
    "learned step": "LearnedOptimizer.step()",
    "learned meta-gradient": "learned rule: update + backward to its net's parameters",
    "reference": "reference replica: forward + backward (10,000 kernel tokens)",
}


def bench_reference(repeats: int, threads: int, device: str = "cpu") -> list[dict[str, object]]:
    """Each case in a fresh process (spawn), so that peak memory is its own."""
    rows = []
    context = multiprocessing.get_context("spawn")
    memory = "CUDA GiB" if torch.device(device).type == "cuda" else "RSS GiB"
    for case, label in REFERENCE_CASES.items():
        n = repeats if case == "reference" else max(5, repeats)
        with context.Pool(1) as pool:
            seconds, before, peak = pool.apply(_reference_case, (case, n, threads, device))
        rows.append(
            {
                "what": label,
                "seconds per call": seconds,
                f"{memory} before": before,
                f"peak {memory} during": peak,
            }
        )
    return rows


def print_table(rows: list[dict[str, object]]) -> None:
    columns = list(rows[0])
    cells = [[_fmt(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print(" | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    print("-|-".join("-" * w for w in widths))
    for r in cells:
        print(" | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if value < 100 else f"{value:.0f}"
    return str(value)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--steps", type=int, default=5, help="steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--device",
        default="cpu",
        help="where the models, gradients and the rule's net live (cuda: the wall clock, "
        "synchronised before each reading)",
    )
    parser.add_argument(
        "--clock",
        choices=list(CLOCKS),
        default="wall",
        help="wall: elapsed time; cpu: process CPU time (shared machines)",
    )
    parser.add_argument(
        "--reference-repeats",
        type=int,
        default=1,
        help="timed calls of the reference replica (0: skip it)",
    )
    parser.add_argument(
        "--reference-only", action="store_true", help="only the reference-layer comparison"
    )
    parser.add_argument(
        "--compiled",
        action="store_true",
        help="also time LearnedOptimizer(compile=True), the fused in-place step "
        "(compiles each model first: slow)",
    )
    parser.add_argument(
        "--cold-compile",
        action="store_true",
        help="with --compiled: Inductor's on-disk caches off, so every compilation is "
        "cold (slower: each compiled optimizer compiles its own graphs)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="100k and 1M parameters, 3 repeats, no reference replica",
    )
    args = parser.parse_args(argv)
    if args.cold_compile:
        torch._inductor.config.force_disable_caches = True
    if args.quick:
        args.sizes = [s for s in args.sizes if s != "10M"]
        args.repeats, args.steps, args.reference_repeats = 3, 3, 0
    torch.set_num_threads(args.threads)
    on_cuda = torch.device(args.device).type == "cuda"
    if on_cuda and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here")
    clock = cuda_wall_clock if on_cuda else CLOCKS[args.clock]
    hardware = torch.cuda.get_device_name(args.device) if on_cuda else cpu_model()
    print(
        f"torch {torch.__version__}, {hardware}, {args.threads} thread(s), "
        f"{'synchronised wall' if on_cuda else args.clock} clock; "
        f"medians of {args.repeats} repeats x {args.steps} steps"
        + (
            f"; compile s: the first compiled optimizer's two graphs, Inductor caches "
            f"{'off' if args.cold_compile else 'on (cold only on a first run)'}"
            if args.compiled
            else ""
        )
    )
    if not args.reference_only:
        rows = []
        for size in args.sizes:
            for kind in args.models:
                row = bench_model(
                    kind,
                    size,
                    args.steps,
                    args.repeats,
                    args.warmup,
                    clock,
                    args.compiled,
                    args.device,
                )
                print(f"{size} {kind}: {json.dumps(row)}", flush=True)  # kept if cut short
                rows.append(row)
        print_table(rows)
    if args.reference_repeats > 0:
        print("\nThe reference method's layer: Conv2d(100, 100, 3), 90,000 weights, wall clock")
        print_table(bench_reference(args.reference_repeats, args.threads, args.device))


if __name__ == "__main__":
    main()
