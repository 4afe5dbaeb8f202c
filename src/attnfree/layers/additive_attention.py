"""Multi-head causal Fastformer attention ("additive attention", Wu et al. 2021, made causal).

Per layer, with n = LayerNorm(h) and q, k, v = W_q n, W_k n, W_v n (heads of size D):
1. global query  g^q_i = causal additive pool of q with scores <w_q, q_j> / sqrt(D)     (paper eq. 3-4)
2. mixed keys    p_i = W_o g^q_i * k_i  (elementwise)                                  ("p_i = q * k_i")
3. residual      r_i = h_i + p_i, then LayerNorm  (the design's mid-attention residual + norm)
4. global key    g^k_i = causal additive pool of LayerNorm(r) with scores <w_k, .> / sqrt(D)  (eq. 5-6)
5. output        r_i + g^k_i * v_i                                                     ("u_i = k * v_i")
The earlier design added step 3's residual to n (the normalised input), which drops the raw residual
stream; ``residual="raw"`` (default) uses h, ``residual="normed"`` reproduces the original.

Recency (``decay``): pooling with a per-head forgetting factor, s_i = e^{-lambda} s_{i-1} + e^{a_i} x_i (and
z likewise), gives weights e^{a_j - lambda (i - j)}; the e^{-lambda i} cancels between s_i and z_i, so it is
exactly the plain pooling with scores a_j + lambda j. A position-linear score bias (ALiBi's slopes, Press
et al. 2022) therefore turns each head into an exponential moving average of its own time scale, with
the same O(1) state and no change to the op. "fixed" uses slopes 2^(-8h/H); "learned" starts there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnfree.layers.validation import check_mode
from attnfree.ops.additive import (
    AdditiveState,
    additive_pool,
    additive_pool_step,
    additive_pool_step_,
    init_additive_state,
)
from attnfree.ops.shift import mix, token_shift, token_shift_step

DECAY_MODES = ("none", "fixed", "learned")
RESIDUAL_MODES = ("raw", "normed")
# How a pooling runs: "parallel" (training, prefill, a chunk continuing from a state), "step" (one token through the
# recurrent form, with autograd and a padding mask), "step_inplace" (one real token, no autograd: the state is
# updated in place, the decoding hot path). "auto" picks by ``pool_path``; a test or a user may force one.
POOL_PATHS = ("auto", "parallel", "step", "step_inplace")


def pool_path(has_state: bool, T: int, masked: bool, grad: bool) -> str:
    """The path "auto" takes: a step for one token with a state, in place when nothing needs the old state."""
    if not has_state or T != 1:
        return "parallel"
    return "step" if masked or grad else "step_inplace"


def alibi_log_slopes(n_heads: int) -> Tensor:
    """log of ALiBi's geometric slopes 2^(-8 h / H), h = 1..H: time scales from ~2 to ~256 tokens."""
    return -(8.0 * torch.arange(1, n_heads + 1, dtype=torch.float32) / n_heads) * math.log(2.0)


@dataclass(frozen=True)
class MixerOptions:
    """The options that bring the additive mixer closer to RWKV's time mixing; each off by default (today's layer).

    pool_head_size: channels per pooling score (0: the attention head size D; 1: one score per channel, RWKV's
        per-channel weighting); the heads of the poolings are then C / pool_head_size "pool heads".
    decay_per: "head" (one slope per attention head, shared by its pool heads) or "pool_head" (one per pool head,
        ALiBi's geometric slopes spread over all of them: time scales from ~2 to ~256 tokens across channels).
    bonus: a learned current-token bonus u per pool head (RWKV's u), in the read-out only.
    token_shift: q, k, v (and the gate) from a learned per-channel mix of the position's and the previous position's
        normalised input (RWKV's time mix; its state is one vector).
    gate: a sigmoid gate (RWKV's receptance) on the mixer's output, h + sigmoid(W_r x) * (mixer(h) - h).
    """

    pool_head_size: int = 0
    decay_per: str = "head"
    bonus: bool = False
    token_shift: bool = False
    gate: bool = False


DECAY_PER = ("head", "pool_head")


