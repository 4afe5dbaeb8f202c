"""Reference windowed additive pooling: a float64 loop over time, the equation as written."""

from __future__ import annotations

import torch
from torch import Tensor

from attnfree.ops.windowed.state import (
    WindowOptions,
    WindowState,
    check_window_inputs,
    init_window_state,
    masked_scores,
)


def windowed_pool_naive(x: Tensor, scores: Tensor, mask: Tensor | None, initial_state: WindowState | None,
                        options: WindowOptions) -> tuple[Tensor, WindowState | None]:
    """g_i = softmax_{i-k < j <= i}(a_j) . x_j per head: the softmax over the last k positions only.

    x: [B, T, H, D], scores: [B, T, H], mask: [B, T] bool (True = real token; padding has a = -inf and weighs 0).
    A previous state supplies the k positions before the first (the sequence continues them). A position whose
    window holds only padding outputs 0. Returns g: [B, T, H, D] in x's dtype and the final state (if asked).
    """
    check_window_inputs(x, scores, mask, initial_state, options)
    B, T, H, D = x.shape
    k = options.window
    start = initial_state if initial_state is not None else init_window_state(B, H, D, k, torch.float64, x.device)
    # 1. the extended sequence: the k positions before (from the state), then this one
    xs = torch.cat([start.x.double(), x.double()], 1)  # [B, k + T, H, D]
    a_s = torch.cat([start.a.double(), masked_scores(scores, mask, torch.float64)], 1)  # [B, k + T, H]
    out = torch.zeros(B, T, H, D, dtype=torch.float64, device=x.device)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                # 2. the window of position i: extended positions i+1 .. i+k; the real entries only
                a_win, x_win = a_s[b, i + 1: i + k + 1, h], xs[b, i + 1: i + k + 1, h]
                real = torch.isfinite(a_win)
                if real.any():
                    out[b, i, h] = torch.softmax(a_win[real], 0) @ x_win[real]
    final = WindowState(xs[:, T:].clone(), a_s[:, T:].clone()) if options.output_final_state else None
    if final is not None and x.dtype != torch.float64:
        final = WindowState(final.x.float(), final.a.float())
    return out.to(x.dtype), final
