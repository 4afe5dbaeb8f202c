"""Multi-headed causal cross-correlation (the Leviathan token mixer), and its use across ensemble members.

``MultiHeadedCorrelation``: x -> dropout(W_o Corr(q, k, v)) with [q, k, v] = LayerNorm(x) W_qkv, where Corr is
``attnfree.ops.correlation`` (segment scores over a lag set, softmax over the valid lags, mix of past values).
The residual is added by the caller. Training and prefill use the parallel form; a one-token call with a
state in the cache dict uses the recurrent step (O(L J D) per token, whatever the context length).

``MemberInteraction``: the same idea across the M members of an ensemble at one time step: a multi-headed
softmax mixing over the member axis (per position, so it is causal in time trivially).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from attnfree.layers.validation import check_heads
from attnfree.ops.correlation import CorrelationState, correlation, correlation_step, init_correlation_state

STATE_KEY = "correlation"  # where a layer's CorrelationState lives in its cache dict


class MultiHeadedCorrelation(nn.Module):
    """Pre-LN causal cross-correlation over a lag set. x: [B, T, C] -> [B, T, C] (branch only, no residual).

    Args:
        hidden_size: C (= n_heads * D).
        n_heads: H.
        lags: L lags, sorted, starting at 0 (``make_lags``).
        segment: J, query/key positions summed into one score.
        dropout: on the output projection.
        eps: LayerNorm epsilon.
    """

    def __init__(self, hidden_size: int, n_heads: int, lags: Sequence[int] | Tensor, segment: int, dropout: float,
                 eps: float):
        super().__init__()
        check_heads(hidden_size, n_heads)
        self.n_heads, self.segment = n_heads, segment
        # plain ints, not a buffer: every form of the op takes them, torch.compile reads them without a graph break,
        # and they hold values even when the module is built on the meta device
        self.lags = tuple(int(x) for x in (lags.tolist() if isinstance(lags, Tensor) else lags))
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.out = nn.Linear(hidden_size, hidden_size, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor | None = None, cache: dict[str, Any] | None = None) -> Tensor:
        """x [B, T, C]; mask [B, T] bool (True = real token) or None; cache: this layer's dict (read, updated)."""
        B, T, C = x.shape
        q, k, v = self.qkv(self.norm(x)).view(B, T, 3, self.n_heads, C // self.n_heads).unbind(2)  # [B, T, H, D]
        state = cache.get(STATE_KEY) if cache is not None else None
        if state is not None and x.shape[1] == 1:  # decoding: one step of the recurrence, state updated in place
            mask_t = None if mask is None else mask[:, 0]
            o_t, state = correlation_step(q[:, 0], k[:, 0], v[:, 0], self.lags, self.segment, mask_t, state)
            o = o_t.unsqueeze(1)  # [B, 1, H, D]
        else:  # training / prefill (continuing from a state if there is one)
            o, state = correlation(q, k, v, self.lags, self.segment, mask, initial_state=state,
                                   output_final_state=cache is not None)
        if cache is not None:
            cache[STATE_KEY] = state
        return self.dropout(self.out(o.reshape(B, T, C)))

    def init_state(self, batch: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
                   ) -> dict[str, CorrelationState]:
        """Nothing seen: empty ring buffers, every position invalid."""
        C = self.qkv.in_features
        return {STATE_KEY: init_correlation_state(batch, self.n_heads, C // self.n_heads, self.lags, self.segment,
                                                  dtype, device)}


class MemberInteraction(nn.Module):
    """Pre-LN multi-headed softmax mixing across members at each position. x: [M, B, T, C] -> [M, B, T, C].

    Per position (b, t) and head: s[m, m'] = <q_m, k_m'> / sqrt(D), a = softmax over m', o_m = sum a v_m'.
    The residual is added by the caller. Members are a set here (no order, no mask): each row of the
    softmax has all M entries.
    """

    def __init__(self, hidden_size: int, n_heads: int, dropout: float, eps: float):
        super().__init__()
        check_heads(hidden_size, n_heads)
        self.n_heads = n_heads
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.out = nn.Linear(hidden_size, hidden_size, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        M, B, T, C = x.shape
        qkv = self.qkv(self.norm(x)).view(M, B, T, 3, self.n_heads, C // self.n_heads)
        q, k, v = qkv.permute(3, 1, 2, 4, 0, 5).unbind(0)  # [B, T, H, M, D]
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # [B, T, H, M, M]
        o = torch.matmul(torch.softmax(scores, dim=-1), v)  # [B, T, H, M, D]
        return self.dropout(self.out(o.permute(3, 0, 1, 2, 4).reshape(M, B, T, C)))
