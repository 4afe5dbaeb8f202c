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

Windows (``window`` k, LEAP's local attention): both poolings take the softmax over the last k positions only
(``ops.windowed``); None pools everything seen. A windowed pooling's state is the ring of its last k entries.
State: {"query": AdditiveState | WindowState, "key": ...} (+ "shift": [B, C] with token shift).

``LeapAttention`` is LEAP's mechanism (mtanghu/LEAP, the Fastformer author's later design) as a sublayer: one
pooling of the keys and values with a content-dependent score (focus), gated by the query's alignment with the
pooled keys (its class docstring).
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
from attnfree.ops.windowed import (
    WindowOptions,
    WindowState,
    init_window_state,
    windowed_pool_parallel,
    windowed_pool_step,
)

DECAY_MODES = ("none", "fixed", "learned")
RESIDUAL_MODES = ("raw", "normed")
POOLS = ("query", "key")  # the two poolings; row i of log_slopes and bonus belongs to POOLS[i]
FOCUS_MODES = ("vector", "dot", "normed_dot")  # LeapAttention's pooling score (its class docstring)
LEAP_RESCALE = 10.0  # LEAP's rescale of normalised focus dot products: scores within +-10 at the start


def alibi_log_slopes(n_heads: int) -> Tensor:
    """log of ALiBi's geometric slopes 2^(-8 h / H), h = 1..H: time scales from ~2 to ~256 tokens."""
    return -(8.0 * torch.arange(1, n_heads + 1, dtype=torch.float32) / n_heads) * math.log(2.0)


def check_window(window: int | None) -> int | None:
    """A pooling window: None or 0 (global, returned as None) or k >= 1."""
    if window is None or window == 0:
        return None
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"window must be None, 0 (global) or a positive integer, got {window!r}")
    return window


def with_recency(a: Tensor, log_slopes: Tensor | None, positions: Tensor) -> Tensor:
    """Scores a [B, T, H] plus lambda_h j (per-head recency, the module docstring); unchanged without slopes [H]."""
    if log_slopes is None:
        return a
    acc = torch.promote_types(a.dtype, torch.float32)  # lambda j grows with j: at least float32 (float64 stays)
    return a.to(acc) + positions.unsqueeze(-1).to(acc) * log_slopes.to(acc).exp()


def pool_heads(xh: Tensor, scores: Tensor, ctx: BlockContext, state: SublayerState | None, key: str,
               window: int | None, chunk: int, bonus: Tensor | None = None) -> Tensor:
    """Causal additive pooling of xh [B, T, H, D] under scores [B, T, H], global (window None) or over the last
    ``window`` positions; its state under ``state[key]``. Returns [B, T, H, D]."""
    if window is not None:
        def window_step(prev: WindowState) -> tuple[Tensor, WindowState]:  # decoding: O(k) per token
            g, new = windowed_pool_step(xh[:, 0], scores[:, 0], ctx.last_mask, prev)
            return g.unsqueeze(1), new

        def window_parallel(prev: WindowState | None, keep: bool) -> tuple[Tensor, WindowState | None]:
            return windowed_pool_parallel(xh, scores, ctx.mask, prev, WindowOptions(window, keep, chunk))

        return stateful(state, key, xh.shape[1], window_step, window_parallel)

    def step(prev: AdditiveState) -> tuple[Tensor, AdditiveState]:  # decoding: O(1) per token
        if ctx.mask is None and not torch.is_grad_enabled():  # the hot path: the state's own tensors updated
            return additive_pool_step_(xh[:, 0], scores[:, 0], prev, bonus).unsqueeze(1), prev
        g, new = additive_pool_step(xh[:, 0], scores[:, 0], ctx.last_mask, prev, bonus)
        return g.unsqueeze(1), new

    def parallel(prev: AdditiveState | None, keep: bool) -> tuple[Tensor, AdditiveState | None]:
        return additive_pool(xh, scores, ctx.mask, prev, PoolOptions(keep, bonus, chunk))

    return stateful(state, key, xh.shape[1], step, parallel)


