"""Multi-headed causal cross-correlation: the Leviathan token mixer, a sublayer.

x -> dropout(W_o Corr(q, k, v)) with [q, k, v] = LayerNorm(x) W_qkv, where Corr is ``attnfree.ops.correlation``
(segment scores over a lag set, softmax over the valid lags, mix of past values); its block adds the residual.
Training and prefill use the parallel form; a one-token call with a state uses the recurrent step (O(L J D) per
token, whatever the context length). State: "ring", the op's ``CorrelationState``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnfree.layers.sublayer import BlockContext, Sublayer, SublayerState, stateful
from attnfree.layers.validation import check_heads
from attnfree.ops.correlation import CorrelationState, LagSet, correlation, correlation_step_, init_correlation_state


class MultiHeadedCorrelation(Sublayer):
    """Pre-LN causal cross-correlation over a lag set. x: [B, T, C] -> [B, T, C] (the branch).

    Args:
        hidden_size: C (= n_heads * D).
        n_heads: H.
        spec: the lags (sorted, starting at 0; ``make_lags``) and the segment length J (``LagSet``).
        dropout: on the output projection.
        eps: LayerNorm epsilon.
    """

    def __init__(self, hidden_size: int, n_heads: int, spec: LagSet, dropout: float, eps: float):
        super().__init__()
        check_heads(hidden_size, n_heads)
        self.n_heads, self.spec = n_heads, spec
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.out = nn.Linear(hidden_size, hidden_size, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, ctx: BlockContext, state: SublayerState | None = None) -> Tensor:
        """x [B, T, C]; ctx.mask [B, T] bool (True = real token) or None; state: this sublayer's dict."""
        B, T, C = x.shape
        q, k, v = self.qkv(self.norm(x)).view(B, T, 3, self.n_heads, C // self.n_heads).unbind(2)  # [B, T, H, D]

        def step(prev: CorrelationState) -> tuple[Tensor, CorrelationState]:  # the ring buffers updated in place
            o_t, new = correlation_step_(q[:, 0], k[:, 0], v[:, 0], self.spec, ctx.last_mask, prev)
            return o_t.unsqueeze(1), new

        o = stateful(state, "ring", T, step,
                     lambda prev, keep: correlation(q, k, v, self.spec, ctx.mask, prev, keep))
        return self.dropout(self.out(o.reshape(B, T, C)))

    def init_state(self, batch: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
                   ) -> SublayerState:
        """Nothing seen: empty ring buffers, every position invalid."""
        C = self.qkv.in_features
        return {"ring": init_correlation_state(batch, self.n_heads, C // self.n_heads, self.spec, dtype, device)}
