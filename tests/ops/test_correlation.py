"""Causal cross-correlation: naive <-> parallel <-> recurrent (values, final state, gradients), causality,
batch independence, padding, prefill + decoding, extreme inputs and input validation."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

import attnfree.ops.correlation.parallel as correlation_parallel_module
from attnfree.ops.correlation import (
    CorrelationState,
    LagSet,
    correlation_naive,
    correlation_parallel,
    correlation_recurrent,
    correlation_step_,
    init_correlation_state,
    make_lags,
)
from attnfree.testing import assert_close

Op = Callable[..., tuple[torch.Tensor, CorrelationState | None]]
IMPLS: dict[str, Op] = {"naive": correlation_naive, "parallel": correlation_parallel,
                        "recurrent": correlation_recurrent}
B = 3
LAG_SETS = {
    "dense4": make_lags(4, 64),  # 0..3, 4, 8, 16, 32 (parallel: shifted products only)
    "dense8": make_lags(8, 64),  # 0..7, 8, 16, 32 (parallel: block matmuls + shifted products)
    "fib": torch.tensor([0, 1, 2, 3, 5, 8, 13, 50, 120]),  # short dense run, reaches past T = 100
    "default": make_lags(32, 1024),  # 0..31, 32, ..., 512
}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """These tests run thousands of small ops: a second thread only adds synchronisation, and on a loaded
    machine every parallel region can stall for a whole scheduling slice (the suite ran 10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_inputs(T: int, H: int, D: int, dtype: torch.dtype, seed: int = 0, scale: float = 1.0):
    """q, k, v leaves [B, T, H, D] (q, k scaled by ``scale``) and a random upstream gradient do."""
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(B, T, H, D, generator=g, dtype=torch.float64) for _ in range(4))
    leaves = [(x * s).to(dtype).requires_grad_() for x, s in ((q, scale), (k, scale), (v, 1.0))]
    return (*leaves, do.to(dtype))


