"""Speed of one training step: torch.optim.Adam vs metaopt's FunctionalOptimizer and pure
functional step, eager and compiled; and the compile/run time of the compiled unrolled
meta-gradient step.

Every number is measured in this process; ratios are medians over repeats.

    python benchmarks/compiled_step.py --quick          # small models, a few minutes on CPU
    python benchmarks/compiled_step.py --device cuda    # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch._inductor.config
import torch.nn.functional as F
from torch import nn
from torch.func import grad

import metaopt
from metaopt._machine import cpu_model
from metaopt.compile import loss_and_buffers, make_meta_step, make_step, tensor_hyper


class PatchTransformer(nn.Module):
    """ViT-style classifier: 7x7 patches of a 28x28 image, encoder layers, mean pool."""

    def __init__(self, d_model: int, layers: int, n_out: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(49, d_model)
        self.pos = nn.Parameter(torch.zeros(16, d_model))
        layer = nn.TransformerEncoderLayer(
            d_model, 4, dim_feedforward=2 * d_model, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = x.unfold(2, 7, 7).unfold(3, 7, 7).reshape(x.shape[0], 16, 49)
        return self.head(self.encoder(self.embed(patches) + self.pos).mean(dim=1))


def build(kind: str, quick: bool) -> nn.Module:
    width = 64 if quick else 256
    if kind == "mlp":
        return nn.Sequential(
            nn.Flatten(), nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
            nn.Linear(width, 10),
        )
    if kind == "cnn":
        c = 8 if quick else 32
        return nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c, 2 * c, 3, padding=1, bias=False), nn.BatchNorm2d(2 * c), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * c, 10),
        )
    if kind == "transformer":
        return PatchTransformer(32 if quick else 64, 1 if quick else 2)
    raise ValueError(kind)


def median_time(fn: Callable[[], None], steps: int, repeats: int) -> float:
    """Median over ``repeats`` of the mean seconds per call over ``steps`` calls."""
    return median_times({"fn": fn}, steps, repeats)["fn"]


def median_times(
    fns: dict[str, Callable[[], None]], steps: int, repeats: int
) -> dict[str, float]:
    """:func:`median_time` of several functions, timed round-robin within each repeat (a
    noisy machine then slows them alike instead of skewing their ratio)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(steps):
                fn()
            sync()
            times[name].append((time.perf_counter() - start) / steps)
    return {name: statistics.median(t) for name, t in times.items()}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench_model(kind: str, args: argparse.Namespace) -> dict[str, float]:
    """Seconds per step of each method (and the compile time) for one model."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    batch = (
        torch.rand(args.batch, 1, 28, 28, device=device),
        torch.randint(0, 10, (args.batch,), device=device),
    )
    results: dict[str, float] = {}
    fns: dict[str, Callable[[], None]] = {}
    for name, kwargs in (
        ("torch Adam for-loop", {"foreach": False}),
        ("torch Adam foreach", {"foreach": True}),
        ("torch Adam fused", {"fused": True}),
    ):
        model = build(kind, args.quick).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, **kwargs)

        def torch_step(model=model, opt=opt) -> None:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(batch[0]), batch[1]).backward()
            opt.step()

        for _ in range(args.warmup):
            torch_step()
        fns[name] = torch_step

    for name, compile in (("FunctionalOptimizer", False), ("FunctionalOptimizer compiled", True)):
        model = build(kind, args.quick).to(device)
        opt = metaopt.FunctionalOptimizer(
            model.parameters(), metaopt.rules.adam, lr=1e-3, compile=compile
        )

        def stateful_step(model=model, opt=opt) -> None:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(batch[0]), batch[1]).backward()
            opt.step()

        for _ in range(args.warmup):
            stateful_step()
        fns[name] = stateful_step

    model = build(kind, args.quick).to(device)
    rule, _ = tensor_hyper(metaopt.rules.adam, lr=1e-3)
    for name, compile, donate in (
        ("functional eager", False, False),
        ("functional compiled", True, False),
        ("functional compiled donated", True, True),
    ):
        step = make_step(model, F.cross_entropy, rule, compile=compile, donate=donate)
        carry = list(step.init(model))
        if donate:  # written in place: not the module's own tensors
            carry[:3] = torch.utils._pytree.tree_map(torch.clone, carry[:3])
        start = time.perf_counter()
        carry[:3] = step(*carry, batch)[:3]
        sync()
        if compile and not donate:
            results["compile time (s)"] = time.perf_counter() - start

        def functional_step(step=step, carry=carry) -> None:
            carry[:3] = step(*carry, batch)[:3]

        for _ in range(args.warmup):
            functional_step()
        fns[name] = functional_step
    results.update(median_times(fns, args.steps, args.repeats))  # all round-robin
    return results


def bench_meta(args: argparse.Namespace) -> dict[str, float]:
    """Compile and run time of the unrolled meta-gradient step (MLP, Adam's lr and beta1)."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10)).to(device)
    params = {k: v.detach() for k, v in model.named_parameters()}
    k_steps = args.meta_k
    data = [
        (torch.randn(32, 64, device=device), torch.randint(0, 10, (32,), device=device))
        for _ in range(k_steps + 1)
    ]
    train, val = data[:-1], data[-1]
    meta = {"lr": torch.tensor(1e-2, device=device), "b1": torch.tensor(0.9, device=device)}

    def factory(m):
        return metaopt.rules.adam(lr=m["lr"], betas=(m["b1"], 0.999), eps_root=1e-8)

    state = factory(meta).init(params)

    def unrolled_loss(m):
        p, s = params, factory(m).init(params)
        for b in train:
            g = grad(lambda q, b=b: loss_and_buffers(model, F.cross_entropy, q, {}, b)[0])(p)
            u, s = factory(m).update(g, s, p)
            p = metaopt.apply_updates(p, u)
        return loss_and_buffers(model, F.cross_entropy, p, {}, val)[0]

    results: dict[str, float] = {}
    unrolled = grad(unrolled_loss)
    unrolled(meta)
    results["eager full unroll (torch.func.grad)"] = median_time(
        lambda: unrolled(meta), 1, args.repeats
    )
    for name, compile, remat in (
        ("per-step vjp eager", False, True),
        ("per-step vjp compiled", True, True),
        ("compiled steps under autograd", True, False),
    ):
        meta_step = make_meta_step(model, F.cross_entropy, factory, compile=compile, remat=remat)
        start = time.perf_counter()
        meta_step(meta, params, {}, state, train, val)
        sync()
        if compile:
            key = "compile time (s)" if remat else "remat=False compile time (s)"
            results[key] = time.perf_counter() - start
        results[name] = median_time(
            lambda ms=meta_step: ms(meta, params, {}, state, train, val), 1, args.repeats
        )
    if args.full_unroll_compile:
        compiled_unroll = torch.compile(unrolled, fullgraph=True)
        start = time.perf_counter()
        compiled_unroll(meta)
        sync()
        results["full unroll compile time (s)"] = time.perf_counter() - start
        results["full unroll compiled"] = median_time(
            lambda: compiled_unroll(meta), 1, args.repeats
        )
    return results


LEARNED_META_OPTIONS = {
    "default": None,
    "unbatched": None,
    "no SIMD": {"cpp.vec_isa_ok": False, "size_asserts": False},
}
"""Inductor ``options`` of the learned-rule meta step variants (``None``: metaopt's)."""

LEARNED_META_ENVIRONMENT = {"unbatched": {"METAOPT_BATCH_CPP_KERNELS": "0"}}
"""Environment of a variant's process beyond this one's: "unbatched" builds every C++
kernel in a library of its own, as Inductor does without metaopt's kernel batching."""


def probe_cpu_isa(device: str) -> float:
    """Seconds Inductor takes to find which SIMD instruction sets this CPU runs (it
    compiles and loads a test library per candidate, once per process, and with its
    caches off also recompiles them); done before any timed compilation so that the
    compile times below do not include it. 0 on other devices."""
    if torch.device(device).type != "cpu":
        return 0.0
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    start = time.perf_counter()
    pick_vec_isa()
    return time.perf_counter() - start


def bench_learned_meta(variant: str, args: argparse.Namespace) -> dict[str, float]:
    """Cold compile time and run time of the learned rule's compiled meta step
    (``remat=False``, MLP 64-64-10, K = 3 inner steps, meta-gradient w.r.t. every
    LearnedRuleNet parameter) with the Inductor options of ``variant``; and the eager
    meta step's run time, timed round-robin with it."""
    from metaopt.learned import LearnedRuleNet, learned_rule

    device = torch.device(args.device)
    torch.manual_seed(0)
    net = LearnedRuleNet().to(device)
    with torch.no_grad():  # away from the Adam identity, so every coefficient is used
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10)).to(device)
    params = {k: v.detach() for k, v in model.named_parameters()}
    data = [
        (torch.randn(32, 64, device=device), torch.randint(0, 10, (32,), device=device))
        for _ in range(4)
    ]
    meta = {k: v.detach() for k, v in net.named_parameters()}

    def factory(m):
        return learned_rule(net, lr=1e-2, meta_params=m)

    state = factory(meta).init(params)
    options = LEARNED_META_OPTIONS[variant]
    compiled = make_meta_step(
        model, F.cross_entropy, factory, remat=False, **({"options": options} if options else {})
    )
    eager = make_meta_step(model, F.cross_entropy, factory, compile=False, remat=False)
    start = time.perf_counter()
    compiled(meta, params, {}, state, data[:3], data[3])
    sync()
    results = {"compile time (s)": time.perf_counter() - start}
    results.update(median_times(
        {
            "compiled": lambda: compiled(meta, params, {}, state, data[:3], data[3]),
            "eager": lambda: eager(meta, params, {}, state, data[:3], data[3]),
        },
        1,
        args.repeats,
    ))
    return results


