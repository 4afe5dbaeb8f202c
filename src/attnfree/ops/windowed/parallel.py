"""Windowed additive pooling, parallel form (training and prefill): O(T D) work per head for any window k.

The window of position i is (i - k, i]. The difference of prefix sums, g_i = (s_i - s_{i-k}) / (z_i - z_{i-k}),
is exact in real numbers but not in floating point: the two sums share every term before the window, so when the
window's mass is small next to that shared prefix the subtraction cancels to noise (or to 0/0); and one running max
cannot serve both ends (exp(a - m) underflows for a window far below an earlier peak). Instead, as in the van Herk /
Gil-Werman sliding-window algorithm, time is cut into blocks of length k, aligned so that every window is the
suffix of one block joined to the prefix of the next:

    (i - k, i] = [r + 1, k) of block b - 1  U  [0, r] of block b,        i = b k + r.

1. prefix scan inside every block: (s, z, m) of [0, r], relative to the prefix's own running max;
2. suffix scan inside every block (the prefix scan of the reversed block): (s, z, m) of [r + 1, k), its own max;
3. g_i from the previous block's suffix at r + 1 and the current block's prefix at r, both rescaled to the
   larger of their two maxima: a sum of two non-negative parts, never a difference.

Both scans are ``ops.additive``'s stable chunked scan, so every exponent is <= 0 and the work is O(T C D) with C its
chunk, whatever k. The k positions before the sequence (a previous state's ring, or k empty positions with
a = -inf) are block 0, so continuing from a state is the same computation as the whole sequence.

Short windows take a band instead (``windowed_pool_banded``): every row's own window as a masked row of a
[L, 2L] matrix over the previous and the current block, each relative to its own max; O(T L D) with L = max(k, 16),
fewer and larger operations than two scans, so faster for k up to ``BANDED_MAX_WINDOW``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from attnfree.ops.additive.parallel import stable_scan
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


BANDED_MAX_WINDOW = 64  # windows up to this length take the banded form (fewer, larger operations: faster there)
MIN_BAND_BLOCK = 16  # the banded form's shortest block: shorter blocks make many tiny matmuls


def windowed_pool_parallel(x: Tensor, scores: Tensor, mask: Tensor | None, initial_state: WindowState | None,
                           options: WindowOptions) -> tuple[Tensor, WindowState | None]:
    """g_i = sum_{i-k<j<=i} exp(a_j) x_j / sum_{i-k<j<=i} exp(a_j) per head, stable for any score magnitude.

    x: [B, T, H, D], scores: [B, T, H], mask: [B, T] bool (True = real token; padding weighs nothing);
    ``options`` (``WindowOptions``): the window k, the final state, the scans' chunk length. Returns g: [B, T, H, D]
    in x's dtype (0 where the window holds no real token) and, if asked, the state after the last position.
    The banded form for k <= BANDED_MAX_WINDOW, the blocks form above (both exact; tests run each at every k).
    """
    form = windowed_pool_banded if options.window <= BANDED_MAX_WINDOW else windowed_pool_blocks
    return form(x, scores, mask, initial_state, options)


def _extended(x: Tensor, scores: Tensor, mask: Tensor | None, initial_state: WindowState | None,
              options: WindowOptions) -> tuple[Tensor, Tensor]:
    """The k positions before (the state's ring, or empty) then the sequence: xs [B, k + T, H, D], a_s [B, k + T, H]
    in the accumulation dtype, padding's scores -inf."""
    check_window_inputs(x, scores, mask, initial_state, options)
    B, _, H, D = x.shape
    acc = state_dtype(x.dtype)
    start = initial_state if initial_state is not None else init_window_state(B, H, D, options.window, acc, x.device)
    xs = torch.cat([start.x.to(acc), x.to(acc)], 1)
    return xs, torch.cat([start.a.to(acc), masked_scores(scores, mask, acc)], 1)


def _finish(g: Tensor, x: Tensor, xs: Tensor, a_s: Tensor, options: WindowOptions
            ) -> tuple[Tensor, WindowState | None]:
    """g [B, H, >= T, D] (heads first) back to [B, T, H, D] in x's dtype; the last k positions as the state."""
    T = x.shape[1]
    g = g[:, :, :T].transpose(1, 2).to(x.dtype)
    if not options.output_final_state:
        return g, None
    return g, WindowState(xs[:, T:].clone(), a_s[:, T:].clone())


def windowed_pool_banded(x: Tensor, scores: Tensor, mask: Tensor | None, initial_state: WindowState | None,
                         options: WindowOptions) -> tuple[Tensor, WindowState | None]:
    """``windowed_pool_parallel``'s contract by a band: blocks of L = max(k, MIN_BAND_BLOCK) positions, each row
    pooling its window from the previous block and its own (a masked [L, 2L] matmul per block), relative to the
    window's own max, exactly the reference's arithmetic. O(T L D): for short windows."""
    xs, a_s = _extended(x, scores, mask, initial_state, options)
    B, T, H, D = x.shape
    k = options.window
    L = max(k, MIN_BAND_BLOCK)
    # 1. heads first: L - k empty positions, the k before, the sequence, empty positions to N + 1 whole blocks
    pad = (-T) % L
    n = (T + pad) // L
    X = F.pad(xs, (0, 0, 0, 0, L - k, pad)).transpose(1, 2).unflatten(2, (n + 1, L))  # [B, H, N+1, L, D]
    R = F.pad(a_s, (0, 0, L - k, pad), value=float("-inf")).transpose(1, 2).unflatten(2, (n + 1, L))  # [B, H, N+1, L]
    # 2. the keys of block b: blocks b - 1 and b; row i (at L + i of them) sees columns j with i + L - k < j <= i + L
    keys, logits = torch.cat([X[:, :, :-1], X[:, :, 1:]], 3), torch.cat([R[:, :, :-1], R[:, :, 1:]], 3)
    i, j = torch.arange(L, device=x.device).unsqueeze(1) + L, torch.arange(2 * L, device=x.device)
    band = (j <= i) & (j > i - k)  # [L, 2L]
    logits = logits.unsqueeze(-2).masked_fill(~band, float("-inf"))  # [B, H, N, L, 2L]
    # 3. softmax over the band, relative to each window's max (a reference point: no gradient)
    w = torch.exp(logits - finite_or_zero(logits.detach().amax(-1, keepdim=True)))
    g = safe_divide(w @ keys, w.sum(-1))  # [B, H, N, L, D]
    return _finish(g.flatten(2, 3), x, xs, a_s, options)


def windowed_pool_blocks(x: Tensor, scores: Tensor, mask: Tensor | None, initial_state: WindowState | None,
                         options: WindowOptions) -> tuple[Tensor, WindowState | None]:
    """``windowed_pool_parallel``'s contract by the module docstring's blocks (van Herk / Gil-Werman): O(T C D)
    whatever k."""
    xs, a_s = _extended(x, scores, mask, initial_state, options)
    B, T, H, D = x.shape
    k = options.window
    # 1. heads first, padded with empty positions to N + 1 whole blocks: block 0 is the k positions before
    pad = (-T) % k
    n = (T + pad) // k
    S = F.pad(xs, (0, 0, 0, 0, 0, pad)).transpose(1, 2).unflatten(2, (n + 1, k))  # [B, H, N+1, k, D]
    r = F.pad(a_s, (0, 0, 0, pad), value=float("-inf")).transpose(1, 2).unflatten(2, (n + 1, k))  # [B, H, N+1, k]
    # (the scans' chunk: the block cut into equal chunks of at most options.chunk_size, so none is padded)
    ones, chunk = torch.ones_like(r[:, :, 1:]), max(2, math.ceil(k / math.ceil(k / options.chunk_size)))
    # 2. prefix (s, z, m) of [0, r] in blocks 1..N; suffix of [r + 1, k) in blocks 0..N-1 (the last block's suffix and
    # the block before the sequence's prefix are never read)
    sp, zp, mp = stable_scan(S[:, :, 1:], ones, r[:, :, 1:], chunk)
    ss, zs, ms = stable_scan(S[:, :, :-1, 1:].flip(-2), ones[..., 1:], r[:, :, :-1, 1:].flip(-1), chunk)
    ss, zs = F.pad(ss.flip(-2), (0, 0, 0, 1)), F.pad(zs.flip(-1), (0, 1))  # empty past the block's end
    ms = F.pad(ms.flip(-1), (0, 1), value=float("-inf"))
    # 3. g = the previous block's suffix joined to the current block's prefix; position i is block 1's row 0 + i
    g = _join(ss, zs, ms, sp, zp, mp)  # [B, H, N, k, D]
    return _finish(g.flatten(2, 3), x, xs, a_s, options)
