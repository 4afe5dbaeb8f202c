"""Causal multi-headed cross-correlation, parallel form (training and prefill).

With P_t(tau) = <q_t, k_{t-tau}> the segment score is a causal box filter along time,
R_t(tau) = sum_{j<J} P_{t-j}(tau) / sqrt(J D), so the work splits into:

1. P for the dense lags 0..n-1: time is cut into blocks of n positions; each query block meets its own and
   the previous key block in one [n, 2n] matmul, and the lag bands are read off by a skew (pad + reshape).
2. P for the remaining (dilated, O(log T)) lags: shifted elementwise products.
3. R: J shifted sums of P (exact, no cumulative-sum cancellation).
4. Softmax over the valid lags in float32 (masked lags get the most negative float; rows with no valid
   lag give 0).
5. Output: the same banded matmul (skewed back) against the values, plus shifted products for dilated lags.

Cost O(T (n + S) D + T L J) for n dense and S dilated lags, never O(T^2). Dense lags are kept internally in
reverse order (u = n-1-tau, i.e. key position t-n+1+u), which is what the skew produces. A dense run shorter
than MIN_BLOCK lags goes through the shifted products instead (tiny batched matmuls are slower); both paths
give the same values and are tested separately.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from attnfree.ops.correlation.state import (
    CorrelationState,
    LagSet,
    check_inputs,
    prepend_history,
    seen_after,
    softmax_dtype,
    state_from_sequence,
)

MIN_BLOCK = 8  # fewest dense lags worth the block matmuls


def _band(s: Tensor) -> Tensor:
    """[..., n, 2n] -> [..., n, n] with out[r, u] = s[r, r+1+u] (the skew trick: pad, flatten, re-view)."""
    n = s.shape[-1] // 2
    flat = F.pad(s.flatten(-2), (0, n + 1))  # 2n^2 + n + 1 entries
    return flat[..., 1 : 1 + n * (2 * n + 1)].unflatten(-1, (n, 2 * n + 1))[..., :n]


def _unband(a: Tensor) -> Tensor:
    """Inverse of ``_band``: [..., n, n] -> [..., n, 2n] with out[r, r+1+u] = a[r, u], zeros elsewhere."""
    n = a.shape[-1]
    flat = F.pad(F.pad(a, (0, n + 1)).flatten(-2), (1, 0))  # 2n^2 + n + 1 entries
    return flat[..., : 2 * n * n].unflatten(-1, (n, 2 * n))


def _blocks(x: Tensor, n: int) -> Tensor:
    """x [B, H, T, D] -> [B, H, N, n, D], time zero-padded to N = ceil(T / n) blocks."""
    return F.pad(x, (0, 0, 0, (-x.shape[2]) % n)).unflatten(2, (-1, n))


def _pairs(blocks: Tensor) -> Tensor:
    """[B, H, N, n, D] -> (previous, this) block pairs [B, H, N, 2n, D]; the first block's previous is 0."""
    previous = F.pad(blocks[:, :, :-1], (0, 0, 0, 0, 1, 0))
    return torch.cat([previous, blocks], dim=-2)


def _dense_scores(qh: Tensor, kh: Tensor, n: int) -> Tensor:
    """qh, kh [B, H, T, D] -> [B, H, T, n] with [..., t, u] = <q_t, k_{t-n+1+u}> (0 before the start)."""
    B, H, T, _ = qh.shape
    s = torch.matmul(_blocks(qh, n), _pairs(_blocks(kh, n)).transpose(-1, -2))  # [B, H, N, n, 2n]
    return _band(s).reshape(B, H, -1, n)[:, :, :T]


def _dense_mix(a: Tensor, vh: Tensor, n: int) -> Tensor:
    """a [B, H, T, n] (lag order of ``_dense_scores``), vh [B, H, T, D] -> sum_u a[t, u] v_{t-n+1+u}."""
    B, H, T, D = vh.shape
    o = torch.matmul(_unband(_blocks(a, n)), _pairs(_blocks(vh, n)))  # [B, H, N, n, D]
    return o.reshape(B, H, -1, D)[:, :, :T]


def _delay(x: Tensor, tau: int, T: int) -> Tensor:
    """x [B, H, T - s, ...] (the terms of positions s..T-1, s = min(tau, T)) -> [B, H, T, ...], zeros in front.

    The pad width is the lag itself, a constant of the model, so an exported graph pads by a constant (a pad width
    computed from T tripped onnxruntime's Pad before 1.29 on short prompts); the slice drops what a lag longer than
    the sequence pads too much.
    """
    widths = (0, 0) * (x.dim() - 3) + (tau, 0)
    return F.pad(x, widths)[:, :, :T]


def _sparse_scores(qh: Tensor, kh: Tensor, lags: list[int]) -> Tensor:
    """qh, kh [B, H, T, D] -> [B, H, T, S] with [..., t, i] = <q_t, k_{t - lags[i]}> (0 before the start).

    Each product runs over the T - tau positions that have a partner and is reduced over D before it is padded
    (padding the [B, H, T, D] inputs instead copies D times more: measured in docs/performance.md)."""
    T = qh.shape[2]
    cols = [_delay((qh[:, :, s:] * kh[:, :, : T - s]).sum(-1), tau, T) for tau, s in ((t, min(t, T)) for t in lags)]
    return torch.stack(cols, dim=-1)


