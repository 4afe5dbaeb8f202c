"""Sliding-window softmax attention ("local attention"): a sublayer, the local context beside the global pooling.

The Fastformer design modelled local context with a causal convolution and named local attention as the scalable
alternative; this is it. With n = LayerNorm(x) and q, k, v = W_qkv n (fused, H heads of size D):

    o_i = softmax over the last w positions j (itself included) of (R_i q_i) . (R_j k_j) / sqrt(D), times v_j
    branch = dropout(W_o o)

R_p is the rotary embedding at position p (``rotary=True``): inside a window the scores then depend on how far
back a key is, which a convolution's taps know and a plain softmax over a set would not; it adds no parameters and
no length limit (only differences of positions enter), and keys are stored rotated, so the decoding state stays
valid however long decoding runs. With ``rotary=False`` the window is an unordered set. State: "window", the last
w keys and values (``ops.local_attention.LocalState``): constant in the context length.

Shapes: B batch, T time, C width, H heads, D head size.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnfree.layers.sublayer import BlockContext, Sublayer, SublayerState, stateful
from attnfree.layers.validation import check_heads
from attnfree.ops.local_attention import (
    LocalState,
    WindowOptions,
    init_local_state,
    local_attention_chunked,
    local_attention_step,
    rotary_angles,
    rotate,
)


class LocalAttention(Sublayer):
    """x [B, T, C] -> dropout(W_o local_attention(q, k, v)) [B, T, C] (see the module docstring).

    Args:
        hidden_size: C; n_heads: H; window: w, positions each query sees (itself and the w - 1 before it);
        dropout: on the branch; eps: LayerNorm epsilon; rotary: rotary embeddings on q and k.
    """

    def __init__(self, hidden_size: int, n_heads: int, window: int, dropout: float, eps: float, rotary: bool = True):
        super().__init__()
        check_heads(hidden_size, n_heads)
        self.n_heads, self.head_dim, self.rotary = n_heads, hidden_size // n_heads, rotary
        self.options = WindowOptions(window)  # (validates the window)
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=False)  # W_q, W_k, W_v fused
        self.out_proj = nn.Linear(hidden_size, hidden_size, bias=False)  # W_o
        self.dropout = nn.Dropout(dropout)

    @property
    def window(self) -> int:
        return self.options.window

    def heads(self, x: Tensor, ctx: BlockContext) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v [B, T, H, D] from LayerNorm(x); q and k rotated to their positions (with ``rotary``)."""
        B, T, _ = x.shape
        q, k, v = self.qkv(self.norm(x)).view(B, T, 3, self.n_heads, self.head_dim).unbind(2)
        if self.rotary:
            cos, sin = rotary_angles(ctx.positions, self.head_dim, q.dtype)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        return q, k, v

    def forward(self, x: Tensor, ctx: BlockContext, state: SublayerState | None = None) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.heads(x, ctx)

        def step(prev: LocalState) -> tuple[Tensor, LocalState]:  # decoding: attend over the w stored entries
            o, new = local_attention_step(q[:, 0], k[:, 0], v[:, 0], ctx.last_mask, prev)
            return o.unsqueeze(1), new

        def parallel(prev: LocalState | None, keep: bool) -> tuple[Tensor, LocalState | None]:
            return local_attention_chunked(q, k, v, ctx.mask, prev, WindowOptions(self.window, keep))

        o = stateful(state, "window", T, step, parallel)  # [B, T, H, D]
        return self.dropout(self.out_proj(o.reshape(B, T, C)))

    def init_state(self, batch: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
                   ) -> SublayerState:
        """Nothing seen: w empty entries."""
        return {"window": init_local_state(batch, self.window, self.n_heads, self.head_dim, dtype, device)}