def mixed_mask(T: int) -> torch.Tensor:
    """[B, T]: sample 0 full, sample 1 left-padded by a third, sample 2 with a hole in the middle."""
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, : T // 3] = False
    mask[2, T // 2 : T // 2 + 3] = False
    return mask


def run(op: Op, q, k, v, do, spec: LagSet, mask=None, state=None):
    """Output, final state and the gradients of (o * do).sum() w.r.t. q, k, v."""
    o, final = op(q, k, v, spec, mask, state, output_final_state=True)
    grads = torch.autograd.grad((o * do).sum(), (q, k, v))
    return o, final, grads


def assert_states_close(
    name: str, actual: CorrelationState | None, expected: CorrelationState | None
) -> None:
    """Every tensor the state holds, and the position counter."""
    assert actual is not None and expected is not None, f"{name}: no final state"
    assert torch.equal(actual.seen, expected.seen), f"{name}: seen {actual.seen} != {expected.seen}"
    assert torch.equal(actual.valid, expected.valid), f"{name}: valid differs"
    for field in ("q", "k", "v"):
        assert_close(f"{name}.{field}", getattr(actual, field), getattr(expected, field))


def assert_runs_close(name: str, actual, expected, rtol: float | None = None) -> None:
    """Outputs, final states and gradients of two ``run`` results."""
    assert_close(f"{name} o", actual[0], expected[0], rtol)
    assert_states_close(f"{name} state", actual[1], expected[1])
    for field, ga, ge in zip("qkv", actual[2], expected[2]):
        assert_close(f"{name} d{field}", ga, ge, rtol)


DTYPES = [pytest.param(torch.float64, id="f64"), pytest.param(torch.float32, id="f32")]
SEGMENTS = [pytest.param(1, id="J1"), pytest.param(4, id="J4")]
SMALL = [  # (T, H, D, lag set): every form, the reference included
    pytest.param(1, 1, 16, "dense4", id="T1-H1-D16"),
    pytest.param(63, 3, 60, "dense8", id="T63-H3-D60"),
    pytest.param(100, 3, 16, "fib", id="T100-H3-D16-lags-past-T"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("segment", SEGMENTS)
@pytest.mark.parametrize("T, H, D, lag_set", SMALL)
def test_forms_match_reference(
    T: int, H: int, D: int, lag_set: str, segment: int, dtype: torch.dtype
) -> None:
    q, k, v, do = make_inputs(T, H, D, dtype)
    lags, mask = LAG_SETS[lag_set], mixed_mask(T)
    expected = run(correlation_naive, q, k, v, do, LagSet(lags, segment), mask)
    assert_runs_close("parallel", run(correlation_parallel, q, k, v, do, LagSet(lags, segment), mask), expected)
    assert_runs_close("recurrent", run(correlation_recurrent, q, k, v, do, LagSet(lags, segment), mask), expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("segment", SEGMENTS)
@pytest.mark.parametrize(
    "masked, H, D", [(False, 1, 16), (True, 3, 60)], ids=["no-mask-H1-D16", "mask-H3-D60"]
)
def test_parallel_matches_recurrent_long(masked: bool, H: int, D: int, segment: int, dtype: torch.dtype) -> None:
    """T = 500 with the default lags (largest lag 512 > T): the reference would be too slow here."""
    T = 500
    q, k, v, do = make_inputs(T, H, D, dtype, seed=1)
    lags, mask = LAG_SETS["default"], (mixed_mask(T) if masked else None)
    expected = run(correlation_recurrent, q, k, v, do, LagSet(lags, segment), mask)
    assert_runs_close("parallel", run(correlation_parallel, q, k, v, do, LagSet(lags, segment), mask), expected)


@pytest.mark.parametrize("min_block", [1, 10**9], ids=["blocks", "shifted"])
@pytest.mark.parametrize("lag_set", ["dense4", "dense8"])
def test_parallel_paths(lag_set: str, min_block: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Dense lags through the block matmuls or through the shifted products: both match the reference."""
    monkeypatch.setattr(correlation_parallel_module, "MIN_BLOCK", min_block)
    q, k, v, do = make_inputs(37, 2, 8, torch.float64)
    lags, mask = LAG_SETS[lag_set], mixed_mask(37)
    expected = run(correlation_naive, q, k, v, do, LagSet(lags, 4), mask)
    assert_runs_close("parallel", run(correlation_parallel, q, k, v, do, LagSet(lags, 4), mask), expected)


@pytest.mark.parametrize("name", ["parallel", "recurrent"])
def test_no_mask_equals_all_true_mask(name: str) -> None:
    q, k, v, _ = make_inputs(40, 2, 8, torch.float64)
    lags, op = LAG_SETS["dense4"], IMPLS[name]
    expected, _ = op(q, k, v, LagSet(lags, 4), torch.ones(B, 40, dtype=torch.bool))
    assert_close(name, op(q, k, v, LagSet(lags, 4))[0], expected)


@pytest.mark.parametrize("name", ["parallel", "recurrent"])
def test_causal(name: str) -> None:
    """Changing token j (its q, k and v) never changes the outputs before j."""
    T, j = 50, 20
    q, k, v, _ = make_inputs(T, 2, 8, torch.float64)
    lags, op = LAG_SETS["dense4"], IMPLS[name]
    o, _ = op(q, k, v, LagSet(lags, 4))
    q2, k2, v2 = (x.detach().clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[:, j] += 10.0
    o2, _ = op(q2, k2, v2, LagSet(lags, 4))
    assert torch.equal(o[:, :j], o2[:, :j])
    assert not torch.allclose(o[:, j], o2[:, j])


@pytest.mark.parametrize("name", ["parallel", "recurrent"])
def test_no_batch_mixing(name: str) -> None:
    """Changing sample 1 (inputs and mask) never changes samples 0 and 2."""
    T = 40
    q, k, v, _ = make_inputs(T, 2, 8, torch.float64)
    lags, op, mask = LAG_SETS["dense4"], IMPLS[name], mixed_mask(T)
    o, _ = op(q, k, v, LagSet(lags, 4), mask)
    q2, k2, v2 = (x.detach().clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[1] = torch.randn_like(x[1])
    mask2 = mask.clone()
    mask2[1] = True
    o2, _ = op(q2, k2, v2, LagSet(lags, 4), mask2)
    assert torch.equal(o[[0, 2]], o2[[0, 2]])


@pytest.mark.parametrize("name", ["naive", "parallel", "recurrent"])
@pytest.mark.parametrize("segment", SEGMENTS)
def test_left_padding_equals_unpadded(name: str, segment: int) -> None:
    """A left-padded sequence gives, at its real positions, the outputs of the sequence alone."""
    T, lengths = 24, [24, 17, 5]
    q, k, v, _ = make_inputs(T, 2, 8, torch.float64, scale=3.0)
    mask = torch.arange(T)[None, :] >= torch.tensor([T - n for n in lengths])[:, None]
    lags, op = LAG_SETS["dense4"], IMPLS[name]
    q, k, v = (torch.where(mask[..., None, None], x, torch.randn_like(x)) for x in (q, k, v))  # junk in pads
    o, _ = op(q, k, v, LagSet(lags, segment), mask)
    for b, n in enumerate(lengths):
        alone, _ = op(q[b : b + 1, T - n :], k[b : b + 1, T - n :], v[b : b + 1, T - n :], LagSet(lags, segment))
        assert_close(f"sample {b}", o[b : b + 1, T - n :], alone)
    assert torch.equal(o[~mask], torch.zeros_like(o[~mask]))  # nothing real before a left pad


@pytest.mark.parametrize("lag_set", ["dense4", "dense8"])
@pytest.mark.parametrize("split", [1, 9, 40], ids=["split1", "split9", "split40"])
def test_prefill_then_steps_equals_full(split: int, lag_set: str) -> None:
    """Parallel prefill of the first ``split`` tokens, then one token at a time == parallel on everything."""
    T, H, D, segment = 60, 2, 8, 4
    q, k, v, _ = make_inputs(T, H, D, torch.float64)
    lags, mask = LAG_SETS[lag_set], mixed_mask(T)
    expected, expected_state = correlation_parallel(q, k, v, LagSet(lags, segment), mask, output_final_state=True)
    o, state = correlation_parallel(q[:, :split], k[:, :split], v[:, :split], LagSet(lags, segment), mask[:, :split],
                                    output_final_state=True)
    outs = [o]
    assert state is not None
    for t in range(split, T):
        o_t, state = correlation_step_(q[:, t], k[:, t], v[:, t], LagSet(lags, segment), mask[:, t], state)
        outs.append(o_t[:, None])
    assert_close("decoded", torch.cat(outs, 1), expected)
    assert_states_close("state", state, expected_state)


@pytest.mark.parametrize("name", ["naive", "parallel", "recurrent"])
@pytest.mark.parametrize("split", [3, 30], ids=["split3", "split30"])
def test_chunked_prefill_equals_full(name: str, split: int) -> None:
    """Two calls chained through initial_state == one call (outputs and final state)."""
    T, segment = 45, 4
    q, k, v, _ = make_inputs(T, 2, 8, torch.float64)
    lags, mask, op = LAG_SETS["dense8"], mixed_mask(T), IMPLS[name]
    expected, expected_state = op(q, k, v, LagSet(lags, segment), mask, output_final_state=True)
    o1, state = op(q[:, :split], k[:, :split], v[:, :split], LagSet(lags, segment), mask[:, :split],
                   output_final_state=True)
    o2, state = op(q[:, split:], k[:, split:], v[:, split:], LagSet(lags, segment), mask[:, split:], state,
                   output_final_state=True)
    assert_close("chunked", torch.cat([o1, o2], 1), expected)
    assert_states_close("state", state, expected_state)


def test_recurrent_does_not_modify_initial_state() -> None:
    q, k, v, _ = make_inputs(10, 2, 8, torch.float64)
    lags = LAG_SETS["dense4"]
    _, state = correlation_parallel(q, k, v, LagSet(lags, 4), output_final_state=True)
    assert state is not None
    before = state.clone()
    correlation_recurrent(q, k, v, LagSet(lags, 4), initial_state=state)
    assert_states_close("initial_state", state, before)


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, None), (torch.float32, 1e-3)], ids=["f64", "f32"])
@pytest.mark.parametrize("name", ["parallel", "recurrent"])
def test_extreme_inputs(name: str, dtype: torch.dtype, rtol: float | None) -> None:
    """q, k scaled x100: near one-hot weights stay finite and match the reference (float32: looser)."""
    T = 30
    q, k, v, do = make_inputs(T, 2, 16, dtype, scale=100.0)
    lags, mask = LAG_SETS["dense4"], mixed_mask(T)
    actual = run(IMPLS[name], q, k, v, do, LagSet(lags, 4), mask)
    expected = run(correlation_naive, q, k, v, do, LagSet(lags, 4), mask)
    assert_close("o", actual[0], expected[0], rtol)
    for field, ga, ge in zip("qkv", actual[2], expected[2]):
        assert torch.isfinite(ga).all(), f"d{field} not finite"
        assert_close(f"d{field}", ga, ge, None if rtol is None else 10 * rtol)


@pytest.mark.parametrize("name", ["naive", "parallel", "recurrent"])
def test_fully_masked_rows_give_zero(name: str) -> None:
    """A sample with no real token gives 0 and finite (zero) gradients, never NaN."""
    q, k, v, do = make_inputs(12, 2, 8, torch.float32)
    mask = torch.ones(B, 12, dtype=torch.bool)
    mask[1] = False
    o, _, grads = run(IMPLS[name], q, k, v, do, LagSet(LAG_SETS["dense4"], 4), mask)
    assert torch.equal(o[1], torch.zeros_like(o[1]))
    for g in grads:
        assert torch.equal(g[1], torch.zeros_like(g[1]))


def test_make_lags() -> None:
    assert make_lags(32, 1024).tolist() == list(range(32)) + [32, 64, 128, 256, 512]
    assert make_lags(4, 20).tolist() == [0, 1, 2, 3, 4, 8, 16]
    assert make_lags(32, 10).tolist() == list(range(10))  # dense lags clipped below max_positions
    assert make_lags(1, 1).tolist() == [0]
    assert make_lags().dtype == torch.long


@pytest.mark.parametrize("dense, max_positions", [(0, 10), (4, 0)], ids=["dense0", "max0"])
def test_make_lags_rejects(dense: int, max_positions: int) -> None:
    with pytest.raises(ValueError):
        make_lags(dense, max_positions)


def test_init_state_shapes() -> None:
    state = init_correlation_state(2, 3, 8, LagSet(LAG_SETS["dense4"], 4), dtype=torch.float64)
    assert state.q.shape == (2, 4, 3, 8) and state.k.shape == (2, 36, 3, 8) and state.v.shape == (2, 33, 3, 8)
    assert state.valid.shape == (2, 36) and not state.valid.any() and state.seen.tolist() == [0, 0]
    assert state.k.dtype == torch.float64


# name -> a bad lag set or segment length: refused when the LagSet is made, before any form runs
BAD_LAG_SETS: dict[str, dict[str, Any]] = {
    "lags-unsorted": {"lags": torch.tensor([0, 2, 1])},
    "lags-not-from-0": {"lags": torch.tensor([1, 2, 3])},
    "lags-negative": {"lags": torch.tensor([-1, 0, 1])},
    "lags-repeated": {"lags": torch.tensor([0, 1, 1])},
    "lags-empty": {"lags": torch.tensor([], dtype=torch.long)},
    "lags-float": {"lags": torch.tensor([0.0, 1.0])},
    "lags-2d": {"lags": torch.tensor([[0, 1]])},
    "segment-0": {"lags": (0, 1), "segment": 0},
    "segment-negative": {"lags": (0, 1), "segment": -2},
}


@pytest.mark.parametrize("bad", list(BAD_LAG_SETS))
def test_a_bad_lag_set_is_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        LagSet(**BAD_LAG_SETS[bad])


# name -> keyword overrides of a good call (q, k, v [2, 5, 2, 4], dense4 lags, J=4)
BAD_CALLS: dict[str, dict[str, Any]] = {
    "k-shape": {"k": torch.zeros(2, 5, 2, 3)},
    "v-shape": {"v": torch.zeros(2, 6, 2, 4)},
    "q-3d": {"q": torch.zeros(2, 5, 8), "k": torch.zeros(2, 5, 8), "v": torch.zeros(2, 5, 8)},
    "mask-shape": {"mask": torch.ones(2, 4, dtype=torch.bool)},
    "mask-dtype": {"mask": torch.ones(2, 5)},
    "state-shape": {"initial_state": init_correlation_state(2, 2, 4, LagSet((0, 1), 4))},
}


@pytest.mark.parametrize("name", ["naive", "parallel", "recurrent"])
@pytest.mark.parametrize("bad", list(BAD_CALLS))
def test_rejects_bad_inputs(name: str, bad: str) -> None:
    x = torch.zeros(2, 5, 2, 4)
    args: dict[str, Any] = {"q": x, "k": x, "v": x, "spec": LagSet(LAG_SETS["dense4"], 4)}
    args.update(BAD_CALLS[bad])
    with pytest.raises(ValueError):
        IMPLS[name](**args)


def test_step_rejects_mismatched_state() -> None:
    state = init_correlation_state(2, 2, 4, LagSet(LAG_SETS["dense4"], 2))
    x = torch.zeros(2, 2, 4)
    with pytest.raises(ValueError):
        correlation_step_(x, x, x, LagSet(LAG_SETS["dense4"], 4), None, state)


@pytest.mark.parametrize("form", ["naive", "parallel", "recurrent"])
@pytest.mark.parametrize("kind", [torch.tensor, tuple, list], ids=["tensor", "tuple", "list"])
def test_every_form_takes_every_lag_type(form: str, kind) -> None:
    """One lag type across the forms: a LagSet made of a tensor, a tuple or a list of ints holds the same ints and
    gives the same values everywhere."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 9, 2, 3, generator=g, dtype=torch.float64) for _ in range(3))
    spec = LagSet(kind([0, 1, 4]), 2)
    assert spec == LagSet((0, 1, 4), 2) and all(type(lag) is int for lag in spec.lags)
    expected = IMPLS["naive"](q, k, v, LagSet(torch.tensor([0, 1, 4]), 2))[0]
    got = IMPLS[form](q, k, v, spec)[0]
    assert_close(f"{form} with {kind.__name__} lags", got, expected)
