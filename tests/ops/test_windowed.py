"""Windowed additive pooling: naive <-> parallel <-> recurrent, values, final state and gradients; chunked prefill."""

import itertools

import pytest
import torch

from attnfree.ops.additive import PoolOptions, additive_pool_parallel
from attnfree.ops.windowed import (
    WindowOptions,
    init_window_state,
    windowed_pool_banded,
    windowed_pool_blocks,
    windowed_pool_naive,
    windowed_pool_parallel,
    windowed_pool_recurrent,
)
from attnfree.testing import assert_close

FORMS = {"blocks": windowed_pool_blocks, "banded": windowed_pool_banded, "recurrent": windowed_pool_recurrent}
SIZES = [(3, 1, 2, 8), (3, 63, 2, 7), (3, 500, 1, 5)]  # (B, T, H, D)
WINDOWS = (1, 3, 64, 700)  # 700 > every T
SCALES = (3.0, 1e4)


def reference_cases() -> list:
    """Every (dtype, size, k, score scale, form); the step loop's long cases (T k > 20,000, autograd through every
    ring) are slow, and float32 runs it up to T = 63 only."""
    cases = []
    for dtype, (B, T, H, D), k, scale, form in itertools.product((torch.float64, torch.float32), SIZES, WINDOWS,
                                                                   SCALES, sorted(FORMS)):
        if form == "recurrent" and dtype == torch.float32 and T > 63:
            continue
        marks = [pytest.mark.slow] if form == "recurrent" and T * k > 20_000 else []
        name = f"{'f64' if dtype == torch.float64 else 'f32'}-T{T}-D{D}-k{k}-scores{scale:g}-{form}"
        cases.append(pytest.param(dtype, B, T, H, D, k, scale, form, id=name, marks=marks))
    return cases


