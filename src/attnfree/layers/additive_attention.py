"""Multi-head causal Fastformer attention ("additive attention", Wu et al. 2021, made causal).

Per layer, with n = LayerNorm(h) and q, k, v = W_q n, W_k n, W_v n (heads of size D):
1. global query  g^q_i = causal additive pool of q with scores <w_q, q_j> / sqrt(D)     (paper eq. 3-4)
2. mixed keys    p_i = W_o g^q_i * k_i  (elementwise)                                  ("p_i = q * k_i")
3. residual      r_i = h_i + p_i, then LayerNorm  (the design's mid-attention residual + norm)
4. global key    g^k_i = causal additive pool of LayerNorm(r) with scores <w_k, .> / sqrt(D)  (eq. 5-6)
5. output        r_i + g^k_i * v_i                                                     ("u_i = k * v_i")
The earlier design added step 3's residual to n (the normalised input), which drops the raw residual
stream; ``residual="raw"`` (default) uses h, ``residual="normed"`` reproduces the original.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from attnfree.ops.additive import AdditiveState, additive_pool_parallel, additive_pool_step


class FastformerAttention(nn.Module):
    def __init__(self, hidden_size: int, n_heads: int, dropout: float, eps: float, residual: str, chunk: int):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, hidden_size // n_heads
        self.residual, self.chunk = residual, chunk
        self.attn_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=False)  # W_q, W_k, W_v fused
        self.query_score = nn.Parameter(torch.zeros(hidden_size))  # w_q, one D-vector per head
        self.key_score = nn.Parameter(torch.zeros(hidden_size))  # w_k
        self.out_proj = nn.Linear(hidden_size, hidden_size, bias=False)  # projection of the pooled query
        self.mid_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def pool(self, x: Tensor, w: Tensor, mask: Tensor | None, key: str, cache: dict[str, Any] | None) -> Tensor:
        """Causal additive pooling of x [B, T, C] per head; reads/writes state ``key`` of the cache."""
        B, T, C = x.shape
        xh = x.view(B, T, self.n_heads, self.head_dim)  # [B, T, H, D]
        scores = (xh * w.view(self.n_heads, self.head_dim)).sum(-1) / math.sqrt(self.head_dim)  # [B, T, H]
        state = cache.get(key) if cache is not None else None
        new_state: AdditiveState | None
        if state is not None and T == 1:  # decoding: O(1) recurrent step
            g, new_state = additive_pool_step(xh[:, 0], scores[:, 0], None if mask is None else mask[:, 0], state)
            g = g.unsqueeze(1)
        else:  # training / prefill (continuing from a state if there is one)
            g, new_state = additive_pool_parallel(xh, scores, mask, state, cache is not None, self.chunk)
        if cache is not None:
            cache[key] = new_state
        return g.reshape(B, T, C)

    def forward(self, h: Tensor, mask: Tensor | None, cache: dict[str, Any] | None = None) -> Tensor:
        """h: [B, T, C] -> [B, T, C] (residuals included). mask: [B, T] bool, True = real token."""
        n = self.attn_norm(h)
        q, k, v = self.qkv(n).chunk(3, dim=-1)  # [B, T, C] each
        g_q = self.out_proj(self.dropout(self.pool(q, self.query_score, mask, "query", cache)))
        r = (h if self.residual == "raw" else n) + g_q * k
        g_k = self.dropout(self.pool(self.mid_norm(r), self.key_score, mask, "key", cache))
        return r + g_k * v
