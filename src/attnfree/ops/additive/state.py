"""The recurrent state of causal additive attention, shared by all three forms."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


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


def check_inputs(x: Tensor, scores: Tensor, mask: Tensor | None, state: AdditiveState | None) -> None:
    """Shapes: x [B, T, H, D], scores [B, T, H], mask [B, T] bool, state of matching B, H, D."""
    if x.dim() != 4:
        raise ValueError(f"x must be [B, T, H, D], got shape {tuple(x.shape)}")
    if scores.shape != x.shape[:3]:
        raise ValueError(f"scores must be [B, T, H] = {tuple(x.shape[:3])}, got {tuple(scores.shape)}")
    if mask is not None and mask.shape != x.shape[:2]:
        raise ValueError(f"mask must be [B, T] = {tuple(x.shape[:2])}, got {tuple(mask.shape)}")
    if state is not None and state.s.shape != (x.shape[0], x.shape[2], x.shape[3]):
        raise ValueError(f"state.s must be [B, H, D] = {(x.shape[0], x.shape[2], x.shape[3])}, "
                         f"got {tuple(state.s.shape)}")
