"""The decode state of windowed additive pooling, shared by its three forms."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from attnfree.ops.additive.state import DEFAULT_CHUNK_SIZE, check_pool_inputs, state_dtype


class WindowState(NamedTuple):
    """The window's last k entries, oldest first: everything the next position's window can still see.

    x: [B, k, H, D]  values of the last k positions (0 where nothing was seen)
    a: [B, k, H]     their scores (-inf for padding and for positions before the sequence)

    Float32 (float64 for float64 inputs), whatever the input dtype. Constant in the context length.
    """

    x: Tensor
    a: Tensor


@dataclass(frozen=True)
class WindowOptions:
    """What every form of the windowed pooling takes besides the tensors.

    window: k >= 1, the number of positions each output pools (the current one and the k - 1 before it).
    output_final_state: return the state after the last position (for caching).
    chunk_size: chunk length of the stable in-block scans of the parallel form (speed and memory only, not values).
    """

    window: int
    output_final_state: bool = False
    chunk_size: int = DEFAULT_CHUNK_SIZE

    def __post_init__(self) -> None:
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"WindowOptions.window must be an integer >= 1, got {self.window!r}")


def init_window_state(batch: int, heads: int, head_dim: int, window: int, dtype: torch.dtype = torch.float32,
                      device: torch.device | None = None) -> WindowState:
    """An empty window (nothing seen yet): k zero values with score -inf."""
    acc = state_dtype(dtype)
    return WindowState(x=torch.zeros(batch, window, heads, head_dim, dtype=acc, device=device),
                       a=torch.full((batch, window, heads), float("-inf"), dtype=acc, device=device))


def check_window_inputs(x: Tensor, scores: Tensor, mask: Tensor | None, state: WindowState | None,
                        options: WindowOptions) -> None:
    """Shapes: x [B, T, H, D], scores [B, T, H], mask [B, T] bool, state of matching B, k, H, D."""
    check_pool_inputs(x, scores, mask)
    B, _, H, D = x.shape
    if state is not None and state.x.shape != (B, options.window, H, D):
        raise ValueError(f"state.x must be [B, k, H, D] = {(B, options.window, H, D)}, got {tuple(state.x.shape)}")


def masked_scores(scores: Tensor, mask: Tensor | None, dtype: torch.dtype) -> Tensor:
    """scores in ``dtype``, -inf where ``mask`` [B, T] (or [B]) is False: padding weighs exactly 0."""
    a = scores.to(dtype)
    return a if mask is None else a.masked_fill(~mask.bool().unsqueeze(-1), float("-inf"))
