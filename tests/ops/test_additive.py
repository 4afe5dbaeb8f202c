"""Causal additive attention: naive <-> parallel <-> recurrent, values, final state and gradients."""

import pytest
import torch

from attnfree.ops.additive import (
    PoolOptions,
    additive_pool_naive,
    additive_pool_parallel,
    additive_pool_recurrent,
    additive_pool_step_,
    init_additive_state,
)
from attnfree.testing import assert_close

IMPLS = {"naive": additive_pool_naive, "parallel": additive_pool_parallel, "recurrent": additive_pool_recurrent}
FINAL = PoolOptions(output_final_state=True)

SIZES = [  # (B, T, H, D)
    pytest.param(3, 1, 2, 8, id="T1"),
    pytest.param(3, 63, 2, 60, id="T63-D60"),
    pytest.param(2, 130, 3, 7, id="T130-odd"),
]


def make_inputs(B, T, H, D, dtype, scale=3.0, seed=0, left_pad=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    a = (torch.randn(B, T, H, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_()
    mask = torch.ones(B, T, dtype=torch.bool)
    if left_pad and B > 1:
        mask[1, : T // 3] = False  # a left-padded row
        mask[-1, : T - 1] = False  # a row with one real token
    return x, a, mask


def run(fn, x, a, mask, do, **kw):
    out, state = fn(x, a, mask, None, PoolOptions(output_final_state=True, **kw))
    (out.float() * do).sum().backward()
    grads = (x.grad.clone(), a.grad.clone())
    x.grad = a.grad = None
    return out, state, grads


def compare(name, got, ref, rtol=None):
    out, state, grads = got
    ref_out, ref_state, ref_grads = ref
    assert_close(f"{name} out", out, ref_out.to(out.dtype), rtol)
    for field, s, r in zip(("s", "z", "m"), state, ref_state):
        assert_close(f"{name} state.{field}", s, r.to(s.dtype), rtol)
    for field, gg, rg in zip(("dx", "da"), grads, ref_grads):
        assert_close(f"{name} {field}", gg, rg.to(gg.dtype), rtol)


@pytest.mark.parametrize("B,T,H,D", SIZES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_forms_agree(B, T, H, D, dtype):
    x, a, mask = make_inputs(B, T, H, D, dtype)
    do = torch.randn(B, T, H, D)
    ref = run(additive_pool_naive, x, a, mask, do)
    compare("parallel", run(additive_pool_parallel, x, a, mask, do, chunk_size=16), ref)
    compare("recurrent", run(additive_pool_recurrent, x, a, mask, do), ref)


@pytest.mark.parametrize("chunk", [1, 2, 7, 64, 512])
def test_parallel_long_matches_recurrent(chunk):
    """T=500 (naive is too slow there): parallel with several chunk sizes against the recurrent form."""
    x, a, mask = make_inputs(3, 500, 2, 12, torch.float64, scale=5.0)
    do = torch.randn(3, 500, 2, 12)
    compare(f"chunk={chunk}", run(additive_pool_parallel, x, a, mask, do, chunk_size=chunk),
            run(additive_pool_recurrent, x, a, mask, do))


@pytest.mark.parametrize("name", ["parallel", "recurrent"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("scale", [1e2, 1e4])
def test_extreme_scores_are_finite_and_exact(name, dtype, scale):
    """|score| up to 1e4: no overflow, no 0/0, equal to the float64 reference on the same inputs."""
    x, a, mask = make_inputs(3, 70, 2, 16, dtype, scale=scale)
    out, state = IMPLS[name](x, a, mask, None, FINAL)
    ref, ref_state = additive_pool_naive(x, a, mask, None, FINAL)
    assert torch.isfinite(out).all() and all(torch.isfinite(t[~torch.isinf(t)]).all() for t in state)
    assert_close(f"{name} out", out, ref.to(out.dtype))
    (out.float().sum()).backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(a.grad).all()


def test_max_error_at_1e4_is_tiny():
    """The figure quoted in the README: float32 parallel vs float64 reference at |score| ~ 1e4."""
    x, a, mask = make_inputs(3, 256, 4, 64, torch.float32, scale=1e4)
    out, _ = additive_pool_parallel(x, a, mask)
    ref, _ = additive_pool_naive(x.double(), a.double(), mask)
    assert (out.double() - ref).abs().max().item() < 1e-5


def test_leading_padding_gives_zero_not_nan():
    x, a, _ = make_inputs(2, 10, 1, 4, torch.float32)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, 5:] = True
    for fn in IMPLS.values():
        out, _ = fn(x, a, mask)
        assert torch.isfinite(out).all()
        assert (out[0, :5] == 0).all() and (out[1] == 0).all()


def test_padding_equals_alone():
    """A left-padded row gives the same outputs as the row without its padding."""
    x, a, mask = make_inputs(3, 40, 2, 5, torch.float64)
    out, _ = additive_pool_parallel(x, a, mask, options=PoolOptions(chunk_size=8))
    real = mask[1]
    alone, _ = additive_pool_parallel(x[1:2, real], a[1:2, real], options=PoolOptions(chunk_size=8))
    assert_close("padded vs alone", out[1, real], alone[0])


def test_causality():
    """Changing position j never changes an output before j."""
    x, a, _ = make_inputs(2, 50, 2, 6, torch.float64)
    out, _ = additive_pool_parallel(x, a, options=PoolOptions(chunk_size=8))
    x2, a2 = x.detach().clone(), a.detach().clone()
    x2[:, 30] += 10.0
    a2[:, 30] += 50.0
    out2, _ = additive_pool_parallel(x2, a2, options=PoolOptions(chunk_size=8))
    assert torch.equal(out[:, :30], out2[:, :30])
    assert not torch.allclose(out[:, 30:], out2[:, 30:])


@pytest.mark.parametrize("split", [1, 17, 39])
def test_prefill_then_continue(split):
    """State handed from one call to the next: parallel(prefix) + parallel/recurrent(rest) == parallel(all)."""
    x, a, mask = make_inputs(3, 40, 2, 5, torch.float64, scale=10.0)
    full, full_state = additive_pool_parallel(x, a, mask, None, PoolOptions(True, chunk_size=8))
    _, st = additive_pool_parallel(x[:, :split], a[:, :split], mask[:, :split], None, PoolOptions(True, chunk_size=8))
    for fn in (additive_pool_parallel, additive_pool_recurrent, additive_pool_naive):
        rest, end = fn(x[:, split:], a[:, split:], mask[:, split:], st, FINAL)
        assert_close(f"{fn.__name__} continued", rest, full[:, split:])
        for s, r in zip(end, full_state):
            assert_close(f"{fn.__name__} final state", s, r)


def test_bad_shapes_raise():
    x = torch.randn(2, 5, 2, 3)
    with pytest.raises(ValueError, match="scores"):
        additive_pool_parallel(x, torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match="mask"):
        additive_pool_parallel(x, torch.randn(2, 5, 2), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="state"):
        additive_pool_parallel(x, torch.randn(2, 5, 2), None, init_additive_state(2, 2, 4))


def test_in_place_step_matches_step():
    x, a, _ = make_inputs(3, 12, 2, 5, torch.float64, left_pad=False)
    state = init_additive_state(3, 2, 5, torch.float64)
    ref, _ = additive_pool_recurrent(x, a)
    ptrs = [t.data_ptr() for t in state]
    outs = [additive_pool_step_(x[:, t], a[:, t], state) for t in range(12)]
    assert_close("in-place steps", torch.stack(outs, 1), ref)
    assert [t.data_ptr() for t in state] == ptrs  # no re-allocation of the state


def _bonus_run(fn, x, a, u, mask, do, state=None, **kw):
    out, final = fn(x, a, mask, state, PoolOptions(True, bonus=u, **kw))
    (out.float() * do).sum().backward()
    grads = (x.grad.clone(), a.grad.clone(), u.grad.clone())
    x.grad = a.grad = u.grad = None
    return out, final, grads


@pytest.mark.parametrize("B,T,H,D", SIZES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("scale", [1.0, 30.0], ids=["u1", "u30"])
def test_the_current_token_bonus_in_every_form(B, T, H, D, dtype, scale):
    """RWKV's u: the current token's weight times e^u in the output only; values, state and every gradient
    (the bonus's included) agree across the forms, for bonuses small and large, positive and negative."""
    x, a, mask = make_inputs(B, T, H, D, dtype)
    u = (torch.linspace(-1.0, 1.0, H, dtype=torch.float64) * scale).to(dtype).requires_grad_()
    do = torch.randn(B, T, H, D)
    ref = _bonus_run(additive_pool_naive, x, a, u, mask, do)
    for name, fn, kw in (("parallel", additive_pool_parallel, {"chunk_size": 16}),
                         ("recurrent", additive_pool_recurrent, {})):
        out, state, grads = _bonus_run(fn, x, a, u, mask, do, **kw)
        assert_close(f"{name} out", out, ref[0].to(out.dtype))
        for field, s, r in zip(("s", "z", "m"), state, ref[1]):
            assert_close(f"{name} state.{field}", s, r.to(s.dtype))
        checked = ("dx", "da", "du") if dtype == torch.float64 or scale == 1.0 else ("dx", "da")
        for field, gg, rg in zip(("dx", "da", "du"), grads, ref[2]):
            if field in checked:  # (float32 du at |u| = 30: a sum of terms of order e^-30 that cancel; f64 checks it)
                assert_close(f"{name} {field}", gg, rg.to(gg.dtype))


def test_a_zero_bonus_is_no_bonus_and_it_continues_from_a_state():
    x, a, mask = make_inputs(2, 40, 3, 5, torch.float64)
    zero = torch.zeros(3, dtype=torch.float64)
    plain = additive_pool_parallel(x, a, mask, None, FINAL)[0]
    assert_close("u = 0", additive_pool_parallel(x, a, mask, None, PoolOptions(True, bonus=zero))[0], plain)
    u = torch.tensor([0.5, -2.0, 3.0], dtype=torch.float64)
    full = additive_pool_naive(x, a, mask, None, PoolOptions(bonus=u))[0]
    head, state = additive_pool_parallel(x[:, :17], a[:, :17], mask[:, :17], None, PoolOptions(True, bonus=u))
    tail = additive_pool_parallel(x[:, 17:], a[:, 17:], mask[:, 17:], state, PoolOptions(bonus=u))[0]
    assert_close("prefill + continue", torch.cat([head, tail], 1), full)
    s = init_additive_state(2, 3, 5, torch.float64)
    steps = [additive_pool_step_(x[:, t].detach(), a[:, t].detach(), s, u) for t in range(40)]
    assert_close("in-place steps", torch.stack(steps, 1)[0], full[0].detach())  # row 0: no padding
