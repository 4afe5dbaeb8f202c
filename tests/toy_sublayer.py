"""A toy sublayer, in one file: the proof that a new token mixer needs nothing but the sublayer interface.

``RunningMax``: y_i = W_o max_{j <= i, j real} W_v LayerNorm(x_j) (per channel; 0 before the first real token).
Its state is the running maximum [B, C] (-inf before anything was seen). Plugged into the toy family of
tests/models/test_contract.py by one config field (``ToyConfig.running_max``), it goes through the family contract
(forward == prefill + decode, padding, save/load, generate, ONNX export, serving) like any built-in sublayer, and
through the sublayer contract of tests/layers/test_sublayer.py.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnfree.layers.sublayer import BlockContext, Sublayer, SublayerState, stateful


class RunningMax(Sublayer):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size, bias=False)
        self.out = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, x: Tensor, ctx: BlockContext, state: SublayerState | None = None) -> Tensor:
        v = self.value(self.norm(x))  # [B, T, C]
        if ctx.mask is not None:  # padding never wins the maximum
            v = v.masked_fill(~ctx.mask.unsqueeze(-1), float("-inf"))

        def step(prev: Tensor) -> tuple[Tensor, Tensor]:
            new = torch.maximum(prev, v[:, 0])
            return new.unsqueeze(1), new

        def parallel(prev: Tensor | None, keep: bool) -> tuple[Tensor, Tensor]:
            # over the last axis: the form the ONNX export translates (cumulative max has no ONNX operator)
            run = torch.cummax(v.transpose(1, 2), dim=-1).values.transpose(1, 2)  # [B, T, C]
            if prev is not None:
                run = torch.maximum(run, prev.unsqueeze(1))
            return run, run[:, -1].clone()

        running = stateful(state, "max", x.shape[1], step, parallel)
        return self.out(torch.where(torch.isinf(running), torch.zeros_like(running), running))

    def init_state(self, batch: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
                   ) -> SublayerState:
        return {"max": torch.full((batch, self.value.in_features), float("-inf"), dtype=dtype, device=device)}
