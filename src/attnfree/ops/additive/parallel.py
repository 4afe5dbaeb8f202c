"""Causal additive attention, chunked parallel form (training and prefill).

Every position is an *item* (S, Z, r): a sum of values S and of weights Z, both relative to the score r
(a raw token is (x_j, 1, a_j)). The inclusive scan of items is the state at each position,

    m_i = max_{j<=i} r_j,    s_i = sum_{j<=i} exp(r_j - m_i) S_j,    z_i = sum_{j<=i} exp(r_j - m_i) Z_j,

and g_i = s_i / z_i. Every exponent is <= 0 (online softmax), so no score magnitude can overflow.
Time is cut into chunks of C positions, per (batch, head):

1. inside each chunk, a masked [C, C] matmul with weights exp(r_j - m_i) <= 1 (running max within the chunk);
2. each chunk's last position summarises it as one item; the scan of those T/C items (the same function,
   recursively) is what earlier chunks carry into each chunk;
3. combine: rescale both parts to m_i = max(carry max, local max) and add.

Cost O(T C D) with recursion depth log_C(T); no Python loop over time. The maxima come from detached
scores: they only pick a reference point that cancels in s / z, so gradients are those of the plain formula.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from attnfree.ops.additive.state import (
    NO_OPTIONS,
    AdditiveState,
    PoolOptions,
    check_inputs,
    finite_or_zero,
    init_additive_state,
    read_out_bonus,
    safe_divide,
    state_dtype,
)


def _exp_lower(diff: Tensor) -> Tensor:
    """exp(diff) on the lower triangle (diagonal included) of the last two dims, 0 above.

    The upper triangle is set to -inf *before* exp so that neither the value nor the gradient sees an
    overflow there (exp of a large positive entry would give inf, and inf * 0 = NaN in backward).
    """
    n = diff.shape[-1]
    upper = torch.ones(n, n, dtype=torch.bool, device=diff.device).triu(1)
    return diff.masked_fill(upper, float("-inf")).exp()


def _scan_chunk(S: Tensor, Z: Tensor, r: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Inclusive scan inside chunks by one masked matmul. S [..., C, D], Z/r [..., C] -> (s, z, m)."""
    m = torch.cummax(r.detach(), dim=-1).values  # [..., C]
    A = _exp_lower(r.unsqueeze(-2) - finite_or_zero(m).unsqueeze(-1))  # [..., C, C]: exp(r_j - m_i), j <= i
    return A @ S, (A @ Z.unsqueeze(-1)).squeeze(-1), m


def stable_scan(S: Tensor, Z: Tensor, r: Tensor, chunk: int) -> tuple[Tensor, Tensor, Tensor]:
    """Inclusive prefix sums of weighted items along time, relative to a running maximum: with S: [B, H, T, D],
    Z, r: [B, H, T] (items S_j, Z_j at log-weight r_j), returns s_i = sum_{j<=i} exp(r_j - m_i) S_j, z_i likewise
    for Z, and m_i = max_{j<=i} r_j, each of its input's shape; chunked (chunks of ``chunk``) so the work is
    O(T * chunk)."""
    T = r.shape[-1]
    if T <= chunk:
        return _scan_chunk(S, Z, r)
    # 1. cut into N chunks (padding items have r = -inf: weight exactly 0)
    pad = (-T) % chunk
    if pad:
        S, Z = F.pad(S, (0, 0, 0, pad)), F.pad(Z, (0, pad))
        r = F.pad(r, (0, pad), value=float("-inf"))
    n = (T + pad) // chunk
    s_loc, z_loc, m_loc = _scan_chunk(S.unflatten(-2, (n, chunk)), Z.unflatten(-1, (n, chunk)),
                                      r.unflatten(-1, (n, chunk)))  # [B, H, N, C, (D)]
    # 2. scan of the chunk summaries, shifted by one: what chunks 0..c-1 carry into chunk c
    P, Q, R = stable_scan(s_loc[..., -1, :], z_loc[..., -1], m_loc[..., -1], chunk)  # [B, H, N, (D)]
    P, Q = F.pad(P[..., :-1, :], (0, 0, 1, 0)), F.pad(Q[..., :-1], (1, 0))
    R = F.pad(R[..., :-1], (1, 0), value=float("-inf"))
    # 3. combine at m_i = max(R_c, local running max)
    m = torch.maximum(m_loc, R.unsqueeze(-1))  # [B, H, N, C]
    mf = finite_or_zero(m)
    e_loc, e_carry = torch.exp(m_loc - mf), torch.exp(R.unsqueeze(-1) - mf)
    s = e_loc.unsqueeze(-1) * s_loc + e_carry.unsqueeze(-1) * P.unsqueeze(-2)
    z = e_loc * z_loc + e_carry * Q.unsqueeze(-1)
    return s.flatten(-3, -2)[..., :T, :], z.flatten(-2)[..., :T], m.flatten(-2)[..., :T]


