"""The Fastformer attention sublayer against its equations: the two poolings, the residual of either preset, the
recency bias, the current-token bonus and token shift. (Its state and paths: tests/layers/test_sublayer.py.)"""

from __future__ import annotations

import math

import pytest
import torch

from attnfree.layers.additive_attention import FastformerAttention, alibi_log_slopes
from attnfree.layers.sublayer import BlockContext
from attnfree.ops.additive import additive_pool_naive
from attnfree.testing import assert_close, perturb

C, H, D = 12, 3, 4


def layer(**kw) -> FastformerAttention:
    torch.manual_seed(0)
    return perturb(FastformerAttention(C, H, 0.0, 1e-5, 4, **kw), std=0.3).double().eval()


def inputs(B: int = 2, T: int = 9) -> tuple[torch.Tensor, BlockContext]:
    x = torch.randn(B, T, C, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return x, BlockContext(None, torch.arange(T).expand(B, T))


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
        return additive_pool_naive(yh, a)[0].reshape(B, T, C)

    r = (x if attn.residual == "raw" else n) + attn.out_proj(pool(q, attn.query_score, 0)) * k
    return r + pool(attn.mid_norm(r), attn.key_score, 1) * v - x


@pytest.mark.parametrize("kw", [{}, {"decay": "none"}, {"decay": "fixed"}, {"residual": "normed", "decay": "none"}],
                         ids=["learned", "no-decay", "fixed", "seed"])
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
