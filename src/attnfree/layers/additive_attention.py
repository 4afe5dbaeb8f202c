"""Multi-head causal Fastformer attention ("additive attention", Wu et al. 2021, made causal): a sublayer.

Per layer, with n = LayerNorm(h) and q, k, v = W_q n, W_k n, W_v n (heads of size D):
1. global query  g^q_i = causal additive pool of q with scores <w_q, q_j> / sqrt(D)     (paper eq. 3-4)
2. mixed keys    p_i = W_o g^q_i * k_i  (elementwise)                                  ("p_i = q * k_i")
3. residual      r_i = h_i + p_i, then LayerNorm  (the design's mid-attention residual + norm)
4. global key    g^k_i = causal additive pool of LayerNorm(r) with scores <w_k, .> / sqrt(D)  (eq. 5-6)
5. output        r_i + g^k_i * v_i                                                     ("u_i = k * v_i")
The sublayer returns the branch, output - h; its block adds h back. The earlier design (``residual="normed"``,
the ``seed`` preset) built steps 3 and 5 on n, the normalised input, instead of h.

Recency (``decay``): pooling with a per-head forgetting factor, s_i = e^{-lambda} s_{i-1} + e^{a_i} x_i (and
z likewise), gives weights e^{a_j - lambda (i - j)}; the e^{-lambda i} cancels between s_i and z_i, so it is
exactly the plain pooling with scores a_j + lambda j. A position-linear score bias (ALiBi's slopes, Press
et al. 2022) therefore turns each head into an exponential moving average of its own time scale, with
the same O(1) state and no change to the op. "fixed" uses slopes 2^(-8h/H); "learned" starts there.

Options toward RWKV's time mixing: ``bonus`` (RWKV's u, a learned current-token bonus in the pooled read-out) and
``token_shift`` (q, k, v from per-channel mixes of each position's and the previous position's normalised input).
State: {"query": AdditiveState, "key": AdditiveState} (+ "shift": [B, C] with token shift).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from transformers import initialization as init

from attnfree.layers.shift import shifted
from attnfree.layers.sublayer import BlockContext, Sublayer, SublayerState, stateful
from attnfree.layers.validation import check_mode
from attnfree.ops.additive import (
    AdditiveState,
    PoolOptions,
    additive_pool,
    additive_pool_step,
    additive_pool_step_,
    init_additive_state,
)
from attnfree.ops.shift import mix

DECAY_MODES = ("none", "fixed", "learned")
RESIDUAL_MODES = ("raw", "normed")
POOLS = ("query", "key")  # the two poolings; row i of log_slopes and bonus belongs to POOLS[i]


def alibi_log_slopes(n_heads: int) -> Tensor:
    """log of ALiBi's geometric slopes 2^(-8 h / H), h = 1..H: time scales from ~2 to ~256 tokens."""
    return -(8.0 * torch.arange(1, n_heads + 1, dtype=torch.float32) / n_heads) * math.log(2.0)


