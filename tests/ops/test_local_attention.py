"""Sliding-window attention: reference <-> chunked <-> step, values and every gradient, state included."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from attnfree.ops.local_attention import (
    LocalState,
    WindowOptions,
    init_local_state,
    local_attention_chunked,
    local_attention_naive,
    local_attention_recurrent,
    rotary,
)
from attnfree.ops.local_attention.chunked import MIN_BLOCK
from attnfree.testing import assert_close

FORMS = {"chunked": local_attention_chunked, "recurrent": local_attention_recurrent}


def inputs(B: int, T: int, H: int, D: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """q, k, v [B, T, H, D] float64 with gradients; mask [B, T] (row 1 left-padded by T // 3, row 2 by T - 2)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, D, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3))
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, : T // 3] = False
    if B > 2:
        mask[2, : max(0, T - 2)] = False
    return q, k, v, mask


# every window (1, 3, 16, beyond T) at T = 1, 63, 500 and odd and even head sizes; the token loop once at T = 500
CASES = [(form, w, T, D) for form in sorted(FORMS) for w in (1, 3, 16, 600) for T in (1, 63, 500) for D in (5, 8)
         if form == "chunked" or T < 500 or (w, D) == (16, 5)]


@pytest.mark.parametrize("form,w,T,D", CASES, ids=[f"{f}-w{w}-T{T}-D{D}" for f, w, T, D in CASES])
def test_forms_match_the_reference_in_values_state_and_gradients(form: str, w: int, T: int, D: int) -> None:
    q, k, v, mask = inputs(3, T, 2, D)
    opts = WindowOptions(w, output_final_state=True)
    ref, ref_state = local_attention_naive(q, k, v, mask, None, opts)
    out, state = FORMS[form](q, k, v, mask, None, opts)
    assert_close(f"{form} o", out, ref)
    for name in ("k", "v"):
        assert_close(f"{form} state.{name}", getattr(state, name), getattr(ref_state, name))
    assert torch.equal(state.valid, ref_state.valid)
    do = torch.randn_like(ref)
    dref = torch.autograd.grad((ref * do).sum(), (q, k, v))
    dout = torch.autograd.grad((out * do).sum(), (q, k, v))
    for name, a, b in zip("qkv", dout, dref, strict=True):
        assert_close(f"{form} d{name}", a, b)


def test_the_reference_is_the_equation_written_as_a_loop() -> None:
    """The reference against a per-query loop over the window (one row left-padded)."""
    q, k, v, mask = inputs(3, 20, 2, 3)
    w = 5
    ref, _ = local_attention_naive(q, k, v, mask, None, WindowOptions(w))
    for b in range(3):
        for i in range(20):
            keys = [j for j in range(max(0, i - w + 1), i + 1) if mask[b, j]]
            for h in range(2):
                expected = torch.zeros(3, dtype=torch.float64)
                if keys:
                    s = torch.stack([q[b, i, h] @ k[b, j, h] / 3 ** 0.5 for j in keys])
                    expected = torch.softmax(s, 0) @ torch.stack([v[b, j, h] for j in keys])
                assert_close(f"o[{b},{i},{h}]", ref[b, i, h], expected)


@pytest.mark.parametrize("form", ["naive", *sorted(FORMS)])
@pytest.mark.parametrize("w", [1, 3, 16, 40])
def test_prefill_in_pieces_equals_the_whole(form: str, w: int) -> None:
    fn = {"naive": local_attention_naive, **FORMS}[form]
    q, k, v, mask = inputs(3, 37, 2, 4)
    opts = WindowOptions(w, output_final_state=True)
    whole, whole_state = fn(q, k, v, mask, None, opts)
    state: LocalState | None = None
    pieces = []
    for s, e in [(0, 7), (7, 8), (8, 30), (30, 37)]:
        o, state = fn(q[:, s:e], k[:, s:e], v[:, s:e], mask[:, s:e], state, opts)
        pieces.append(o)
    assert_close(f"{form} pieces", torch.cat(pieces, 1), whole)
    assert state is not None and whole_state is not None
    assert_close(f"{form} state", state.k, whole_state.k)
    assert torch.equal(state.valid, whole_state.valid)


def test_an_empty_state_is_a_start_and_a_padded_row_is_the_row_alone() -> None:
    q, k, v, mask = inputs(3, 30, 2, 4)
    opts = WindowOptions(6)
    fresh, _ = local_attention_chunked(q, k, v, mask, None, opts)
    empty = init_local_state(3, 6, 2, 4, torch.float64)
    from_init, _ = local_attention_chunked(q, k, v, mask, empty, opts)
    assert_close("from init_state", from_init, fresh)
    alone, _ = local_attention_chunked(q[1:2, 10:], k[1:2, 10:], v[1:2, 10:], None, None, opts)
    assert_close("padded row", fresh[1, 10:], alone[0])
    assert torch.equal(fresh[2, :28], torch.zeros_like(fresh[2, :28]))  # nothing to attend: 0


def test_memory_is_linear_in_T_the_chunked_form_never_builds_T_by_T() -> None:
    """Every tensor the chunked form saves for backward is at most [B, N, H, c, 2c] = 2 B H T c entries, not T^2."""
    T = 4096
    q, k, v = (torch.randn(1, T, 1, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    sizes: list[int] = []

    def pack(t: Tensor) -> Tensor:
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        local_attention_chunked(q, k, v, None, None, WindowOptions(8))
    assert max(sizes) <= 2 * T * MIN_BLOCK, max(sizes)


def test_window_options_are_validated() -> None:
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="WindowOptions.window"):
            WindowOptions(bad)  # type: ignore[arg-type]
    q, k, v, _ = inputs(2, 5, 2, 4)
    with pytest.raises(ValueError, match="state.k must be"):
        local_attention_chunked(q, k, v, None, init_local_state(2, 3, 2, 4, torch.float64), WindowOptions(4))


def test_rotary_makes_scores_depend_on_the_position_difference_only() -> None:
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 1, 2, 7, generator=g, dtype=torch.float64) for _ in range(2))
    at = lambda x, p: rotary(x, torch.tensor([[p]]))  # noqa: E731
    s1 = (at(q, 10) * at(k, 7)).sum(-1)
    s2 = (at(q, 1003) * at(k, 1000)).sum(-1)
    assert_close("relative", s1, s2)
    assert_close("norm kept", at(q, 5).norm(dim=-1), q.norm(dim=-1))
    assert not torch.allclose(s1, (at(q, 10) * at(k, 6)).sum(-1))
