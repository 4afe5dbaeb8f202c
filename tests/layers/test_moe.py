"""Sparse mixture of experts: the output against a per-token reference, capacity, padding, the balancing loss,
noise and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from attnfree.layers.moe import SparseMoE
from attnfree.layers.sublayer import BlockContext, use_path
from attnfree.testing import assert_close

C, E = 12, 4


def moe(top_k=2, capacity_factor=1.25, noise=1.0, seed=0) -> SparseMoE:
    torch.manual_seed(seed)
    return SparseMoE(C, 2, "gelu", E, top_k, capacity_factor, noise, 0.0, 1e-5).double().eval()


def inputs(B=3, T=7, seed=0) -> torch.Tensor:
    return torch.randn(B, T, C, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def reference(layer: SparseMoE, x: torch.Tensor) -> torch.Tensor:
    """Each token alone: softmax over its top-k router logits, the weighted sum of those experts."""
    out = torch.zeros_like(x)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            h = layer.norm(x[b, t])
            top, chosen = layer.router.gate(h).topk(layer.top_k)
            for w, e in zip(torch.softmax(top, -1), chosen.tolist()):
                out[b, t] += w * layer.experts[e](h)
    return out


def fixed_router(layer: SparseMoE, logits: list[float]) -> None:
    """Make every token score the experts the same way."""
    row = torch.tensor(logits, dtype=torch.float64)
    layer.router.forward = lambda h: row.expand(h.shape[0], -1)  # type: ignore[method-assign]


@pytest.mark.parametrize("top_k", [1, 2, E], ids=["top1", "top2", "dense"])
def test_eval_output_matches_per_token_reference(top_k):
    layer = moe(top_k)
    x = inputs()
    y, stats = layer.route(x)
    assert_close("moe", y, reference(layer, x))
    assert int(stats.dropped) == 0 and int(stats.tokens_per_expert.sum()) == x.shape[0] * x.shape[1] * top_k


def test_capacity_keeps_the_earliest_time_steps_and_counts_the_rest():
    layer = moe(top_k=1, capacity_factor=0.6).train()
    fixed_router(layer, [5.0, 0.0, 0.0, 0.0])  # everyone wants expert 0
    x = inputs(B=2, T=5)
    y, stats = layer.route(x)
    capacity = math.ceil(0.6 * 10 * 1 / E)  # 2
    assert layer.capacity(10) == capacity
    assert stats.tokens_per_expert.tolist() == [capacity, 0, 0, 0] and int(stats.dropped) == 10 - capacity
    served = y.abs().sum(-1) > 0  # [B, T]
    expected = torch.zeros(2, 5, dtype=torch.bool)
    expected[0, 0] = expected[1, 0] = True  # time-major queue: (t=0, b=0), (t=0, b=1)
    assert torch.equal(served, expected)
    layer.eval()  # no capacity limit at evaluation
    assert int(layer.route(x)[1].dropped) == 0


def test_padding_is_not_routed():
    layer = moe()
    x = inputs()
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, :3] = False
    y, stats = layer.route(x, mask)
    assert torch.equal(y[1, :3], torch.zeros(3, C, dtype=torch.float64))
    assert int(stats.tokens_per_expert.sum()) == int(mask.sum()) * 2
    assert_close("real tokens", y[mask], layer.route(x)[0][mask])  # padding does not change the real tokens


def test_balancing_loss_is_one_when_uniform_and_reaches_the_gate():
    layer = moe(noise=0.0, capacity_factor=float(E)).train()  # capacity = every assignment: nothing dropped
    x = inputs()
    _, stats = layer.route(x)
    probs = torch.softmax(layer.router.gate(layer.norm(x)).reshape(-1, E), -1)
    f = stats.tokens_per_expert.double() / stats.tokens_per_expert.sum()
    assert int(stats.dropped) == 0
    assert_close("Switch aux", stats.aux_loss, E * (f * probs.mean(0)).sum())
    stats.aux_loss.backward()
    assert layer.router.gate.weight.grad is not None and layer.router.gate.weight.grad.abs().sum() > 0
    uniform = moe(noise=0.0)
    fixed_router(uniform, [0.0] * E)
    assert_close("uniform aux", uniform.route(x)[1].aux_loss, torch.tensor(1.0, dtype=torch.float64))


def test_noise_only_in_training():
    layer = moe(noise=1.0)
    x = inputs()
    assert torch.equal(layer.route(x)[0], layer.route(x)[0])  # evaluation: deterministic
    layer.train()
    torch.manual_seed(1)
    a = layer.route(x)[0]
    torch.manual_seed(2)
    assert not torch.equal(a, layer.route(x)[0])
    plain = moe(noise=0.0).train()
    assert plain.router.noise_gate is None and torch.equal(plain.route(x)[0], plain.route(x)[0])


def test_every_expert_and_the_router_get_gradient():
    layer = moe().train()
    torch.manual_seed(0)
    y, stats = layer.route(inputs(B=4, T=16))
    (y.pow(2).sum() + stats.aux_loss).backward()
    missing = [n for n, p in layer.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


@pytest.mark.parametrize("kw,match", [(dict(top_k=0), "top_k"), (dict(top_k=E + 1), "top_k"),
                                      (dict(activation="swish"), "activation")])
def test_bad_arguments(kw, match):
    args = dict(hidden_size=C, multiplier=2, activation="gelu", n_experts=E, top_k=2, capacity_factor=1.0,
                noise=1.0, dropout=0.0, eps=1e-5)
    with pytest.raises(ValueError, match=match):
        SparseMoE(**{**args, **kw})


def test_the_dense_path_equals_the_sparse_one_at_evaluation() -> None:
    """The export path (every expert everywhere, gates zero outside the top k) == the sparse dispatch, padded."""
    torch.manual_seed(0)
    moe = SparseMoE(12, 2, "gelu", 5, 2, 1.0, 1.0, 0.0, 1e-5).double().eval()
    x = torch.randn(3, 9, 12, dtype=torch.float64)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, :4] = False
    sparse, s_stats = moe.sparse_forward(x, mask)
    with use_path("dense"):
        dense, d_stats = moe.route(x, mask)
    assert_close("dense MoE", dense, sparse)
    assert torch.equal(d_stats.tokens_per_expert, s_stats.tokens_per_expert)
    assert_close("aux loss", d_stats.aux_loss, s_stats.aux_loss)
    with use_path("dense"), pytest.raises(ValueError, match="evaluation only"):
        moe.train().route(x, mask)


def test_as_a_sublayer_it_reports_its_routing_through_the_context():
    layer = moe()
    x = inputs()
    ctx = BlockContext(None, torch.arange(7).expand(3, 7))
    y = layer(x, ctx, None)
    y_ref, stats = layer.route(x)
    assert torch.equal(y, y_ref) and len(ctx.reports) == 1
    assert torch.equal(ctx.reports[0].tokens_per_expert, stats.tokens_per_expert)
