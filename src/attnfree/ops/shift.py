"""Token shift: every position's input beside the previous position's (RWKV's "time mix"), state of one vector.

    prev_t = x_{t-1},   prev_0 = the state (zeros for a sequence not started)

A padded position (mask False) counts as zeros, as in the causal convolution (``ops/conv.py``), so a left-padded
sequence sees at its first real token exactly what an unpadded one sees at its start. The state is the last
position's input: [B, C]. A learned per-channel mix of x_t and prev_t, ``mix``, is what the layers use; at kernel 2 a
depthwise causal convolution is the same family without the constraint that the two weights sum to one.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _masked(x: Tensor, mask: Tensor | None) -> Tensor:
    return x if mask is None else x.masked_fill(~mask.bool().unsqueeze(-1), 0.0)


def token_shift_naive(x: Tensor, mask: Tensor | None = None, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Reference: a loop over time. x [B, T, C], mask [B, T], state [B, C] -> (prev [B, T, C], new state [B, C])."""
    x = _masked(x, mask)
    last = state.to(x.dtype) if state is not None else torch.zeros_like(x[:, 0])
    prev = []
    for t in range(x.shape[1]):
        prev.append(last)
        last = x[:, t]
    return torch.stack(prev, 1), last


def token_shift(x: Tensor, mask: Tensor | None = None, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Parallel form, the same contract: the inputs moved one position later, the state in front."""
    x = _masked(x, mask)
    first = state.to(x.dtype).unsqueeze(1) if state is not None else torch.zeros_like(x[:, :1])
    return torch.cat([first, x[:, :-1]], 1), x[:, -1].clone()  # (a copy: the state must not keep x alive)


def token_shift_step(x_t: Tensor, mask_t: Tensor | None, state: Tensor) -> tuple[Tensor, Tensor]:
    """One token: x_t [B, C], mask_t [B] or None, state [B, C] -> (prev [B, C], new state [B, C])."""
    x_t = x_t if mask_t is None else x_t.masked_fill(~mask_t.bool().unsqueeze(-1), 0.0)
    return state.to(x_t.dtype), x_t


def mix(x: Tensor, prev: Tensor, mu: Tensor) -> Tensor:
    """Per channel, mu of the current input and 1 - mu of the previous one: x + (1 - mu) (prev - x)."""
    return x + (1 - mu) * (prev - x)
