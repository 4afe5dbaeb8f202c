"""Causal convolution block placed before attention in each layer (the design's ``convolve`` option)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from attnfree.ops.conv import causal_conv1d, causal_conv1d_step, init_conv_state


class CausalConvolution(nn.Module):
    """x -> dropout(conv(LayerNorm(x))): grouped, no bias, left zero padding; residual added by the caller.

    x: [B, T, C]; padded positions (mask False) enter the convolution as zeros. With a cache, the last
    K-1 normalised inputs are kept as the layer's rolling state ("conv": [B, C, K-1]).
    """

    def __init__(self, hidden_size: int, kernel_size: int, groups: int, dropout: float, eps: float):
        super().__init__()
        self.groups, self.kernel_size = groups, kernel_size
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.weight = nn.Parameter(torch.empty(hidden_size, hidden_size // groups, kernel_size))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor | None, cache_layer: dict[str, Any] | None) -> Tensor:
        n = self.norm(x)
        state = cache_layer.get("conv") if cache_layer is not None else None
        if state is not None and x.shape[1] == 1:
            y, new_state = causal_conv1d_step(n[:, 0], self.weight, self.groups, None if mask is None else mask[:, 0],
                                              state)
            y = y.unsqueeze(1)
        else:
            y, new_state = causal_conv1d(n, self.weight, self.groups, mask, state)
        if cache_layer is not None:
            cache_layer["conv"] = new_state
        return self.dropout(y)

    def init_state(self, batch: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
                   ) -> dict[str, Tensor]:
        """Zeros: what the left zero padding means for a sequence not started yet."""
        return {"conv": init_conv_state(batch, self.weight.shape[0], self.kernel_size, dtype, device)}