def _merge_state(s: Tensor, z: Tensor, m: Tensor, state: AdditiveState) -> tuple[Tensor, Tensor, Tensor]:
    """Add a previous state (s0, z0, m0) [B, H, (D)] to every position of s, z, m [B, H, T, (D)]."""
    m0 = state.m.to(m.dtype).unsqueeze(-1)
    m_new = torch.maximum(m, m0)
    mf = finite_or_zero(m_new)
    e, e0 = torch.exp(m - mf), torch.exp(m0 - mf)
    s = e.unsqueeze(-1) * s + e0.unsqueeze(-1) * state.s.to(s.dtype).unsqueeze(-2)
    return s, e * z + e0 * state.z.to(z.dtype).unsqueeze(-1), m_new


def additive_pool_parallel(x: Tensor, scores: Tensor, mask: Tensor | None = None,
                           initial_state: AdditiveState | None = None, options: PoolOptions = NO_OPTIONS
                           ) -> tuple[Tensor, AdditiveState | None]:
    """g_i = sum_{j<=i} exp(a_j) x_j / sum_{j<=i} exp(a_j) per head, stable for any score magnitude.

    x: [B, T, H, D], scores: [B, T, H], mask: [B, T] bool (True = real token; padding contributes
    nothing, anywhere in the sequence); ``options`` (``PoolOptions``): the final state, the current-token bonus
    (``state.read_out_bonus``), the chunk length. Returns g: [B, T, H, D] in x's dtype and, if asked, the state
    after the last position (accumulated in float32, or float64 for float64 inputs).
    """
    check_inputs(x, scores, mask, initial_state)
    bonus, acc = options.bonus, state_dtype(x.dtype)
    a = scores.to(acc)
    if mask is not None:
        a = a.masked_fill(~mask.bool().unsqueeze(-1), float("-inf"))
    # 1. heads first: S = x [B, H, T, D], Z = 1, r = a [B, H, T]
    S, r = x.to(acc).transpose(1, 2), a.transpose(1, 2)
    s, z, m = stable_scan(S, torch.ones_like(r), r, max(2, options.chunk_size))  # a chunk of 1 would never shrink T
    # 2. a previous state (prefill continuing, chunked prefill) enters every position
    if initial_state is not None:
        s, z, m = _merge_state(s, z, m, initial_state)
    # 3. g = s / z (0 where nothing valid was seen), back to [B, T, H, D]; with a bonus, from the sums before each
    # position (the sums at the position before it, the initial state's at the first) and the token itself
    if bonus is None:
        g = safe_divide(s, z)
    else:
        B, H = S.shape[0], S.shape[1]
        start = initial_state if initial_state is not None else init_additive_state(B, H, S.shape[-1], acc, S.device)
        s_prev = torch.cat([start.s.to(acc).unsqueeze(2), s[:, :, :-1]], 2)
        z_prev = torch.cat([start.z.to(acc).unsqueeze(2), z[:, :, :-1]], 2)
        m_prev = torch.cat([start.m.to(acc).unsqueeze(2), m[:, :, :-1]], 2)
        g = read_out_bonus(s_prev, z_prev, m_prev, S, r, bonus.to(acc).unsqueeze(-1))  # bonus [H, 1]: heads first
    g = g.transpose(1, 2).to(x.dtype)
    # (cloned: a view would keep the whole [B, H, T, D] prefill alive in the decoding cache)
    if not options.output_final_state:
        return g, None
    return g, AdditiveState(s[:, :, -1].clone(), z[:, :, -1].clone(), m[:, :, -1].clone())
