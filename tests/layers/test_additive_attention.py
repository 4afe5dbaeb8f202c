"""The Fastformer attention sublayer against its equations: the two poolings, the residual of either preset, the
recency bias, the current-token bonus and token shift. (Its state and paths: tests/layers/test_sublayer.py.)"""

from __future__ import annotations

import math

import pytest
import torch

from attnfree.layers.additive_attention import LEAP_RESCALE, FastformerAttention, LeapAttention, alibi_log_slopes
from attnfree.layers.sublayer import BlockContext
from attnfree.ops.additive import additive_pool_naive
from attnfree.ops.windowed import WindowOptions, windowed_pool_naive
from attnfree.testing import assert_close, perturb

C, H, D = 12, 3, 4


def layer(**kw) -> FastformerAttention:
    torch.manual_seed(0)
    return perturb(FastformerAttention(C, H, 0.0, 1e-5, 4, **kw), std=0.3).double().eval()


def inputs(B: int = 2, T: int = 9) -> tuple[torch.Tensor, BlockContext]:
    x = torch.randn(B, T, C, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return x, BlockContext(None, torch.arange(T).expand(B, T))


def reference_pool(yh: torch.Tensor, a: torch.Tensor, window: int | None) -> torch.Tensor:
    """The float64 reference pooling of yh [B, T, H, D'] under a [B, T, H]: global, or over the last k positions."""
    if window is None:
        return additive_pool_naive(yh, a)[0]
    return windowed_pool_naive(yh, a, None, None, WindowOptions(window))[0]


def by_hand(attn: FastformerAttention, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The module docstring's steps 1-5 with the float64 reference pooling, minus x (the branch)."""
    B, T, _ = x.shape
    n = attn.attn_norm(x)
    q, k, v = attn.qkv(n).chunk(3, -1)

    def pool(y: torch.Tensor, w: torch.Tensor, row: int) -> torch.Tensor:
        yh = y.view(B, T, H, D)
        a = (yh * w.view(H, D)).sum(-1) / math.sqrt(D)
        if attn.decay != "none":
            a = a + positions[..., None] * attn.log_slopes[row].exp()
        return reference_pool(yh, a, attn.window).reshape(B, T, C)

    r = (x if attn.residual == "raw" else n) + attn.out_proj(pool(q, attn.query_score, 0)) * k
    return r + pool(attn.mid_norm(r), attn.key_score, 1) * v - x


@pytest.mark.parametrize("kw", [{}, {"decay": "none"}, {"decay": "fixed"}, {"residual": "normed", "decay": "none"},
                                {"window": 3}, {"window": 1, "decay": "none"}],
                         ids=["learned", "no-decay", "fixed", "seed", "window3", "window1"])
def test_the_branch_is_the_equations(kw) -> None:
    attn = layer(**kw)
    x, ctx = inputs()
    with torch.no_grad():
        assert_close(str(kw), attn(x, ctx), by_hand(attn, x, ctx.positions))


def test_initial_values_pool_uniformly_with_alibi_slopes() -> None:
    attn = FastformerAttention(C, H, 0.0, 1e-5, 4, bonus=True, token_shift=True)
    assert not attn.query_score.any() and not attn.key_score.any() and not attn.bonus.any()
    assert torch.equal(attn.log_slopes, alibi_log_slopes(H).repeat(2, 1))
    assert torch.equal(attn.time_mix, torch.full((3, C), 0.5))
    fixed = FastformerAttention(C, H, 0.0, 1e-5, 4, decay="fixed")
    assert "log_slopes" not in fixed.state_dict() and torch.equal(fixed.log_slopes, alibi_log_slopes(H).repeat(2, 1))


def test_a_zero_bonus_and_a_shift_that_keeps_the_current_input_change_nothing() -> None:
    plain, options = layer(), layer(bonus=True, token_shift=True)
    options.load_state_dict({**plain.state_dict(), "bonus": torch.zeros(2, H, dtype=torch.float64),
                             "time_mix": torch.ones(3, C, dtype=torch.float64)}, strict=True)
    x, ctx = inputs()
    with torch.no_grad():  # (a zero bonus is no bonus; a mix of 1 takes the current position's input alone)
        assert_close("options off", options(x, ctx), plain(x, ctx))


def test_the_shift_feeds_the_previous_position() -> None:
    """With mixes of 0, q, k, v at position t are those of position t - 1 (zeros at the start)."""
    attn = layer(token_shift=True)
    with torch.no_grad():
        attn.time_mix.zero_()
    x, ctx = inputs()
    n = attn.attn_norm(x)
    q, k, v = attn.inputs(n, ctx, None)
    expected = attn.qkv(torch.cat([torch.zeros_like(n[:, :1]), n[:, :-1]], 1)).chunk(3, dim=-1)
    for name, got, want in zip("qkv", (q, k, v), expected, strict=True):
        assert_close(name, got, want)


@pytest.mark.parametrize("name, value", [("residual", "Raw"), ("decay", "learnd")])
def test_modes_are_checked(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=rf"FastformerAttention\.{name} must be one of"):
        FastformerAttention(C, H, 0.0, 1e-5, 4, **{name: value})


def test_a_window_as_long_as_the_sequence_is_the_global_layer() -> None:
    x, ctx = inputs(T=9)
    with torch.no_grad():
        assert_close("window 9", layer(window=9)(x, ctx), layer()(x, ctx))
        assert (layer(window=4)(x, ctx) - layer()(x, ctx)).abs().amax() > 1e-3  # and a shorter one is not


@pytest.mark.parametrize("window", [-1, 2.5, True])
def test_windows_are_checked(window) -> None:
    with pytest.raises(ValueError, match="window must be"):
        FastformerAttention(C, H, 0.0, 1e-5, 4, window=window)
    with pytest.raises(ValueError, match="bonus"):
        FastformerAttention(C, H, 0.0, 1e-5, 4, bonus=True, window=4)


# ----------------------------------------------------------------------------------------------
# LEAP
# ----------------------------------------------------------------------------------------------


def leap(**kw) -> LeapAttention:
    torch.manual_seed(0)
    return perturb(LeapAttention(C, H, 0.0, 1e-5, 4, **kw), std=0.3).double().eval()


def leap_by_hand(attn: LeapAttention, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """LeapAttention's class docstring, steps 1-3, with separate matrices and the float64 reference pooling."""
    B, T, _ = x.shape
    n = attn.attn_norm(x)
    pieces = {name: (n @ w.T).view(B, T, H, D) for name, w in zip(attn.pieces, attn.proj.weight.chunk(
        len(attn.pieces)), strict=True)}
    k, v = pieces["k"], pieces["v"]
    if attn.focus == "vector":
        a = (k * attn.focus_vector.view(H, D)).sum(-1) / math.sqrt(D)
    elif attn.focus == "dot":
        a = (pieces["f"] * k).sum(-1) / math.sqrt(D)
    else:
        def standard(t: torch.Tensor) -> torch.Tensor:
            return (t - t.mean(-1, keepdim=True)) / (t.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
        a = (standard(pieces["f"]) * standard(k)).sum(-1) * attn.log_rescale.exp() / D
    if attn.decay != "none":
        a = a + positions[..., None] * attn.log_slopes.exp()
    g_v = reference_pool(v, a, attn.window)
    if not attn.alignment:
        return g_v.reshape(B, T, C)
    g_k = reference_pool(k, a, attn.window)
    gate = torch.sigmoid((pieces["q"] * g_k).sum(-1, keepdim=True) / math.sqrt(D))
    return (gate * g_v).reshape(B, T, C)


@pytest.mark.parametrize("kw", [{}, {"window": 3}, {"window": 2, "focus": "normed_dot"},
                                {"focus": "vector", "alignment": False, "window": 4, "decay": "none"},
                                {"alignment": False, "decay": "fixed"}],
                         ids=["global", "window3", "window2-normed", "window4-plain", "no-alignment"])
def test_leap_is_the_equations(kw) -> None:
    attn = leap(**kw)
    x, ctx = inputs()
    with torch.no_grad():
        assert_close(str(kw), attn(x, ctx), leap_by_hand(attn, x, ctx.positions))


def test_leap_builds_only_the_pieces_it_uses() -> None:
    full, plain = LeapAttention(C, H, 0.0, 1e-5, 4), LeapAttention(C, H, 0.0, 1e-5, 4, focus="vector", alignment=False)
    assert full.pieces == ("q", "f", "k", "v") and full.proj.out_features == 4 * C
    assert plain.pieces == ("k", "v") and not plain.focus_vector.any()
    normed = LeapAttention(C, H, 0.0, 1e-5, 4, focus="normed_dot")
    assert torch.allclose(normed.log_rescale.exp(), torch.full((H,), LEAP_RESCALE))
    with pytest.raises(ValueError, match=r"LeapAttention\.focus must be one of"):
        LeapAttention(C, H, 0.0, 1e-5, 4, focus="dots")