class FastformerAttention(nn.Module):
    def __init__(self, hidden_size: int, n_heads: int, dropout: float, eps: float, residual: str, chunk: int,
                 decay: str = "none", options: MixerOptions | None = None):
        super().__init__()
        o = options or MixerOptions()
        check_mode("FastformerAttention.residual", residual, RESIDUAL_MODES)
        check_mode("FastformerAttention.decay", decay, DECAY_MODES)
        check_mode("FastformerAttention.decay_per", o.decay_per, DECAY_PER)
        self.n_heads, self.head_dim = n_heads, hidden_size // n_heads
        self.pool_dim = o.pool_head_size or self.head_dim  # d: channels per pooling score
        if self.head_dim % self.pool_dim:
            raise ValueError(f"pool_head_size {self.pool_dim} must divide the head size {self.head_dim}")
        self.pool_heads = hidden_size // self.pool_dim  # G
        self.residual, self.chunk, self.decay, self.options = residual, chunk, decay, o
        self.path = "auto"  # one of POOL_PATHS (see pool_path); set it to force a path
        slopes = self.pool_heads if o.decay_per == "pool_head" else n_heads
        if decay == "learned":  # log-slopes for the query and key poolings
            self.log_slopes = nn.Parameter(alibi_log_slopes(slopes).repeat(2, 1))  # [2, H or G]
        elif decay == "fixed":
            self.register_buffer("log_slopes", alibi_log_slopes(slopes).repeat(2, 1), persistent=False)
        if o.bonus:
            self.bonus = nn.Parameter(torch.zeros(2, self.pool_heads))  # u per pool head (0: no bonus at the start)
        if o.token_shift:
            self.time_mix = nn.Parameter(torch.full((3 + o.gate, hidden_size), 0.5))  # q, k, v (, gate) mixes
        if o.gate:
            self.gate = nn.Linear(hidden_size, hidden_size, bias=False)
        self.attn_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=False)  # W_q, W_k, W_v fused
        self.query_score = nn.Parameter(torch.zeros(hidden_size))  # w_q, one d-vector per pool head
        self.key_score = nn.Parameter(torch.zeros(hidden_size))  # w_k
        self.out_proj = nn.Linear(hidden_size, hidden_size, bias=False)  # projection of the pooled query
        self.mid_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def scores(self, xh: Tensor, w: Tensor, which: int, positions: Tensor) -> Tensor:
        """a_j = <w_g, x_j> / sqrt(d) (+ lambda_g j with decay). xh: [B, T, G, d], positions: [B, T] -> [B, T, G]."""
        a = (xh * w.view(self.pool_heads, self.pool_dim)).sum(-1) / math.sqrt(self.pool_dim)
        if self.decay == "none":
            return a
        acc = torch.promote_types(a.dtype, torch.float32)  # lambda j grows with j: at least float32 (float64 stays)
        slopes = self.log_slopes[which].to(acc).exp()  # [H] or [G]
        if slopes.shape[0] != self.pool_heads:  # one slope per attention head, shared by its pool heads
            slopes = slopes.repeat_interleave(self.pool_heads // self.n_heads)
        return a.to(acc) + positions.unsqueeze(-1).to(acc) * slopes

    def pool(self, x: Tensor, which: int, positions: Tensor, mask: Tensor | None,
             cache: dict[str, Any] | None) -> Tensor:
        """Causal additive pooling of x [B, T, C] per pool head (which: 0 = query pool, 1 = key pool)."""
        B, T, C = x.shape
        key = ("query", "key")[which]
        xh = x.view(B, T, self.pool_heads, self.pool_dim)  # [B, T, G, d]
        scores = self.scores(xh, (self.query_score, self.key_score)[which], which, positions)  # [B, T, G]
        bonus = self.bonus[which] if self.options.bonus else None
        state = cache.get(key) if cache is not None else None
        path = self.path if self.path != "auto" else pool_path(state is not None, T, mask is not None,
                                                                torch.is_grad_enabled())
        new_state: AdditiveState | None
        if path == "parallel":  # training / prefill (continuing from a state if there is one); Triton on GPU
            g, new_state = additive_pool(xh, scores, mask, state, cache is not None, self.chunk, bonus)
        else:
            if state is None or T != 1 or (path == "step_inplace" and mask is not None):
                raise ValueError(f"pool path {path!r} needs one real token and a state, got T={T}, "
                                 f"state={state is not None}, mask={mask is not None}")
            if path == "step_inplace":  # decoding: O(1), the state's own tensors updated
                g, new_state = additive_pool_step_(xh[:, 0], scores[:, 0], state, bonus).unsqueeze(1), state
            else:  # decoding: O(1) recurrent step, a new state
                g, new_state = additive_pool_step(xh[:, 0], scores[:, 0], None if mask is None else mask[:, 0],
                                                  state, bonus)
                g = g.unsqueeze(1)
        if cache is not None:
            cache[key] = new_state
        return g.reshape(B, T, C)

    def init_state(self, batch: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
                   ) -> dict[str, Any]:
        """Nothing seen: the two poolings' empty sums (and zeros for the token shift's previous input)."""
        state: dict[str, Any] = {key: init_additive_state(batch, self.pool_heads, self.pool_dim, dtype, device)
                                 for key in ("query", "key")}
        if self.options.token_shift:
            state["shift"] = torch.zeros(batch, self.qkv.in_features, dtype=dtype, device=device)
        return state

    def inputs(self, n: Tensor, mask: Tensor | None, cache: dict[str, Any] | None) -> tuple[Tensor, ...]:
        """q, k, v [B, T, C] (and the gate's input): from n, or with token shift from per-channel mixes of n and the
        previous position's n."""
        if not self.options.token_shift:
            return (*self.qkv(n).chunk(3, dim=-1), n)
        state = cache.get("shift") if cache is not None else None
        if state is not None and n.shape[1] == 1:
            prev, new = token_shift_step(n[:, 0], None if mask is None else mask[:, 0], state)
            prev = prev.unsqueeze(1)
        else:
            prev, new = token_shift(n, mask, state)
        if cache is not None:
            cache["shift"] = new
        mixed = [mix(n, prev, mu) for mu in self.time_mix]
        q, k, v = (F.linear(m, w) for m, w in zip(mixed, self.qkv.weight.chunk(3), strict=False))
        return q, k, v, mixed[-1] if self.options.gate else n

    def forward(self, h: Tensor, positions: Tensor, mask: Tensor | None,
                cache: dict[str, Any] | None = None) -> Tensor:
        """h: [B, T, C] -> [B, T, C] (residuals included). positions: [B, T] long (real-token index),
        mask: [B, T] bool, True = real token."""
        n = self.attn_norm(h)
        q, k, v, gate_in = self.inputs(n, mask, cache)  # [B, T, C] each
        g_q = self.out_proj(self.dropout(self.pool(q, 0, positions, mask, cache)))
        r = (h if self.residual == "raw" else n) + g_q * k
        g_k = self.dropout(self.pool(self.mid_norm(r), 1, positions, mask, cache))
        out = r + g_k * v
        if self.options.gate:  # only the mixer's contribution passes the gate
            return h + torch.sigmoid(self.gate(gate_in)) * (out - h)
        return out
