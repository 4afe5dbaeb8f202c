"""Token shift inside a sublayer: the previous position's input, its state kept in the sublayer's state dict.

``shifted(x, ctx, state)`` is ``ops.shift``'s token shift (parallel form, or its one-token step while decoding)
through the one state dispatch (``layers.sublayer.stateful``): what RWKV's time mix and channel mix read.
"""

from __future__ import annotations

from torch import Tensor

from attnfree.layers.sublayer import BlockContext, SublayerState, stateful
from attnfree.ops.shift import token_shift, token_shift_step


def shifted(x: Tensor, ctx: BlockContext, state: SublayerState | None, key: str = "shift") -> Tensor:
    """x [B, T, C] -> the previous position's x [B, T, C] (zeros before the start and at padding), the last input
    kept under ``state[key]`` ([B, C])."""

    def step(prev: Tensor) -> tuple[Tensor, Tensor]:
        out, new = token_shift_step(x[:, 0], ctx.last_mask, prev)
        return out.unsqueeze(1), new

    return stateful(state, key, x.shape[1], step, lambda prev, keep: token_shift(x, ctx.mask, prev))