def print_learned_meta(args: argparse.Namespace) -> None:
    """Run :func:`bench_learned_meta` for every variant in a fresh process (cold caches,
    nothing shared between variants) and print the results."""
    print("\nlearned-rule meta step (remat=False), MLP 64-64-10, K=3, cold compile per process:")
    for variant in LEARNED_META_OPTIONS:
        command = [sys.executable, __file__, "--learned-meta-variant", variant,
                   "--device", args.device, "--repeats", str(args.repeats)]
        if args.threads:
            command += ["--threads", str(args.threads)]
        env = {**os.environ, **LEARNED_META_ENVIRONMENT.get(variant, {})}
        out = subprocess.run(
            command, capture_output=True, text=True, check=True, env=env
        ).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"  {variant:<9} options {LEARNED_META_OPTIONS[variant]}: ISA probe "
              f"{r['ISA probe (s)']:.1f} s, then compile time "
              f"{r['compile time (s)']:.1f} s; meta step {1e3 * r['compiled']:.1f} ms vs "
              f"eager {1e3 * r['eager']:.1f} ms (x{r['compiled'] / r['eager']:.2f})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small models, fewer repeats")
    parser.add_argument("--models", default="mlp,cnn,transformer")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="batch size (64; quick: 32)")
    parser.add_argument("--steps", type=int, default=None, help="steps per repeat")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (median)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--meta-k", type=int, default=10, help="inner steps of the meta step")
    parser.add_argument("--no-meta", action="store_true", help="skip the meta-step benchmark")
    parser.add_argument(
        "--warm-cache", action="store_true",
        help="let Inductor reuse its on-disk caches (default: off, compile times are cold)",
    )
    parser.add_argument(
        "--learned-meta", action="store_true",
        help="also the learned rule's meta step: cold compile and run time per Inductor "
        "option set (each in a fresh process; about a minute each on a 2-core CPU)",
    )
    parser.add_argument(
        "--learned-meta-variant", choices=tuple(LEARNED_META_OPTIONS), help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--full-unroll-compile", action="store_true",
        help="also torch.compile the whole K-step unroll (slow: minutes on CPU)",
    )
    args = parser.parse_args(argv)
    args.batch = args.batch or (32 if args.quick else 64)
    args.steps = args.steps or (10 if args.quick else 30)
    args.repeats = args.repeats or (5 if args.quick else 7)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.warm_cache:
        torch._inductor.config.force_disable_caches = True
    isa_probe = probe_cpu_isa(args.device)
    if args.learned_meta_variant:  # a child process of print_learned_meta
        result = bench_learned_meta(args.learned_meta_variant, args)
        print(json.dumps({"ISA probe (s)": isa_probe, **result}))
        return
    print(f"torch {torch.__version__}, {cpu_model()}, device {args.device}, "
          f"threads {torch.get_num_threads()}, "
          f"batch {args.batch}, {args.steps} steps x {args.repeats} repeats (medians), "
          f"inductor caches {'on' if args.warm_cache else 'off'}; Inductor's CPU ISA probe "
          f"{isa_probe:.1f} s (before, not in, the compile times below)")
    for kind in filter(None, args.models.split(",")):  # --models "": none
        r = bench_model(kind, args)
        fastest = min(("torch Adam for-loop", "torch Adam foreach", "torch Adam fused"),
                      key=r.__getitem__)
        print(f"\n{kind}: compile time {r.pop('compile time (s)'):.1f} s")
        for name, seconds in r.items():
            print(f"  {name:<28} {1e3 * seconds:8.3f} ms/step   "
                  f"x{seconds / r['functional eager']:.2f} of functional eager   "
                  f"x{seconds / r[fastest]:.2f} of {fastest}")
    if not args.no_meta:
        r = bench_meta(args)
        base = r["eager full unroll (torch.func.grad)"]
        print(f"\nmeta-gradient step, MLP 64-64-10, K={args.meta_k} inner Adam steps: "
              f"compile time {r.pop('compile time (s)'):.1f} s")
        full = r.pop("full unroll compile time (s)", None)
        if full is not None:
            print(f"  compile time of the whole unroll: {full:.1f} s")
        print(f"  compile time without remat: {r.pop('remat=False compile time (s)'):.1f} s")
        for name, seconds in r.items():
            print(f"  {name:<36} {1e3 * seconds:8.2f} ms   x{seconds / base:.2f} of eager unroll")
    if args.learned_meta:
        print_learned_meta(args)


if __name__ == "__main__":
    main()
