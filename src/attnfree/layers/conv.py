"""Causal convolution sublayer (the design's ``convolve`` option, placed before attention in each layer)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import initialization as init

from attnfree.layers.sublayer import BlockContext, Sublayer, SublayerState, stateful
from attnfree.ops.conv import causal_conv1d, causal_conv1d_step, init_conv_state


class CausalConvolution(Sublayer):
    """x -> dropout(conv(LayerNorm(x))): grouped, no bias, left zero padding; its block adds the residual.

    x: [B, T, C]; padded positions (mask False) enter the convolution as zeros. State: "inputs", the last K-1
    normalised inputs [B, C, K-1]. The weight starts N(0, init_std).
    """

    def __init__(self, hidden_size: int, kernel_size: int, groups: int, dropout: float, eps: float,
                 init_std: float = 0.02):
        super().__init__()
        self.groups, self.kernel_size, self.init_std = groups, kernel_size, init_std
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.weight = nn.Parameter(torch.empty(hidden_size, hidden_size // groups, kernel_size))
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init.normal_(self.weight, mean=0.0, std=self.init_std)

    def forward(self, x: Tensor, ctx: BlockContext, state: SublayerState | None = None) -> Tensor:
        n = self.norm(x)

        def step(prev: Tensor) -> tuple[Tensor, Tensor]:
            y, new = causal_conv1d_step(n[:, 0], self.weight, self.groups, ctx.last_mask, prev)
            return y.unsqueeze(1), new

        y = stateful(state, "inputs", x.shape[1], step,
                     lambda prev, keep: causal_conv1d(n, self.weight, self.groups, ctx.mask, prev))
        return self.dropout(y)

    def init_state(self, batch: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
                   ) -> SublayerState:
        """Zeros: what the left zero padding means for a sequence not started yet."""
        return {"inputs": init_conv_state(batch, self.weight.shape[0], self.kernel_size, dtype, device)}
