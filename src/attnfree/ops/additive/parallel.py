"""Causal additive attention, chunked parallel form (training and prefill).

Time is cut into N chunks of C positions. With a running max m_i (online softmax) every weight is
exp(a_j - m_i) <= 1, so any score magnitude is safe in float32. Per (batch, head):

1. chunk summaries relative to each chunk's own max r_c:  S_c = sum_{j in c} exp(a_j - r_c) x_j, Z_c likewise
2. what all earlier chunks carry into chunk c, relative to R_c = max_{c' < c} r_c' (and the initial state):
   P_c = sum_{c' < c} exp(r_c' - R_c) S_c'     -- an [N, N] lower-triangular matmul, no Python loop
3. inside chunk c, position i with m_i = max(R_c, max_{j <= i in c} a_j):
   s_i = sum_{j <= i in c} exp(a_j - m_i) x_j + exp(R_c - m_i) P_c     -- a [C, C] masked matmul
4. g_i = s_i / z_i (0 where nothing valid was seen yet).

The maxima only pick a reference point that cancels in s_i / z_i, so they are computed from detached
scores; gradients flow through the exponentials and the values exactly as in the plain formula.
Cost per (batch, head): O(T C D + (T/C)^2 D) time, O(T C) extra memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from attnfree.ops.additive.state import AdditiveState, check_inputs, finite_or_zero, safe_divide, state_dtype

DEFAULT_CHUNK_SIZE = 64


def _exp_lower(diff: Tensor, strict: bool) -> Tensor:
    """exp(diff) on the (strictly) lower triangle of the last two dims, 0 elsewhere.

    The upper triangle is set to -inf *before* exp so that neither the value nor the gradient sees an
    overflow there (exp of a large positive entry would give inf, and inf * 0 = NaN in backward).
    """
    n, k = diff.shape[-2:]
    keep = torch.ones(n, k, dtype=torch.bool, device=diff.device).tril(-1 if strict else 0)
    return diff.masked_fill(~keep, float("-inf")).exp()


def _to_chunks(x: Tensor, a: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """x [B, T, H, D], a [B, T, H] -> x [B, H, N, C, D], a [B, H, N, C]; pads time with a = -inf, x = 0."""
    B, T, H, D = x.shape
    pad = (-T) % chunk
    if pad:
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        a = F.pad(a, (0, 0, 0, pad), value=float("-inf"))
    n = (T + pad) // chunk
    return x.view(B, n, chunk, H, D).permute(0, 3, 1, 2, 4), a.view(B, n, chunk, H).permute(0, 3, 1, 2)


def additive_pool_parallel(
    x: Tensor,
    scores: Tensor,
    mask: Tensor | None = None,
    initial_state: AdditiveState | None = None,
    output_final_state: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[Tensor, AdditiveState | None]:
    """g_i = sum_{j<=i} exp(a_j) x_j / sum_{j<=i} exp(a_j) per head, stable for any score magnitude.

    x: [B, T, H, D], scores: [B, T, H], mask: [B, T] bool (True = real token; padding contributes
    nothing, anywhere in the sequence). Returns g: [B, T, H, D] in x's dtype and, if asked, the state
    after the last position (accumulated in float32, or float64 for float64 inputs).
    """
    check_inputs(x, scores, mask, initial_state)
    B, T, H, D = x.shape
    acc = state_dtype(x.dtype)
    a = scores.to(acc)
    if mask is not None:
        a = a.masked_fill(~mask.bool().unsqueeze(-1), float("-inf"))
    xc, ac = _to_chunks(x.to(acc), a, max(1, min(chunk_size, T)))  # [B, H, N, C, D], [B, H, N, C]
    s0, z0, m0 = initial_state if initial_state is not None else (None, None, None)

    # 1. running max inside each chunk and each chunk's own max (detached: reference points only)
    m_local = torch.cummax(ac.detach(), dim=-1).values  # [B, H, N, C]
    r = m_local[..., -1]  # [B, H, N]
    w = torch.exp(ac - finite_or_zero(r).unsqueeze(-1))  # [B, H, N, C]
    S = torch.einsum("bhnc,bhncd->bhnd", w, xc)  # [B, H, N, D]
    Z = w.sum(-1)  # [B, H, N]

    # 2. carry from earlier chunks: R_c = max(m0, r_0 .. r_{c-1}), P_c = sum_{c'<c} exp(r_c' - R_c) S_c'
    R = torch.cat([torch.full_like(r[..., :1], float("-inf")), torch.cummax(r, dim=-1).values[..., :-1]], -1)
    if m0 is not None:
        R = torch.maximum(R, m0.to(acc).unsqueeze(-1))
    W = _exp_lower(r.unsqueeze(-2) - finite_or_zero(R).unsqueeze(-1), strict=True)  # [B, H, N, N]
    P, Q = W @ S, (W @ Z.unsqueeze(-1)).squeeze(-1)  # [B, H, N, D], [B, H, N]
    if m0 is not None and s0 is not None and z0 is not None:
        e0 = torch.exp(m0.to(acc).unsqueeze(-1) - finite_or_zero(R))  # [B, H, N]
        P = P + e0.unsqueeze(-1) * s0.to(acc).unsqueeze(-2)
        Q = Q + e0 * z0.to(acc).unsqueeze(-1)

    # 3. inside each chunk, relative to m_i = max(R_c, running max up to i)
    m = torch.maximum(m_local, R.unsqueeze(-1))  # [B, H, N, C]
    mf = finite_or_zero(m)
    A = _exp_lower(ac.unsqueeze(-2) - mf.unsqueeze(-1), strict=False)  # [B, H, N, C, C]
    carry = torch.exp(R.unsqueeze(-1) - mf)  # [B, H, N, C]
    s = A @ xc + carry.unsqueeze(-1) * P.unsqueeze(-2)  # [B, H, N, C, D]
    z = A.sum(-1) + carry * Q.unsqueeze(-1)  # [B, H, N, C]

    # 4. g = s / z, back to [B, T, H, D]
    g = safe_divide(s, z).flatten(2, 3)[:, :, :T].transpose(1, 2).to(x.dtype)
    final = None
    if output_final_state:  # padded tail positions have a = -inf, so the last slot holds the state at T-1
        final = AdditiveState(s[:, :, -1, -1], z[:, :, -1, -1], m[:, :, -1, -1])
    return g, final
