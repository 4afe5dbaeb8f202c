"""Windowed additive pooling, parallel form (training and prefill): O(T D) work per head for any window k.

The window of position i is (i - k, i]. The difference of prefix sums, g_i = (s_i - s_{i-k}) / (z_i - z_{i-k}),
is exact in real numbers but not in floating point: the two sums share every term before the window, so when the
window's mass is small next to that shared prefix the subtraction cancels to noise (or to 0/0); and one running max
cannot serve both ends (exp(a - m) underflows for a window far below an earlier peak). Instead, as in the van Herk /
Gil-Werman sliding-window algorithm, time is cut into blocks of length k, aligned so that every window is the
suffix of one block joined to the prefix of the next:

    (i - k, i] = [r + 1, k) of block b - 1  U  [0, r] of block b,        i = b k + r.

1. prefix scan inside every block: (s, z, m) of [0, r], relative to the prefix's own running max;
2. suffix scan inside every block (the prefix scan of the reversed block): (s, z, m) of [r, k), its own max;
3. g_i from the previous block's suffix at r + 1 and the current block's prefix at r, both rescaled to the
   larger of their two maxima: a sum of two non-negative parts, never a difference.

Both scans are ``ops.additive``'s stable chunked scan, so every exponent is <= 0 and the work is O(T C D) with C its
chunk, whatever k. The k positions before the sequence (a previous state's ring, or k empty positions with
a = -inf) are block 0, so continuing from a state is the same computation as the whole sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from attnfree.ops.additive.parallel import _scan
from attnfree.ops.additive.state import finite_or_zero, safe_divide, state_dtype
from attnfree.ops.windowed.state import (
    WindowOptions,
    WindowState,
    check_window_inputs,
    init_window_state,
    masked_scores,
)


def _join(s1: Tensor, z1: Tensor, m1: Tensor, s2: Tensor, z2: Tensor, m2: Tensor) -> Tensor:
    """(s1 + s2) / (z1 + z2) for two partial sums relative to their own maxima m1, m2: both rescaled to max(m1, m2)
    (so no exponent is positive), 0 where neither holds anything. s: [..., D], z, m: [...]."""
    top = finite_or_zero(torch.maximum(m1, m2))
    e1, e2 = torch.exp(m1 - top), torch.exp(m2 - top)  # 0 for an empty part (m = -inf)
    return safe_divide(e1.unsqueeze(-1) * s1 + e2.unsqueeze(-1) * s2, e1 * z1 + e2 * z2)


def windowed_pool_parallel(x: Tensor, scores: Tensor, mask: Tensor | None, initial_state: WindowState | None,
                           options: WindowOptions) -> tuple[Tensor, WindowState | None]:
    """g_i = sum_{i-k<j<=i} exp(a_j) x_j / sum_{i-k<j<=i} exp(a_j) per head, stable for any score magnitude.

    x: [B, T, H, D], scores: [B, T, H], mask: [B, T] bool (True = real token; padding weighs nothing);
    ``options`` (``WindowOptions``): the window k, the final state, the scans' chunk length. Returns g: [B, T, H, D]
    in x's dtype (0 where the window holds no real token) and, if asked, the state after the last position.
    """
    check_window_inputs(x, scores, mask, initial_state, options)
    B, T, H, D = x.shape
    k, acc = options.window, state_dtype(x.dtype)
    start = initial_state if initial_state is not None else init_window_state(B, H, D, k, acc, x.device)
    # 1. the k positions before, then the sequence, padded with empty positions to N whole blocks; heads first
    xs = torch.cat([start.x.to(acc), x.to(acc)], 1)  # [B, k + T, H, D]
    a_s = torch.cat([start.a.to(acc), masked_scores(scores, mask, acc)], 1)  # [B, k + T, H]
    pad = (-(k + T)) % k
    n = (k + T + pad) // k
    S = F.pad(xs, (0, 0, 0, 0, 0, pad)).transpose(1, 2).unflatten(2, (n, k))  # [B, H, N, k, D]
    r = F.pad(a_s, (0, 0, 0, pad), value=float("-inf")).transpose(1, 2).unflatten(2, (n, k))  # [B, H, N, k]
    ones, chunk = torch.ones_like(r), max(2, options.chunk_size)
    # 2. prefix (s, z, m) of [0, r] and suffix of [r, k) inside every block
    sp, zp, mp = _scan(S, ones, r, chunk)
    ss, zs, ms = (t.flip(-2 if t.dim() == 5 else -1) for t in _scan(S.flip(-2), ones, r.flip(-1), chunk))
    # 3. the suffix from r + 1 (empty past the block's end) of blocks 0..N-2 joins the prefix at r of blocks 1..N-1
    ss, zs = F.pad(ss[..., :-1, 1:, :], (0, 0, 0, 1)), F.pad(zs[..., :-1, 1:], (0, 1))
    ms = F.pad(ms[..., :-1, 1:], (0, 1), value=float("-inf"))
    g = _join(ss, zs, ms, sp[:, :, 1:], zp[:, :, 1:], mp[:, :, 1:])  # [B, H, N-1, k, D]
    g = g.flatten(2, 3)[:, :, :T].transpose(1, 2).to(x.dtype)  # position i of the sequence is block 1's row 0 + i
    if not options.output_final_state:
        return g, None
    return g, WindowState(xs[:, T:].clone(), a_s[:, T:].clone())  # the last k positions
