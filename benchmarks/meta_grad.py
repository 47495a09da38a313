"""Time of one unrolled meta-gradient: metaopt (eager and compiled) vs higher vs TorchOpt.

Same problem for every library: an MLP, K inner steps of SGD (momentum 0.9) or Adam on
fixed batches, meta-loss = loss on a held-out batch after the K steps, meta-gradient
with respect to the initial weights (MAML-style, the one meta-parameter every library
supports). Prints medians over repeats, ratios to higher (the target is metaopt <= 0.5x
higher's time) and each library's deviation from metaopt's meta-gradient (metaopt's
matches finite differences in tests/meta; higher's Adam meta-gradient deviates from both
metaopt's and TorchOpt's, which agree with each other). Libraries are timed round-robin
so that load changes on a shared machine hit all of them alike.

Usage::

    python benchmarks/meta_grad.py --steps 10 --repeats 7 --threads 1

Rows ``metaopt-compiled[-noremat][-xC]``: ``make_meta_step`` with ``remat=True`` (or
False) and ``steps_per_call=C`` (default C in 1 and 5; ``--steps-per-call``).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import higher
import torch
import torch.nn.functional as F
import torchopt
from torch import nn

import metaopt
from metaopt.compile import make_meta_step, module_state
from metaopt.meta import SupervisedProblem, Unrolled


def make_problem(width: int, steps: int, batch: int, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                          nn.Linear(width, 10))
    batches = [(torch.randn(batch, 64), torch.randint(0, 10, (batch,))) for _ in range(steps)]
    meta = (torch.randn(batch, 64), torch.randint(0, 10, (batch,)))
    return model, batches, meta


def _metaopt_rule(rule_name: str) -> metaopt.UpdateRule:
    if rule_name == "sgd":
        return metaopt.rules.sgd(lr=0.1, momentum=0.9)
    return metaopt.rules.adam(lr=1e-3, eps_root=1e-16)


def metaopt_grad(model, batches, meta, rule_name: str) -> list[torch.Tensor]:
    rule = _metaopt_rule(rule_name)
    mp = {"init." + k: p.detach() for k, p in model.named_parameters()}
    problem = SupervisedProblem(model, batches, meta, init_prefix="init.")
    grads = Unrolled(lambda m: rule)(mp, problem).grads
    return [grads["init." + k] for k, _ in model.named_parameters()]


def higher_grad(model, batches, meta, rule_name: str) -> list[torch.Tensor]:
    opt = (
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        if rule_name == "sgd"
        else torch.optim.Adam(model.parameters(), lr=1e-3)
    )
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for x, y in batches:
            diffopt.step(F.cross_entropy(fmodel(x), y))
        loss = F.cross_entropy(fmodel(meta[0]), meta[1])
    return list(torch.autograd.grad(loss, list(model.parameters())))


def torchopt_grad(model, batches, meta, rule_name: str) -> list[torch.Tensor]:
    net = _clone(model)
    opt = (
        torchopt.MetaSGD(net, lr=0.1, momentum=0.9)
        if rule_name == "sgd"
        else torchopt.MetaAdam(net, lr=1e-3, eps_root=1e-16)
    )
    for x, y in batches:
        opt.step(F.cross_entropy(net(x), y))
    loss = F.cross_entropy(net(meta[0]), meta[1])
    grads = torch.autograd.grad(loss, list(net._init_params))
    return list(grads)


def compiled_metaopt(
    model: nn.Module, rule_name: str, remat: bool = True, steps_per_call: int = 1
) -> Callable[..., list[torch.Tensor]]:
    """metaopt.compile.make_meta_step on the same problem, gradient w.r.t. the initial
    weights from ``init_grads``. ``remat``: one compiled inner step, its vjp and the
    validation gradient (memory flat in K); else the compiled steps under autograd.
    ``steps_per_call``: inner steps per compiled call."""
    rule = _metaopt_rule(rule_name)
    step = make_meta_step(
        model, F.cross_entropy, lambda meta_params: rule, remat=remat,
        steps_per_call=steps_per_call,
    )
    params, buffers = module_state(model)

    def meta_grad(model, batches, meta, rule_name) -> list[torch.Tensor]:
        out = step({}, params, buffers, rule.init(params), batches, meta)
        return [out.init_grads[k] for k, _ in model.named_parameters()]

    return meta_grad


def _clone(model: nn.Module) -> nn.Module:
    """A copy whose initial parameters are leaves we differentiate with respect to."""
    net = copy.deepcopy(model)
    net._init_params = list(net.parameters())
    return net


def time_round_robin(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each function, calling them in turn ``repeats`` times."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="inner steps K")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--no-compiled", action="store_true", help="skip metaopt's compiled meta step"
    )
    parser.add_argument("--rules", nargs="+", choices=("sgd", "adam"), default=["sgd", "adam"])
    parser.add_argument(
        "--steps-per-call", type=int, nargs="+", default=[1, 5],
        help="inner steps per compiled call to time (make_meta_step(steps_per_call=...))",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, batches, meta = make_problem(args.width, args.steps, args.batch)
    libs = {"metaopt": metaopt_grad, "higher": higher_grad, "torchopt": torchopt_grad}
    print(
        f"one unrolled meta-gradient, K={args.steps}, MLP 64-{args.width}-{args.width}-10, "
        f"batch {args.batch}, {args.threads} thread(s), median of {args.repeats}"
    )
    for rule_name in args.rules:
        reference = metaopt_grad(model, batches, meta, rule_name)
        scale = max(float(b.abs().max()) for b in reference)
        libs_here = dict(libs)
        compiled = [
            (f"metaopt-compiled{'' if remat else '-noremat'}{f'-x{c}' if c > 1 else ''}", remat, c)
            for c in args.steps_per_call
            for remat in (True, False)
        ]
        for name, remat, c in [] if args.no_compiled else compiled:
            start = time.perf_counter()
            libs_here[name] = compiled_metaopt(model, rule_name, remat, c)
            libs_here[name](model, batches, meta, rule_name)
            seconds = time.perf_counter() - start
            print(f"  {rule_name:4s} {name}: first call (compiles) {seconds:.1f} s")
        errors = {}
        for name, fn in libs_here.items():
            grads = fn(model, batches, meta, rule_name)
            errors[name] = max(
                float((a - b).abs().max()) for a, b in zip(grads, reference, strict=True)
            ) / scale
        timings = time_round_robin(
            {
                name: (lambda fn=fn, r=rule_name: fn(model, batches, meta, r))
                for name, fn in libs_here.items()
            },
            args.repeats,
        )
        for name, seconds in timings.items():
            print(
                f"  {rule_name:4s} {name:28s} {seconds * 1e3:8.1f} ms   "
                f"ratio to higher {seconds / timings['higher']:.2f}x   "
                f"max |grad - metaopt's| / max |grad| = {errors[name]:.1e}"
            )


if __name__ == "__main__":
    main()