def _sparse_mix(a: Tensor, vh: Tensor, lags: list[int]) -> Tensor:
    """a [B, H, T, S], vh [B, H, T, D] -> sum_i a[t, i] v_{t - lags[i]}: [B, H, T, D] (summed term by term: no
    [S, B, H, T, D] stack)."""
    T = vh.shape[2]
    out = torch.zeros_like(vh)
    for i, (tau, s) in enumerate((t, min(t, T)) for t in lags):
        out = out + _delay(a[:, :, s:, i, None] * vh[:, :, : T - s], tau, T)
    return out


def _split_lags(lags: list[int]) -> tuple[int, list[int]]:
    """(n, rest): lags 0..n-1 go through the block matmuls (n = 0 if the dense run is under MIN_BLOCK)."""
    n = next((i for i, tau in enumerate(lags) if tau != i), len(lags))
    n = n if n >= MIN_BLOCK else 0
    return n, lags[n:]


def _scores(qh: Tensor, kh: Tensor, n: int, sparse: list[int]) -> Tensor:
    """P_t(tau) = <q_t, k_{t-tau}>: [B, H, T, L], dense lags first (reversed), then the others."""
    parts = [_dense_scores(qh, kh, n)] if n else []
    parts += [_sparse_scores(qh, kh, sparse)] if sparse else []
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def _mix(a: Tensor, vh: Tensor, n: int, sparse: list[int]) -> Tensor:
    """sum_tau a_t(tau) v_{t-tau} for a [B, H, T, L] in the order of ``_scores``: [B, H, T, D]."""
    parts = [_dense_mix(a[..., :n], vh, n)] if n else []
    parts += [_sparse_mix(a[..., n:], vh, sparse)] if sparse else []
    return parts[0] if len(parts) == 1 else parts[0] + parts[1]


def _box_sum(p: Tensor, segment: int) -> Tensor:
    """p [B, H, T, L] -> sum_{j<J} p_{t-j} along T (terms before the start are 0)."""
    if segment == 1:
        return p
    T = p.shape[2]
    padded = F.pad(p, (0, 0, segment - 1, 0))
    out = p
    for j in range(1, segment):
        out = out + padded[:, :, segment - 1 - j : segment - 1 - j + T]
    return out


def _lag_ok(valid: Tensor | None, taus: Tensor, T: int) -> Tensor:
    """Which lags can be attended: position t - tau exists and is real. -> [B or 1, 1, T, L] bool."""
    pos = torch.arange(T, device=taus.device)[:, None] - taus[None, :]  # [T, L]
    ok = (pos >= 0)[None]
    if valid is not None:
        ok = ok & valid[:, pos.clamp(min=0)]
    return ok[:, None]


def _correlate(
    q: Tensor, k: Tensor, v: Tensor, lags: list[int], segment: int, valid: Tensor | None
) -> Tensor:
    """q, k, v [B, T, H, D], valid [B, T] bool or None -> o [B, T, H, D] (the five steps above)."""
    T, D = q.shape[1], q.shape[3]
    n, sparse = _split_lags(lags)
    taus = torch.tensor(list(range(n - 1, -1, -1)) + sparse, device=q.device)  # internal lag order
    # 0. a masked position is absent: its q and k add nothing to any segment sum
    if valid is not None:
        q, k = q * valid[:, :, None, None], k * valid[:, :, None, None]
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]
    # 1.-2. P_t(tau) for every lag: [B, H, T, L]
    p = _scores(qh, kh, n, sparse)
    # 3. segment scores
    r = _box_sum(p, segment) / math.sqrt(segment * D)
    # 4. weights over the valid lags
    ok = _lag_ok(valid, taus, T)
    sdt = softmax_dtype(q.dtype)
    a = (torch.softmax(r.to(sdt).masked_fill(~ok, torch.finfo(sdt).min), dim=-1) * ok).to(v.dtype)
    # 5. mix the values
    return _mix(a, vh, n, sparse).transpose(1, 2)


def correlation_parallel(q: Tensor, k: Tensor, v: Tensor, spec: LagSet, mask: Tensor | None = None,
                         initial_state: CorrelationState | None = None, output_final_state: bool = False
                         ) -> tuple[Tensor, CorrelationState | None]:
    """Causal cross-correlation for training and prefill: q, k, v [B, T, H, D] -> o [B, T, H, D].

    spec: the lags and segment length J (``LagSet``).  mask: [B, T] bool (True = real token).
    initial_state continues a sequence (its max(L)+J positions of history are prepended).
    """
    lag_list = check_inputs(q, k, v, spec, mask, initial_state)
    segment = spec.segment
    T = q.shape[1]
    # 1. the sequence to run on: the state's history (if any) followed by the new tokens
    qa, ka, va, valid, start = prepend_history(q, k, v, mask, initial_state)
    # 2. all positions at once; drop the outputs at the history positions
    o = _correlate(qa, ka, va, lag_list, segment, valid)[:, start:]
    if not output_final_state:
        return o, None
    # 3. the state after the last token
    seen = seen_after(initial_state, q.shape[0], T, q.device)
    return o, state_from_sequence(qa, ka, va, valid, lag_list[-1], segment, seen)
