"""Causal grouped 1-D convolution with a rolling state, in reference, parallel and step forms.

y_t = sum_{k<K} W[:, :, k] x_{t-K+1+k}, with x_{<0} = 0 (left zero padding). Padded positions (mask False)
are zeroed first, so a left-padded sequence sees exactly the zeros an unpadded one sees at its start.
The state is the last K-1 inputs: [B, C, K-1] (channels first, as ``F.conv1d`` wants).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _masked(x: Tensor, mask: Tensor | None) -> Tensor:
    return x if mask is None else x.masked_fill(~mask.bool().unsqueeze(-1), 0.0)


def init_conv_state(batch: int, channels: int, kernel_size: int, dtype: torch.dtype, device=None) -> Tensor:
    """Zeros [B, C, K-1]: what the left zero padding means for a sequence not started yet."""
    return torch.zeros(batch, channels, kernel_size - 1, dtype=dtype, device=device)


def causal_conv1d_naive(
    x: Tensor, weight: Tensor, groups: int, mask: Tensor | None = None, initial_state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Reference: float64 loop over time and taps. x: [B, T, C], weight: [C, C/groups, K].

    Returns (y [B, T, C] in x's dtype, final state [B, C, K-1]).
    """
    B, T, C = x.shape
    K, cg = weight.shape[-1], C // groups
    state = initial_state if initial_state is not None else init_conv_state(B, C, K, x.dtype, x.device)
    hist = torch.cat([state.double(), _masked(x, mask).double().transpose(1, 2)], dim=-1)  # [B, C, K-1+T]
    w = weight.double()
    y = torch.zeros(B, T, C, dtype=torch.float64, device=x.device)
    for t in range(T):
        window = hist[:, :, t : t + K]  # [B, C, K]: inputs t-K+1 .. t
        for g in range(groups):
            sl = slice(g * cg, (g + 1) * cg)
            # out channel o of group g sums over in channels i of group g and taps k
            y[:, t, sl] = torch.einsum("bik,oik->bo", window[:, sl], w[sl])
    return y.to(x.dtype), hist[:, :, T:].to(x.dtype) if K > 1 else hist[:, :, :0].to(x.dtype)


def causal_conv1d(
    x: Tensor, weight: Tensor, groups: int, mask: Tensor | None = None, initial_state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Parallel form: one ``F.conv1d`` over the state-prefixed input. Same contract as the reference."""
    B, T, C = x.shape
    K = weight.shape[-1]
    xt = _masked(x, mask).transpose(1, 2)  # [B, C, T]
    if initial_state is None:
        padded = F.pad(xt, (K - 1, 0))
    else:
        padded = torch.cat([initial_state.to(x.dtype), xt], dim=-1)  # [B, C, K-1+T]
    y = F.conv1d(padded, weight.to(x.dtype), groups=groups)  # [B, C, T]
    return y.transpose(1, 2), padded[:, :, padded.shape[-1] - (K - 1) :].clone()  # not a view of the prefill


def causal_conv1d_step(
    x_t: Tensor, weight: Tensor, groups: int, mask_t: Tensor | None, state: Tensor
) -> tuple[Tensor, Tensor]:
    """One token: x_t [B, C], mask_t [B] or None, state [B, C, K-1] -> (y_t [B, C], new state [B, C, K-1]).

    The argument order of every step in ``ops``: the token's inputs, the op's parameters, the mask, the state."""
    B, C = x_t.shape
    K, cg = weight.shape[-1], C // groups
    if mask_t is not None:
        x_t = x_t.masked_fill(~mask_t.bool().unsqueeze(-1), 0.0)
    window = torch.cat([state.to(x_t.dtype), x_t.unsqueeze(-1)], dim=-1)  # [B, C, K]
    # grouped contraction: [B, G, Cg, K] x [G, Cg_out, Cg, K] -> [B, G, Cg_out]
    y = torch.einsum("bgik,goik->bgo", window.view(B, groups, cg, K), weight.view(groups, cg, cg, K))
    return y.reshape(B, C), window[:, :, 1:]