def init_pool_state(batch: int, heads: int, head_dim: int, window: int | None, dtype: torch.dtype,
                    device: torch.device | None) -> AdditiveState | WindowState:
    """The empty state of one pooling: running sums (global) or an empty ring of k entries (windowed)."""
    if window is None:
        return init_additive_state(batch, heads, head_dim, dtype, device)
    return init_window_state(batch, heads, head_dim, window, dtype, device)


class FastformerAttention(Sublayer):
    """x [B, T, C] -> the attention branch [B, T, C] (see the module docstring).

    Args:
        hidden_size: C; n_heads: H; dropout: on the pooled vectors; eps: LayerNorm epsilon.
        chunk: chunk length of the parallel pooling (speed only).
        decay: "none", "fixed" or "learned" per-head recency.
        residual: "raw" (h) or "normed" (n, the earlier design) under the mid-attention residual.
        bonus, token_shift: the options toward RWKV (module docstring).
        window: None or 0 pools everything seen; k >= 1 pools the last k positions (no bonus then).
    """

    def __init__(self, hidden_size: int, n_heads: int, dropout: float, eps: float, chunk: int,
                 decay: str = "learned", residual: str = "raw", bonus: bool = False, token_shift: bool = False,
                 window: int | None = None):
        super().__init__()
        check_mode("FastformerAttention.residual", residual, RESIDUAL_MODES)
        check_mode("FastformerAttention.decay", decay, DECAY_MODES)
        self.window = check_window(window)
        if bonus and self.window is not None:
            raise ValueError("FastformerAttention: the current-token bonus is not built for windowed pooling")
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
        return with_recency(a, None if self.decay == "none" else self.log_slopes[POOLS.index(pool)], positions)

    def pool(self, x: Tensor, pool: str, ctx: BlockContext, state: SublayerState | None) -> Tensor:
        """Causal additive pooling of x [B, T, C] per head ("query" or "key" pool), its state under ``state[pool]``."""
        B, T, C = x.shape
        xh = x.view(B, T, self.n_heads, self.head_dim)  # [B, T, H, D]
        scores = self.scores(xh, pool, ctx.positions)  # [B, T, H]
        bonus = self.bonus[POOLS.index(pool)] if self.has_bonus else None
        return pool_heads(xh, scores, ctx, state, pool, self.window, self.chunk, bonus).reshape(B, T, C)

    def init_state(self, batch: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
                   ) -> SublayerState:
        """Nothing seen: the two poolings' empty sums or rings (and zeros for the token shift's previous input)."""
        state: SublayerState = {pool: init_pool_state(batch, self.n_heads, self.head_dim, self.window, dtype, device)
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


class LeapAttention(Sublayer):
    """LEAP's multi-head attention (mtanghu/LEAP): x [B, T, C] -> the branch [B, T, C].

    With n = LayerNorm(x) and per-head projections of the same token (heads of size D):
    1. focus    a_j = (f_j . k_j) / sqrt(D)  ("dot"; f, k = W_f n_j, W_k n_j), or with f and k standardised per head
                and a learned per-head rescale rho_h (init LEAP's 10), a_j = rho_h (f^_j . k^_j) / D ("normed_dot"),
                or the Fastformer's learned vector, a_j = (w . k_j) / sqrt(D) ("vector"; no W_f); + lambda_h j with
                decay, as in ``FastformerAttention``
    2. pool     g^k_i, g^v_i = softmax_j(a_j) over the window (the last k positions, or all) of k_j and v_j
    3. align    y_i = sigmoid(q_i . g^k_i / sqrt(D)) g^v_i  (q = W_q n); without ``alignment``, y_i = g^v_i
                (LEAP's code returned the pooled values alone until it applied the gate: both are built)
    No output projection (as in LEAP): the pooling is linear in v, so W_v already is one; W_q, W_f, W_k, W_v are one
    fused matrix of the pieces in use. State: {"pool": AdditiveState | WindowState} over [k, v] (v alone without
    alignment).

    Args:
        hidden_size: C; n_heads: H; dropout: on the output; eps: LayerNorm epsilon; chunk: the pooling's chunk.
        window: None or 0 (global) or k >= 1; focus: one of FOCUS_MODES; alignment: the query gate;
        decay: "none", "fixed" or "learned" recency of the pooling score.
    """

    def __init__(self, hidden_size: int, n_heads: int, dropout: float, eps: float, chunk: int,
                 window: int | None = None, focus: str = "dot", alignment: bool = True, decay: str = "learned"):
        super().__init__()
        check_mode("LeapAttention.focus", focus, FOCUS_MODES)
        check_mode("LeapAttention.decay", decay, DECAY_MODES)
        self.n_heads, self.head_dim = n_heads, hidden_size // n_heads
        self.chunk, self.window, self.focus, self.alignment, self.decay = chunk, check_window(window), focus, \
            alignment, decay
        self.pieces = ("q",) * alignment + ("f",) * (focus != "vector") + ("k", "v")
        self.attn_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.proj = nn.Linear(hidden_size, len(self.pieces) * hidden_size, bias=False)  # the pieces, fused
        if focus == "vector":
            self.focus_vector = nn.Parameter(torch.empty(hidden_size))  # w, one D-vector per head
        if focus == "normed_dot":
            self.log_rescale = nn.Parameter(torch.empty(n_heads))  # log rho_h
        if decay == "learned":
            self.log_slopes = nn.Parameter(torch.empty(n_heads))  # [H]
        elif decay == "fixed":
            self.register_buffer("log_slopes", torch.empty(n_heads), persistent=False)
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """A zero focus vector (uniform pooling, as the Fastformer's), LEAP's rescale of 10, ALiBi slopes."""
        if self.focus == "vector":
            init.zeros_(self.focus_vector)
        if self.focus == "normed_dot":
            init.constant_(self.log_rescale, math.log(LEAP_RESCALE))
        if self.decay != "none":
            init.copy_(self.log_slopes, alibi_log_slopes(self.n_heads))

    def scores(self, parts: dict[str, Tensor], positions: Tensor) -> Tensor:
        """The focus a [B, T, H] from the projected pieces [B, T, H, D] (step 1 of the class docstring)."""
        k, D = parts["k"], self.head_dim
        if self.focus == "vector":
            a = (k * self.focus_vector.view(self.n_heads, D)).sum(-1) / math.sqrt(D)
        elif self.focus == "dot":
            a = (parts["f"] * k).sum(-1) / math.sqrt(D)
        else:
            f_hat, k_hat = (nn.functional.layer_norm(t, (D,), eps=1e-5) for t in (parts["f"], k))
            a = (f_hat * k_hat).sum(-1) * self.log_rescale.exp() / D
        return with_recency(a, None if self.decay == "none" else self.log_slopes, positions)

    def init_state(self, batch: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
                   ) -> SublayerState:
        """Nothing seen: the pooling's empty sums (global) or ring (windowed), over [k, v] or v."""
        width = self.head_dim * (2 if self.alignment else 1)
        return {"pool": init_pool_state(batch, self.n_heads, width, self.window, dtype, device)}

    def forward(self, x: Tensor, ctx: BlockContext, state: SublayerState | None = None) -> Tensor:
        B, T, C = x.shape
        H, D = self.n_heads, self.head_dim
        # 1. the pieces of the normalised input, per head, and the focus
        projected = self.proj(self.attn_norm(x)).view(B, T, len(self.pieces), H, D)
        parts = dict(zip(self.pieces, projected.unbind(2), strict=True))  # [B, T, H, D] each
        a = self.scores(parts, ctx.positions)  # [B, T, H]
        # 2. pool [k, v] (v alone without the alignment gate) under the focus
        items = torch.cat([parts["k"], parts["v"]], -1) if self.alignment else parts["v"]
        pooled = pool_heads(items, a, ctx, state, "pool", self.window, self.chunk)  # [B, T, H, 2D or D]
        if not self.alignment:
            return self.dropout(pooled.reshape(B, T, C))
        # 3. the query's alignment with the pooled keys gates the pooled values
        g_k, g_v = pooled.split(D, -1)
        gate = torch.sigmoid((parts["q"] * g_k).sum(-1, keepdim=True) / math.sqrt(D))  # [B, T, H, 1]
        return self.dropout((gate * g_v).reshape(B, T, C))