class FastformerAttention(Sublayer):
    """x [B, T, C] -> the attention branch [B, T, C] (see the module docstring).

    Args:
        hidden_size: C; n_heads: H; dropout: on the pooled vectors; eps: LayerNorm epsilon.
        chunk: chunk length of the parallel pooling (speed only).
        decay: "none", "fixed" or "learned" per-head recency.
        residual: "raw" (h) or "normed" (n, the earlier design) under the mid-attention residual.
        bonus, token_shift: the options toward RWKV (module docstring).
    """

    def __init__(self, hidden_size: int, n_heads: int, dropout: float, eps: float, chunk: int,
                 decay: str = "learned", residual: str = "raw", bonus: bool = False, token_shift: bool = False):
        super().__init__()
        check_mode("FastformerAttention.residual", residual, RESIDUAL_MODES)
        check_mode("FastformerAttention.decay", decay, DECAY_MODES)
        self.n_heads, self.head_dim = n_heads, hidden_size // n_heads
        self.chunk, self.decay, self.residual = chunk, decay, residual
        self.has_bonus, self.has_token_shift = bonus, token_shift
        if decay == "learned":  # log-slopes of the query and key poolings
            self.log_slopes = nn.Parameter(torch.empty(len(POOLS), n_heads))  # [2, H]
        elif decay == "fixed":
            self.register_buffer("log_slopes", torch.empty(len(POOLS), n_heads), persistent=False)
        if bonus:
            self.bonus = nn.Parameter(torch.empty(len(POOLS), n_heads))  # u per head
        if token_shift:
            self.time_mix = nn.Parameter(torch.empty(3, hidden_size))  # q, k, v mixes
        self.attn_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=False)  # W_q, W_k, W_v fused
        self.query_score = nn.Parameter(torch.empty(hidden_size))  # w_q, one D-vector per head
        self.key_score = nn.Parameter(torch.empty(hidden_size))  # w_k
        self.out_proj = nn.Linear(hidden_size, hidden_size, bias=False)  # projection of the pooled query
        self.mid_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Zero score vectors (uniform pooling at the start, as in the design), ALiBi slopes, no bonus, even mixes."""
        init.zeros_(self.query_score)
        init.zeros_(self.key_score)
        if self.decay != "none":
            init.copy_(self.log_slopes, alibi_log_slopes(self.n_heads).repeat(len(POOLS), 1))
        if self.has_bonus:
            init.zeros_(self.bonus)
        if self.has_token_shift:
            init.constant_(self.time_mix, 0.5)

    def scores(self, xh: Tensor, pool: str, positions: Tensor) -> Tensor:
        """a_j = <w, x_j> / sqrt(D) (+ lambda_h j with decay). xh: [B, T, H, D], positions: [B, T] -> [B, T, H]."""
        w = self.query_score if pool == "query" else self.key_score
        a = (xh * w.view(self.n_heads, self.head_dim)).sum(-1) / math.sqrt(self.head_dim)
        if self.decay == "none":
            return a
        acc = torch.promote_types(a.dtype, torch.float32)  # lambda j grows with j: at least float32 (float64 stays)
        slopes = self.log_slopes[POOLS.index(pool)].to(acc).exp()  # [H]
        return a.to(acc) + positions.unsqueeze(-1).to(acc) * slopes

    def pool(self, x: Tensor, pool: str, ctx: BlockContext, state: SublayerState | None) -> Tensor:
        """Causal additive pooling of x [B, T, C] per head ("query" or "key" pool), its state under ``state[pool]``."""
        B, T, C = x.shape
        xh = x.view(B, T, self.n_heads, self.head_dim)  # [B, T, H, D]
        scores = self.scores(xh, pool, ctx.positions)  # [B, T, H]
        bonus = self.bonus[POOLS.index(pool)] if self.has_bonus else None

        def step(prev: AdditiveState) -> tuple[Tensor, AdditiveState]:  # decoding: O(1) per token
            if ctx.mask is None and not torch.is_grad_enabled():  # the hot path: the state's own tensors updated
                return additive_pool_step_(xh[:, 0], scores[:, 0], prev, bonus).unsqueeze(1), prev
            g, new = additive_pool_step(xh[:, 0], scores[:, 0], ctx.last_mask, prev, bonus)
            return g.unsqueeze(1), new

        def parallel(prev: AdditiveState | None, keep: bool) -> tuple[Tensor, AdditiveState | None]:
            return additive_pool(xh, scores, ctx.mask, prev, PoolOptions(keep, bonus, self.chunk))

        return stateful(state, pool, T, step, parallel).reshape(B, T, C)

    def init_state(self, batch: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
                   ) -> SublayerState:
        """Nothing seen: the two poolings' empty sums (and zeros for the token shift's previous input)."""
        state: SublayerState = {pool: init_additive_state(batch, self.n_heads, self.head_dim, dtype, device)
                                for pool in POOLS}
        if self.has_token_shift:
            state["shift"] = torch.zeros(batch, self.qkv.in_features, dtype=dtype, device=device)
        return state

    def inputs(self, n: Tensor, ctx: BlockContext, state: SublayerState | None) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v [B, T, C]: from n, or with token shift from per-channel mixes of n and the previous position's n."""
        if not self.has_token_shift:
            q, k, v = self.qkv(n).chunk(3, dim=-1)
            return q, k, v
        prev = shifted(n, ctx, state)
        weights = self.qkv.weight.chunk(3)
        q, k, v = (nn.functional.linear(mix(n, prev, mu), w) for mu, w in zip(self.time_mix, weights, strict=True))
        return q, k, v

    def forward(self, x: Tensor, ctx: BlockContext, state: SublayerState | None = None) -> Tensor:
        # 1. q, k, v from the normalised input
        n = self.attn_norm(x)
        q, k, v = self.inputs(n, ctx, state)  # [B, T, C] each
        # 2. global query, mixed into the keys; the mid-attention residual
        mixed = self.out_proj(self.dropout(self.pool(q, "query", ctx, state))) * k
        r = (x if self.residual == "raw" else n) + mixed
        # 3. global key, mixed into the values: the branch is everything added to x
        branch = mixed + self.dropout(self.pool(self.mid_norm(r), "key", ctx, state)) * v
        return branch if self.residual == "raw" else branch + (n - x)
