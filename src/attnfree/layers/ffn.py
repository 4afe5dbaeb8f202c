"""Pre-LayerNorm feed-forward blocks (no biases): the 'boom' layer, and RWKV's channel mix.

``FeedForward``: x -> dropout(W2 act(W1 LayerNorm(x))), with GELU, ReLU, LeakyReLU or squared ReLU (Primer, So et al.
2021; RWKV's channel mix uses it). ``ChannelMix``: RWKV-4's channel mix, the same with a token shift on its inputs and
a sigmoid receptance gate on its output (its state: the previous position's normalised input). ``make_ffn`` builds
either by name. The residual is added by the caller. x: [B, T, C].
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from attnfree.ops.shift import mix, token_shift, token_shift_step


class SquaredReLU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x).square()


ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU, "leaky_relu": nn.LeakyReLU,
                                           "sqrelu": SquaredReLU}
FFN_TYPES = (*ACTIVATIONS, "channel_mix")


class FeedForward(nn.Module):
    """x -> dropout(W2 act(W1 LayerNorm(x))), the residual added by the caller. x: [B, T, C]."""

    def __init__(self, hidden_size: int, multiplier: float, activation: str, dropout: float, eps: float):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose from {sorted(ACTIVATIONS)}")
        inner = round(multiplier * hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.up = nn.Linear(hidden_size, inner, bias=False)
        self.act = ACTIVATIONS[activation]()
        self.down = nn.Linear(inner, hidden_size, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor | None = None, cache: dict[str, Any] | None = None) -> Tensor:
        return self.dropout(self.down(self.act(self.up(self.norm(x)))))

    def init_state(self, batch: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
                   ) -> dict[str, Tensor]:
        return {}


class ChannelMix(nn.Module):
    """RWKV-4's channel mix: with n = LayerNorm(x) and p the previous position's n (token shift),
    out = sigmoid(W_r mix(n, p, mu_r)) * W_v relu(W_k mix(n, p, mu_k))^2. State: "ffn_shift" [B, C]."""

    def __init__(self, hidden_size: int, multiplier: float, dropout: float, eps: float):
        super().__init__()
        inner = round(multiplier * hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.time_mix = nn.Parameter(torch.full((2, hidden_size), 0.5))  # mu_k, mu_r
        self.up = nn.Linear(hidden_size, inner, bias=False)  # W_k
        self.down = nn.Linear(inner, hidden_size, bias=False)  # W_v
        self.receptance = nn.Linear(hidden_size, hidden_size, bias=False)  # W_r
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor | None = None, cache: dict[str, Any] | None = None) -> Tensor:
        n = self.norm(x)
        state = cache.get("ffn_shift") if cache is not None else None
        if state is not None and n.shape[1] == 1:
            prev, new = token_shift_step(n[:, 0], None if mask is None else mask[:, 0], state)
            prev = prev.unsqueeze(1)
        else:
            prev, new = token_shift(n, mask, state)
        if cache is not None:
            cache["ffn_shift"] = new
        k = torch.relu(self.up(mix(n, prev, self.time_mix[0]))).square()
        return self.dropout(torch.sigmoid(self.receptance(mix(n, prev, self.time_mix[1]))) * self.down(k))

    def init_state(self, batch: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
                   ) -> dict[str, Tensor]:
        return {"ffn_shift": torch.zeros(batch, self.up.in_features, dtype=dtype, device=device)}


def make_ffn(kind: str, hidden_size: int, multiplier: float, dropout: float, eps: float) -> FeedForward | ChannelMix:
    """``kind``: an activation of ``FeedForward`` (gelu, relu, leaky_relu, sqrelu) or "channel_mix"."""
    if kind == "channel_mix":
        return ChannelMix(hidden_size, multiplier, dropout, eps)
    return FeedForward(hidden_size, multiplier, kind, dropout, eps)
