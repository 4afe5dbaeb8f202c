"""Rotary position embedding (Su et al. 2021, RoFormer eq. 34) at given positions: q . k then depends on the
positions' difference only, so a state's stored keys stay valid however far decoding goes."""

from __future__ import annotations

import torch
from torch import Tensor

ROTARY_BASE = 10000.0


def rotary_angles(positions: Tensor, head_dim: int, dtype: torch.dtype, base: float = ROTARY_BASE
                  ) -> tuple[Tensor, Tensor]:
    """cos and sin [B, T, 1, D'/2] of the angles positions * base^(-2i / D'), D' = 2 floor(D / 2), in ``dtype``
    (computed in at least float32). positions: [B, T]."""
    half = head_dim // 2
    acc = torch.promote_types(dtype, torch.float32)
    inv_freq = base ** (-torch.arange(half, device=positions.device, dtype=acc) / max(half, 1))  # [D'/2]
    angles = positions.to(acc)[..., None, None] * inv_freq  # [B, T, 1, D'/2]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, T, H, D] rotated pairwise (channel i with channel i + D'/2) by ``rotary_angles``; an odd head's last
    channel is left as it is."""
    D = x.shape[-1]
    half = D // 2
    if half == 0:
        return x
    x1, x2 = x[..., :half], x[..., half:2 * half]
    rotated = [x1 * cos - x2 * sin, x1 * sin + x2 * cos]
    # (an empty slice for even D would be a zero-sized tensor in an exported graph: some runtimes divide by its size)
    return torch.cat(rotated + ([x[..., 2 * half:]] if D % 2 else []), -1)


def rotary(x: Tensor, positions: Tensor, base: float = ROTARY_BASE) -> Tensor:
    """x [B, T, H, D] rotated to its positions [B, T] (``rotary_angles`` then ``rotate``)."""
    return rotate(x, *rotary_angles(positions, x.shape[-1], x.dtype, base))
