"""TorchOpt <-> metaopt adapters give the same updates as the native implementations."""

from __future__ import annotations

import pytest
import torch

import metaopt
from metaopt import rules

torchopt = pytest.importorskip("torchopt")


def _trajectory(rule, steps=10):
    gen = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(3, 2, generator=gen), "b": torch.randn(2, generator=gen)}
    state = rule.init(params)
    for _ in range(steps):
        grads = {k: torch.sin(3 * v) + 0.1 for k, v in params.items()}
        updates, state = rule.update(grads, state, params)
        params = metaopt.apply_updates(params, updates)
    return params


@pytest.mark.parametrize(
    ("theirs", "ours"),
    [
        (lambda: torchopt.adam(lr=0.05), lambda: rules.adam(lr=0.05)),
        (lambda: torchopt.sgd(lr=0.1, momentum=0.9), lambda: rules.sgd(lr=0.1, momentum=0.9)),
        (lambda: torchopt.adamw(lr=0.05, weight_decay=0.1),
         lambda: rules.adamw(lr=0.05, weight_decay=0.1)),
    ],
    ids=["adam", "sgd", "adamw"],
)
def test_wrapped_torchopt_matches_metaopt(theirs, ours):
    wrapped = _trajectory(rules.from_torchopt(theirs()))
    native = _trajectory(ours())
    # TorchOpt computes Adam's bias corrections in float32 (``1 - 0.999`` off by 1.3e-5
    # relative), metaopt in float64 as torch.optim does
    for k in native:
        torch.testing.assert_close(wrapped[k], native[k], rtol=1e-4, atol=1e-5)


def test_metaopt_rule_runs_inside_torchopt():
    gen = torch.Generator().manual_seed(1)
    params = (torch.randn(4, generator=gen),)
    tx = rules.to_torchopt(rules.adam(lr=0.05))
    ref = torchopt.adam(lr=0.05)
    state, ref_state = tx.init(params), ref.init(params)
    ours, theirs = params, params
    for _ in range(5):
        g1, g2 = (torch.cos(ours[0]),), (torch.cos(theirs[0]),)
        u1, state = tx.update(g1, state, params=ours)
        u2, ref_state = ref.update(g2, ref_state, params=theirs, inplace=False)
        ours = torchopt.apply_updates(ours, u1, inplace=False)
        theirs = torchopt.apply_updates(theirs, u2, inplace=False)
    # bias corrections: float32 in TorchOpt, float64 in metaopt (as torch.optim)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-4, atol=1e-5)


def test_from_torchopt_rejects_non_transformations():
    with pytest.raises(TypeError, match="GradientTransformation"):
        rules.from_torchopt(object())
