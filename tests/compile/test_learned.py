"""The learned rule through metaopt.compile: compiled step == eager, meta-gradients exact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from metaopt.compile import make_meta_step, make_step, module_state
from tests.compile.compile_models import batches, build, graph_breaks, unrolled_meta_grad
from tests.compile.test_step import check_compiled_matches_eager

learned = pytest.importorskip("metaopt.learned")


def perturbed_net(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A LearnedRuleNet moved away from its Adam-equivalent zero initialisation, so that
    every coefficient of the rule is exercised."""
    torch.manual_seed(seed)
    net = learned.LearnedRuleNet().to(dtype)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


@pytest.mark.slow
def test_compiled_learned_rule_matches_eager_and_lr_does_not_recompile():
    """With graph breaks (today: ``repeat_interleave`` with tensor repeats in
    metaopt/learned/rule.py) Inductor compiles one graph per piece, minutes on a 2-core
    CPU; the test then checks Dynamo's capture with the ``aot_eager`` backend instead.
    Once the step is one graph it is compiled with Inductor and ``fullgraph=True``."""
    model, data = build("mlp"), batches("mlp", 3)
    lr = torch.tensor(1e-2)
    rule = learned.learned_rule(perturbed_net(), lr=lr)
    eager = make_step(model, F.cross_entropy, rule, compile=False)
    start = eager.init(model)
    breaks = torch._dynamo.explain(eager.eager)(*start, data[0]).graph_break_count
    options = {"fullgraph": True} if breaks == 0 else {"fullgraph": False, "backend": "aot_eager"}
    compiled = make_step(model, F.cross_entropy, rule, **options)
    runs = []
    for step in (compiled, eager):
        params, buffers, state = start
        for batch in data:
            params, buffers, state, _ = step(params, buffers, state, batch)
        runs.append(params)
    for name in runs[0]:
        torch.testing.assert_close(runs[0][name], runs[1][name], atol=1e-5, rtol=1e-5)
    assert max((runs[1][k] - start[0][k]).abs().max().item() for k in start[0]) > 1e-3
    graphs = counters["stats"]["unique_graphs"]
    try:
        lr.fill_(3e-3)  # the rule reads the tensor at every update
        new_c = compiled(*start, data[0])[0]
        new_e = eager(*start, data[0])[0]
    finally:
        lr.fill_(1e-2)
    assert counters["stats"]["unique_graphs"] == graphs
    for name in new_c:
        torch.testing.assert_close(new_c[name], new_e[name], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["cnn", "transformer"])
def test_compiled_learned_rule_matches_eager_on_cnn_with_batchnorm_and_transformer(kind):
    """compiled == eager within 1e-5 over 5 steps, one graph without breaks."""
    net = perturbed_net().requires_grad_(False)  # training, not meta-training: no graph kept
    check_compiled_matches_eager(kind, learned.learned_rule(net, lr=torch.tensor(1e-2)))


def test_meta_step_learned_rule_equals_backprop_through_unroll():
    """Meta-gradients w.r.t. all LearnedRuleNet parameters (float64, eager)."""
    net = perturbed_net(dtype=torch.float64)
    model = build("mlp").double()
    data = [(x.double(), y) for x, y in batches("mlp", 3)]
    train, val = data[:2], data[2]
    params, buffers = module_state(model)

    def factory(meta):
        return learned.learned_rule(net, lr=1e-2, meta_params=meta, aux_dtype=None)

    meta = {k: v.detach() for k, v in net.named_parameters()}
    step = make_meta_step(model, F.cross_entropy, factory, compile=False)
    out = step(meta, params, buffers, factory(meta).init(params), train, val)
    ref = unrolled_meta_grad(model, factory, meta, params, buffers, train, val)
    assert max(g.abs().max().item() for g in out.meta_grads.values()) > 1e-6
    for name in meta:
        torch.testing.assert_close(out.meta_grads[name], ref[name], atol=1e-10, rtol=1e-7)


@pytest.mark.slow
def test_compiled_meta_step_learned_rule_matches_eager():
    """Meta-gradients w.r.t. the LearnedRuleNet through a compiled step (3 graphs)."""
    net = perturbed_net()
    model, data = build("mlp"), batches("mlp", 3)
    params, buffers = module_state(model)

    def factory(meta):
        return learned.learned_rule(net, lr=1e-2, meta_params=meta)

    meta = {k: v.detach() for k, v in net.named_parameters()}
    state = factory(meta).init(params)
    graphs, breaks = counters["stats"]["unique_graphs"], graph_breaks()
    out = make_meta_step(model, F.cross_entropy, factory)(meta, params, buffers, state,
                                                          data[:2], data[2])
    assert counters["stats"]["unique_graphs"] - graphs <= 3
    assert graph_breaks() == breaks
    ref = make_meta_step(model, F.cross_entropy, factory, compile=False)(
        meta, params, buffers, state, data[:2], data[2])
    scale = max(g.abs().max().item() for g in ref.meta_grads.values())
    assert scale > 1e-4
    for name in meta:
        torch.testing.assert_close(out.meta_grads[name], ref.meta_grads[name],
                                   atol=1e-5 * scale, rtol=1e-4)
