"""Time of the meta-trainer's meta-gradients: eager unrolled inner steps vs compiled ones.

Same problems for both: task sequences drawn from the meta-trainer's task family, the
shipped learned rule (``default``), truncated unrolling. Prints the compile time (the
first pass over the problems, one compilation per shape signature), the median time of a
pass over all problems for each variant (timed round-robin, so load changes hit both
alike), their ratio, and each sequence's largest meta-gradient difference (float32
rounding differs between the two; long sequences through Adam-like normalisation can
amplify it, and the eager result itself moves when the thread count changes).

    python benchmarks/meta_train_step.py --threads 1
    python benchmarks/meta_train_step.py --models mlp cnn transformer --no-simd
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from metaopt.learned import learned_rule, load_pretrained
from metaopt.meta import FamilyConfig, TaskFamily, Unrolled
from metaopt.meta.compiled import CompiledContinualSteps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp"])
    parser.add_argument("--datasets", nargs="+", default=["digits"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[32])
    parser.add_argument("--samples", type=int, default=4, help="task sequences per pass")
    parser.add_argument("--truncation", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-simd", action="store_true",
                        help="compile without SIMD code (options cpp.vec_isa_ok=False)")
    parser.add_argument("--data-dir", default=None, help="MNIST folder (for --datasets mnist)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    config = FamilyConfig(
        datasets=tuple(args.datasets), models=tuple(args.models),
        batch_size=tuple(args.batch_sizes),
    )
    family = TaskFamily(config, "train", args.data_dir)
    gen = torch.Generator().manual_seed(0)
    problems = [family.sample(gen) for _ in range(args.samples)]
    net = load_pretrained("default")
    mp = dict(net.named_parameters())

    def rule_fn(m):
        return learned_rule(net, 1e-3, meta_params=m)

    options = {"options": {"cpp.vec_isa_ok": False, "size_asserts": False}} if args.no_simd else {}
    steps = CompiledContinualSteps(rule_fn, **options)
    variants = {
        "eager": Unrolled(rule_fn, args.truncation),
        "compiled": Unrolled(rule_fn, args.truncation, step_fn=steps),
    }

    def run(name: str):
        return [variants[name](mp, p) for p in problems]

    start = time.perf_counter()
    compiled = run("compiled")
    compile_pass = time.perf_counter() - start
    eager = run("eager")
    rel = [
        max(
            float((c.grads[k] - e.grads[k]).abs().max() / e.grads[k].abs().max().clamp_min(1e-30))
            for k in e.grads
        )
        for c, e in zip(compiled, eager, strict=True)
    ]
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name in variants:
            start = time.perf_counter()
            run(name)
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    n_steps = sum(p.num_steps for p in problems)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.samples} sequences "
          f"({n_steps} inner steps; {', '.join(p.description for p in problems)}), "
          f"truncation {args.truncation}, median of {args.repeats}, "
          f"{'no SIMD' if args.no_simd else 'default Inductor options'}")
    print(f"  first compiled pass (compiles {steps.num_compiled} shape signature(s)): "
          f"{compile_pass:.1f} s")
    for name, t in medians.items():
        print(f"  {name:<9} {t:7.3f} s per pass  {1e3 * t / n_steps:6.2f} ms per inner step  "
              f"x{t / medians['eager']:.2f} of eager")
    print("  largest meta-gradient difference per sequence, relative to each tensor's largest "
          "entry: " + ", ".join(f"{r:.1e}" for r in rel))


if __name__ == "__main__":
    main()
