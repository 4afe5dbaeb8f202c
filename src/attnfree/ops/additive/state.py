"""The recurrent state of causal additive attention, shared by all three forms."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

DEFAULT_CHUNK_SIZE = 32


class AdditiveState(NamedTuple):
    """Running sums of one causal additive pooling, relative to the running max score.

    s: [B, H, D]  sum_j exp(a_j - m) x_j
    z: [B, H]     sum_j exp(a_j - m)
    m: [B, H]     max_j a_j over the valid positions seen so far (-inf before any)

    All three are float32 (float64 when the inputs are float64), whatever the input dtype.
    """

    s: Tensor
    z: Tensor
    m: Tensor


@dataclass(frozen=True)
class PoolOptions:
    """What every form of the additive pooling takes besides the tensors (one object, one signature).

    output_final_state: return the state after the last position (for caching).
    bonus: [H] or None: RWKV's current-token bonus u, the current token's weight times e^u in the read-out only
        (``read_out_bonus``); the state never holds it.
    chunk_size: chunk length of the chunked forms (parallel, Triton): speed and memory only, not values.
    """

    output_final_state: bool = False
    bonus: Tensor | None = None
    chunk_size: int = DEFAULT_CHUNK_SIZE


NO_OPTIONS = PoolOptions()


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def init_additive_state(
    batch: int, heads: int, head_dim: int, dtype: torch.dtype = torch.float32, device: torch.device | None = None
) -> AdditiveState:
    """An empty state (nothing seen yet): s = 0, z = 0, m = -inf."""
    acc = state_dtype(dtype)
    return AdditiveState(
        s=torch.zeros(batch, heads, head_dim, dtype=acc, device=device),
        z=torch.zeros(batch, heads, dtype=acc, device=device),
        m=torch.full((batch, heads), float("-inf"), dtype=acc, device=device),
    )


def finite_or_zero(m: Tensor) -> Tensor:
    """Replace -inf maxima by 0 so that exp(a - m) is 0 (not NaN) when every a is -inf too."""
    return torch.where(torch.isneginf(m), torch.zeros_like(m), m)


def safe_divide(s: Tensor, z: Tensor) -> Tensor:
    """s / z with 0 where nothing was pooled yet (z == 0): padding at the start gives 0, never 0/0."""
    z = z.unsqueeze(-1)
    return torch.where(z > 0, s / torch.where(z > 0, z, torch.ones_like(z)), torch.zeros_like(s))


def check_pool_inputs(x: Tensor, scores: Tensor, mask: Tensor | None) -> None:
    """Shapes every pooling takes: x [B, T, H, D], scores [B, T, H], mask [B, T] bool."""
    if x.dim() != 4:
        raise ValueError(f"x must be [B, T, H, D], got shape {tuple(x.shape)}")
    if scores.shape != x.shape[:3]:
        raise ValueError(f"scores must be [B, T, H] = {tuple(x.shape[:3])}, got {tuple(scores.shape)}")
    if mask is not None and mask.shape != x.shape[:2]:
        raise ValueError(f"mask must be [B, T] = {tuple(x.shape[:2])}, got {tuple(mask.shape)}")


def check_inputs(x: Tensor, scores: Tensor, mask: Tensor | None, state: AdditiveState | None) -> None:
    """Shapes: x [B, T, H, D], scores [B, T, H], mask [B, T] bool, state of matching B, H, D."""
    check_pool_inputs(x, scores, mask)
    if state is not None and state.s.shape != (x.shape[0], x.shape[2], x.shape[3]):
        raise ValueError(f"state.s must be [B, H, D] = {(x.shape[0], x.shape[2], x.shape[3])}, "
                         f"got {tuple(state.s.shape)}")


def read_out_bonus(s_prev: Tensor, z_prev: Tensor, m_prev: Tensor, x: Tensor, a: Tensor, bonus: Tensor) -> Tensor:
    """The output with a current-token bonus u (RWKV's u): the current token pooled with weight e^(a + u) beside the
    sums of everything before it, g = (S_prev + e^(a+u) x) / (Z_prev + e^(a+u)); the state itself never holds u.

    From the sums before the token (s_prev, z_prev relative to m_prev), not by taking the token out of the sums after
    it: no difference of nearly equal numbers, for any u. Exponents are relative to M = max(m_prev, a + u), so none is
    positive. s_prev: [..., D], z_prev, m_prev, a: [...] (a = -inf where the position is padding: no current token
    there), x: [..., D], bonus broadcastable to a. Returns g [..., D] (0 where nothing was pooled).
    """
    b = a + bonus.to(a.dtype)
    top = finite_or_zero(torch.maximum(m_prev, b)).detach()  # a reference point only: it cancels
    e_prev, e_now = torch.exp(m_prev - top), torch.exp(b - top)
    return safe_divide(s_prev * e_prev.unsqueeze(-1) + e_now.unsqueeze(-1) * x, z_prev * e_prev + e_now)
