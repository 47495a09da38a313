"""The learned rule's per-element loop alone, compiled, against fused Adam's kernel.

Times one step of the element-wise work of ``LearnedOptimizer(compile=True)`` (Adam's
moments, the coefficient-weighted direction, the importance gate and the pull-back, as
``metaopt.learned.fused.fused_core_`` writes it, with ``direction_of``) on one
``[tokens, length]`` view, against ``torch._fused_adam_`` on as many elements, both on
one thread, timed round-robin (medians). ``first task`` is the shipped loop before the
first task boundary (every importance is zero, so the gate and pull-back terms are left
out and the importance is not read): the difference to ``learned (shipped)`` is what the
importance terms cost. Two hypothetical variants show what the loop's divisions cost:
``one division`` multiplies the gate's denominator into Adam's (one division where the
rule has two; the product can overflow float32 where the importance is near its cap)
and ``no gate`` drops the importance gate entirely (a different rule).
The per-step overhead of the optimizer (attention, guards, wrapper) is not in these
numbers; ``benchmarks/step_cost.py`` times whole steps.

    python benchmarks/elementwise_loop.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from metaopt._machine import cpu_model
from metaopt.learned.rule import direction_of, updated_second_moment


def _moments(g, m, v, b1, b2):
    return torch.lerp(m, g, 1.0 - b1), updated_second_moment(v, g, b2)


def _write(w, m, v, m_new, v_new, update) -> None:
    """The in-place writes of the fused step."""
    m.copy_(m_new)
    v.copy_(v_new)
    w.add_(update)


def shipped(g, w, m, v, anchor, imp, c, b1, b2):
    """The fused step's loop: moments, ``direction_of``, in-place writes."""
    m_new, v_new = _moments(g, m, v, b1, b2)
    _write(w, m, v, m_new, v_new, direction_of(g, w, m_new, v_new, anchor, imp, c, False))


def first_task(g, w, m, v, anchor, imp, c, b1, b2):
    """The shipped loop with ``importance_free=True`` (before the first task boundary)."""
    m_new, v_new = _moments(g, m, v, b1, b2)
    _write(w, m, v, m_new, v_new, direction_of(g, w, m_new, v_new, anchor, imp, c, True))


def _variant(gated_direction):
    """A loop like ``shipped`` whose update is ``gated_direction(num, denom, rest, imp,
    c_lam) - min(1, rho * imp) * drift``, with ``num = m c_m + g c_g`` and ``rest = w c_w
    + drift c_d``."""

    def loop(g, w, m, v, anchor, imp, c, b1, b2):
        c_m, c_g, c_w, c_d, c_lam, c_rho, c_eps = c
        m_new, v_new = _moments(g, m, v, b1, b2)
        imp, drift = imp.to(w.dtype), w - anchor.to(w.dtype)
        denom = v_new.clamp_min(1e-30).sqrt() + c_eps
        num, rest = m_new * c_m + g * c_g, w * c_w + drift * c_d
        pull = (imp * c_rho).clamp_max(1.0) * drift
        _write(w, m, v, m_new, v_new, gated_direction(num, denom, rest, imp, c_lam) - pull)

    loop.__doc__ = gated_direction.__doc__
    return loop


@_variant
def one_division(num, denom, rest, imp, c_lam):
    """``shipped`` with the gate's denominator multiplied into Adam's."""
    return (num + rest * denom) / (denom * (imp * c_lam + 1.0))


@_variant
def no_gate(num, denom, rest, imp, c_lam):
    """``shipped`` without the importance gate's division."""
    return num / denom + rest


VARIANTS: dict[str, Callable[..., None]] = {
    "learned (shipped)": shipped,
    "first task": first_task,
    "one division": one_division,
    "no gate": no_gate,
}


def _inputs(tokens: int, length: int, gen: torch.Generator) -> tuple:
    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    w = randn(tokens, length)
    return (
        randn(tokens, length),  # g
        w,
        0.1 * randn(tokens, length),  # m
        0.01 * torch.rand(tokens, length, generator=gen),  # v
        (w + 0.01).bfloat16(),  # anchor
        torch.rand(tokens, length, generator=gen).bfloat16(),  # importance
        [torch.rand(tokens, 1, generator=gen) for _ in range(7)],  # coefficients
        torch.tensor(0.9),
        torch.tensor(0.999),
    )


def measure(tokens: int, length: int, repeats: int) -> dict[str, float]:
    """Median seconds per step of every variant and of ``torch._fused_adam_``."""
    gen = torch.Generator().manual_seed(0)
    compiled = {name: torch.compile(fn, fullgraph=True) for name, fn in VARIANTS.items()}
    inputs = {name: _inputs(tokens, length, gen) for name in VARIANTS}
    n = tokens * length
    p, g = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    m, v = torch.zeros(n), torch.zeros(n)
    step = torch.tensor(0.0)

    def adam() -> None:
        step.add_(1.0)
        torch._fused_adam_(
            [p], [g], [m], [v], [], [step], lr=1e-3, beta1=0.9, beta2=0.999,
            weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False,
        )

    runs = {name: (lambda f=fn, x=inputs[name]: f(*x)) for name, fn in compiled.items()}
    runs["Adam fused"] = adam
    for run in runs.values():  # compile, warm up
        run()
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--length", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = measure(args.tokens, args.length, args.repeats)
    adam = result["Adam fused"]
    print(f"torch {torch.__version__}, {cpu_model()}, {torch.get_num_threads()} thread(s), "
          f"{args.tokens} x {args.length} elements, medians of {args.repeats}")
    for name, seconds in result.items():
        print(f"  {name:<18} {1e3 * seconds:8.3f} ms   x{seconds / adam:.2f} of fused Adam")


if __name__ == "__main__":
    main()