def make_inputs(B, T, H, D, dtype, scale, seed=0):
    """Random values and scores (std ``scale``), a left-padded row and a row with one real token."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    a = (torch.randn(B, T, H, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_()
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, : T // 3] = False
    mask[-1, : T - 1] = False
    return x, a, mask


def run(fn, x, a, mask, k, do):
    """Output, final state and (dx, da) under the upstream gradient ``do``."""
    out, state = fn(x, a, mask, None, WindowOptions(k, output_final_state=True))
    (out.double() * do).sum().backward()
    grads = (x.grad.clone(), a.grad.clone())
    x.grad = a.grad = None
    return out, state, grads


@pytest.mark.parametrize("dtype, B, T, H, D, k, scale, form", reference_cases())
def test_forms_agree_with_the_reference(dtype, B, T, H, D, k, scale, form):
    x, a, mask = make_inputs(B, T, H, D, dtype, scale)
    do = torch.randn(B, T, H, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))  # not the global
    xr, ar = x.detach().double().requires_grad_(), a.detach().double().requires_grad_()
    ref_out, ref_state, (ref_dx, ref_da) = run(windowed_pool_naive, xr, ar, mask, k, do)
    out, state, (dx, da) = run(FORMS[form], x, a, mask, k, do)
    assert_close(f"{form} out", out, ref_out.to(dtype))
    assert_close(f"{form} state.x", state.x, ref_state.x.to(state.x.dtype))
    assert torch.equal(state.a, ref_state.a.to(state.a.dtype)), "the ring's scores are copied, not computed"
    assert_close(f"{form} dx", dx, ref_dx.to(dtype))
    if dtype == torch.float32 and (scale > 100 or T == 1):
        # at |a| ~ 1e4 the softmax is one-hot, and at T = 1 every window holds one position: the exact da is ~0 (0)
        # and float32's is the rounding of x_j - g_i (~1e-6), so only an absolute bound means anything
        assert (da.double() - ref_da).abs().max() < 1e-4
    else:
        assert_close(f"{form} da", da, ref_da.to(dtype))


def test_a_window_of_padding_outputs_zero_and_a_window_of_one_is_the_value():
    x, a, mask = make_inputs(3, 20, 2, 4, torch.float64, 3.0)
    g, _ = windowed_pool_parallel(x, a, mask, None, WindowOptions(1))
    assert torch.equal(g[~mask], torch.zeros_like(g[~mask]))
    assert torch.equal(g[mask], x[mask])


def test_the_window_forgets_what_left_it():
    """Changing a position changes exactly the outputs of the k positions whose window holds it."""
    B, T, H, D, k = 2, 30, 1, 3, 5
    x, a, _ = make_inputs(B, T, H, D, torch.float64, 1.0)
    g1, _ = windowed_pool_parallel(x, a, None, None, WindowOptions(k))
    x2 = x.detach().clone()
    x2[:, 10] += 1.0
    g2, _ = windowed_pool_parallel(x2, a, None, None, WindowOptions(k))
    changed = (g1 - g2).abs().amax((0, 2, 3)) > 0
    assert changed.nonzero().flatten().tolist() == list(range(10, 10 + k))


@pytest.mark.parametrize("form", ["blocks", "banded"])
@pytest.mark.parametrize("k", [1, 3, 64])
@pytest.mark.parametrize("cuts", [(1,), (7, 8), (40, 41, 62)], ids=["cut1", "cut7-8", "cut40-41-62"])
def test_chunked_prefill_equals_the_whole_sequence(k, cuts, form):
    """The parallel form continued from a state, in pieces (and single steps), equals one call on everything."""
    B, T, H, D = 3, 63, 2, 6
    x, a, mask = make_inputs(B, T, H, D, torch.float64, 3.0)
    whole, whole_state = windowed_pool_parallel(x, a, mask, None, WindowOptions(k, True))
    state, outs = init_window_state(B, H, D, k, torch.float64), []
    for lo, hi in zip((0, *cuts), (*cuts, T), strict=True):
        out, state = FORMS[form](x[:, lo:hi], a[:, lo:hi], mask[:, lo:hi], state, WindowOptions(k, True))
        outs.append(out)
    assert_close("pieces", torch.cat(outs, 1), whole)
    assert_close("state.x", state.x, whole_state.x)
    assert torch.equal(state.a, whole_state.a)


def test_gradients_reach_the_initial_state():
    B, T, H, D, k = 2, 9, 2, 3, 4
    x, a, mask = make_inputs(B, T, H, D, torch.float64, 2.0)
    ring = init_window_state(B, H, D, k, torch.float64)
    ring = ring._replace(x=torch.randn(B, k, H, D, dtype=torch.float64), a=torch.randn(B, k, H, dtype=torch.float64))
    grads = {}
    for name, fn in {"naive": windowed_pool_naive, "blocks": windowed_pool_blocks,
                     "banded": windowed_pool_banded}.items():
        sx, sa = ring.x.clone().requires_grad_(), ring.a.clone().requires_grad_()
        out, _ = fn(x, a, mask, ring._replace(x=sx, a=sa), WindowOptions(k))
        out.pow(2).sum().backward()
        grads[name] = (sx.grad, sa.grad)
    for form in ("blocks", "banded"):
        assert_close(f"{form} d state.x", grads[form][0], grads["naive"][0])
        assert_close(f"{form} d state.a", grads[form][1], grads["naive"][1])


def test_a_window_as_long_as_the_sequence_is_the_global_pooling():
    x, a, mask = make_inputs(3, 63, 2, 5, torch.float64, 3.0)
    windowed, _ = windowed_pool_parallel(x, a, mask, None, WindowOptions(63))
    glob, _ = additive_pool_parallel(x, a, mask, None, PoolOptions())
    assert_close("k = T", windowed, glob)


def test_the_difference_of_prefix_sums_fails_where_the_blocks_do_not():
    """The formula as LEAP writes it, (s_i - s_{i-k}) / (z_i - z_{i-k}) with one max, loses the window at +-1e4."""
    B, T, H, D, k = 2, 200, 1, 4, 8
    x, a, _ = make_inputs(B, T, H, D, torch.float32, 1e4)
    ref, _ = windowed_pool_naive(x, a, None, None, WindowOptions(k))
    got, _ = windowed_pool_parallel(x, a, None, None, WindowOptions(k))
    e = torch.exp(a - a.amax(1, keepdim=True)).unsqueeze(-1)  # [B, T, H, 1]: one max for the whole sequence
    s, z = torch.cumsum(e * x, 1), torch.cumsum(e, 1)
    s_win = s - torch.nn.functional.pad(s, (0, 0, 0, 0, k, 0))[:, :T]
    z_win = z - torch.nn.functional.pad(z, (0, 0, k, 0))[:, :T]
    naive_diff = s_win / z_win
    assert (naive_diff - ref).abs().nan_to_num(float("inf")).amax() > 1.0
    assert_close("blocks", got, ref)


def test_the_dispatcher_takes_the_band_for_short_windows(monkeypatch):
    import attnfree.ops.windowed.parallel as parallel

    taken = []
    for name in ("windowed_pool_banded", "windowed_pool_blocks"):
        form = getattr(parallel, name)
        monkeypatch.setattr(parallel, name, lambda *args, form=form, name=name: (taken.append(name), form(*args))[1])
    x, a, _ = make_inputs(2, 5, 1, 3, torch.float64, 1.0)
    for k in (parallel.BANDED_MAX_WINDOW, parallel.BANDED_MAX_WINDOW + 1):
        windowed_pool_parallel(x, a, None, None, WindowOptions(k))
    assert taken == ["windowed_pool_banded", "windowed_pool_blocks"]


def test_options_are_validated():
    with pytest.raises(ValueError, match="window"):
        WindowOptions(0)
    x, a, _ = make_inputs(2, 5, 1, 3, torch.float64, 1.0)
    with pytest.raises(ValueError, match="state.x"):
        windowed_pool_parallel(x, a, None, init_window_state(2, 1, 3, 4), WindowOptions(5))
