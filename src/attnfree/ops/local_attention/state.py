"""The decoding state of sliding-window attention and the options every form takes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor


class LocalState(NamedTuple):
    """The keys and values of the last w positions, oldest first (a shift register: the newest entry is always last,
    so a step needs no per-row write index and traces to ONNX as a slice and a concatenation).

    k, v: [B, w, H, D]  keys (as attended: after any rotary embedding) and values, in the inputs' dtype
    valid: [B, w] bool  True where the entry is a real token (False: padding, or not seen yet)
    """

    k: Tensor
    v: Tensor
    valid: Tensor


@dataclass(frozen=True)
class WindowOptions:
    """What every form of the sliding-window attention takes besides the tensors (one object, one signature).

    window: w, the positions each query sees: itself and the w - 1 before it (w >= 1; w >= T is plain causal
        attention over the sequence, still with a state of w entries).
    output_final_state: return the state after the last position (for caching).
    """

    window: int
    output_final_state: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 1:
            raise ValueError(f"WindowOptions.window must be a positive integer, got {self.window!r}")


def init_local_state(batch: int, window: int, heads: int, head_dim: int, dtype: torch.dtype = torch.float32,
                     device: torch.device | None = None) -> LocalState:
    """Nothing seen: w zero keys and values, none valid."""
    zeros = torch.zeros(batch, window, heads, head_dim, dtype=dtype, device=device)
    return LocalState(zeros, zeros.clone(), torch.zeros(batch, window, dtype=torch.bool, device=device))


def check_inputs(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, state: LocalState | None,
                 options: WindowOptions) -> None:
    """Shapes: q, k, v [B, T, H, D] alike, mask [B, T], state of matching B, w, H, D."""
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must be [B, T, H, D] alike, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if mask is not None and mask.shape != q.shape[:2]:
        raise ValueError(f"mask must be [B, T] = {tuple(q.shape[:2])}, got {tuple(mask.shape)}")
    expected = (q.shape[0], options.window, q.shape[2], q.shape[3])
    if state is not None and (state.k.shape != expected or state.valid.shape != expected[:2]):
        raise ValueError(f"state.k must be [B, w, H, D] = {expected}, got {tuple(state.k.shape)}")


def key_validity(q: Tensor, mask: Tensor | None) -> Tensor:
    """[B, T] bool: True where a position is a real token (all of them without a mask)."""
    if mask is None:
        return torch.ones(q.shape[:2], dtype=torch.bool, device=q.device)
    return mask.bool()


def masked_softmax(scores: Tensor, allowed: Tensor) -> Tensor:
    """softmax over the last axis restricted to ``allowed`` (broadcast to scores); a row with nothing allowed is 0.

    Relative to each row's max over allowed entries (no positive exponent); the max is a reference point only and
    cancels, so it carries no gradient.
    """
    s = scores.masked_fill(~allowed, float("-inf"))
    top = s.amax(-1, keepdim=True).detach()
    p = torch.exp(s - torch.where(torch.isfinite(top), top, torch.zeros_like(top)))
    z = p.sum(-1, keepdim=True)
    return p / torch.where(z > 0, z, torch.ones_like(z))
