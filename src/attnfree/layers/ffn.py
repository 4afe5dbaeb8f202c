"""Pre-LayerNorm feed-forward sublayers (no biases): the 'boom' layer, and RWKV's channel mix.

``FeedForward``: x -> dropout(W2 act(W1 LayerNorm(x))), with GELU, ReLU, LeakyReLU or squared ReLU (Primer, So et al.
2021; RWKV's channel mix uses it). ``ChannelMix``: RWKV-4's channel mix, the same with a token shift on its inputs and
a sigmoid receptance gate on its output (its state: the previous position's normalised input). ``make_ffn`` builds
either by name. Each returns the branch; its block adds the residual. x: [B, T, C].
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import initialization as init

from attnfree.layers.shift import shifted
from attnfree.layers.sublayer import BlockContext, Sublayer, SublayerState
from attnfree.layers.validation import check_mode
from attnfree.ops.shift import mix


class SquaredReLU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x).square()


ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU, "leaky_relu": nn.LeakyReLU,
                                           "sqrelu": SquaredReLU}


class FeedForward(Sublayer):
    """x -> dropout(W2 act(W1 LayerNorm(x))). Stateless. x: [B, T, C]."""

    def __init__(self, hidden_size: int, multiplier: float, activation: str, dropout: float, eps: float):
        super().__init__()
        check_mode("FeedForward.activation", activation, ACTIVATIONS)
        inner = round(multiplier * hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.up = nn.Linear(hidden_size, inner, bias=False)
        self.act = ACTIVATIONS[activation]()
        self.down = nn.Linear(inner, hidden_size, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, ctx: BlockContext, state: SublayerState | None = None) -> Tensor:
        return self.dropout(self.down(self.act(self.up(self.norm(x)))))


class ChannelMix(Sublayer):
    """RWKV-4's channel mix: with n = LayerNorm(x) and p the previous position's n (token shift),
    out = sigmoid(W_r mix(n, p, mu_r)) * W_v relu(W_k mix(n, p, mu_k))^2. State: "shift" [B, C]."""

    def __init__(self, hidden_size: int, multiplier: float, dropout: float, eps: float):
        super().__init__()
        inner = round(multiplier * hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.time_mix = nn.Parameter(torch.empty(2, hidden_size))  # mu_k, mu_r
        self.up = nn.Linear(hidden_size, inner, bias=False)  # W_k
        self.down = nn.Linear(inner, hidden_size, bias=False)  # W_v
        self.receptance = nn.Linear(hidden_size, hidden_size, bias=False)  # W_r
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init.constant_(self.time_mix, 0.5)  # each channel half the current, half the previous position

    def forward(self, x: Tensor, ctx: BlockContext, state: SublayerState | None = None) -> Tensor:
        n = self.norm(x)
        prev = shifted(n, ctx, state)
        k = torch.relu(self.up(mix(n, prev, self.time_mix[0]))).square()
        return self.dropout(torch.sigmoid(self.receptance(mix(n, prev, self.time_mix[1]))) * self.down(k))

    def init_state(self, batch: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
                   ) -> SublayerState:
        return {"shift": torch.zeros(batch, self.up.in_features, dtype=dtype, device=device)}


FFN_TYPES = (*ACTIVATIONS, "channel_mix")


def make_ffn(kind: str, hidden_size: int, multiplier: float, dropout: float, eps: float) -> Sublayer:
    """``kind``: an activation of ``FeedForward`` (gelu, relu, leaky_relu, sqrelu) or "channel_mix"."""
    check_mode("ffn kind", kind, FFN_TYPES)
    if kind == "channel_mix":
        return ChannelMix(hidden_size, multiplier, dropout, eps)
    return FeedForward(hidden_size, multiplier, kind, dropout, eps)
