"""Windowed additive pooling, one token at a time (decoding): the ring of the window's last k entries."""

from __future__ import annotations

import torch
from torch import Tensor

from attnfree.ops.additive.state import finite_or_zero, safe_divide
from attnfree.ops.windowed.state import (
    WindowOptions,
    WindowState,
    check_window_inputs,
    init_window_state,
    masked_scores,
)


def windowed_pool_step(x_t: Tensor, a_t: Tensor, mask_t: Tensor | None, state: WindowState
                       ) -> tuple[Tensor, WindowState]:
    """Push (x_t, a_t) into the ring (the oldest entry leaves) and pool the ring: g_t = softmax(a) . x over it.

    x_t: [B, H, D], a_t: [B, H], mask_t: [B] bool or None (a padded step enters with a = -inf). The ring is pooled
    directly, relative to its own max (no running sums to subtract from: that is where the prefix difference fails),
    O(k D) per head, the size of the state. Returns (g_t [B, H, D] in x_t's dtype, state').
    """
    acc = state.x.dtype
    a = masked_scores(a_t, mask_t, acc)
    ring_x = torch.cat([state.x[:, 1:], x_t.to(acc).unsqueeze(1)], 1)  # [B, k, H, D]
    ring_a = torch.cat([state.a[:, 1:], a.unsqueeze(1)], 1)  # [B, k, H]
    top = finite_or_zero(ring_a.detach().amax(1, keepdim=True))  # [B, 1, H]: a reference point only
    w = torch.exp(ring_a - top)  # [B, k, H], 0 for empty entries
    g = safe_divide(torch.einsum("bkh,bkhd->bhd", w, ring_x), w.sum(1))
    return g.to(x_t.dtype), WindowState(ring_x, ring_a)


def windowed_pool_recurrent(x: Tensor, scores: Tensor, mask: Tensor | None, initial_state: WindowState | None,
                            options: WindowOptions) -> tuple[Tensor, WindowState | None]:
    """Same contract as ``windowed_pool_parallel``, computed by looping ``windowed_pool_step`` over T."""
    check_window_inputs(x, scores, mask, initial_state, options)
    B, T, H, D = x.shape
    state = initial_state if initial_state is not None else init_window_state(B, H, D, options.window, x.dtype,
                                                                              x.device)
    outs = []
    for t in range(T):
        g, state = windowed_pool_step(x[:, t], scores[:, t], None if mask is None else mask[:, t], state)
        outs.append(g)
    out = torch.stack(outs, 1) if outs else x.new_zeros(B, 0, H, D)
    return out, (state if options.output_final_state else None)
