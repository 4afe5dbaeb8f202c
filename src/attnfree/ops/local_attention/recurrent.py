"""Sliding-window attention one token at a time: the decoding step over its state of w entries."""

from __future__ import annotations

import torch
from torch import Tensor

from attnfree.ops.local_attention.state import (
    LocalState,
    WindowOptions,
    check_inputs,
    init_local_state,
    masked_softmax,
)


def local_attention_step(q_t: Tensor, k_t: Tensor, v_t: Tensor, mask_t: Tensor | None, state: LocalState
                         ) -> tuple[Tensor, LocalState]:
    """One token: q_t, k_t, v_t [B, H, D], mask_t [B] or None, state (w entries) -> (o_t [B, H, D], new state).

    The token's key and value enter as the newest entry and the oldest leaves (whether or not the token is real:
    the window counts positions, and a padded one is simply never attended); then o_t attends over the w entries.
    """
    D = q_t.shape[-1]
    valid_t = (torch.ones_like(state.valid[:, :1]) if mask_t is None else mask_t.bool()[:, None])  # [B, 1]
    new = LocalState(torch.cat([state.k[:, 1:], k_t[:, None].to(state.k.dtype)], 1),
                     torch.cat([state.v[:, 1:], v_t[:, None].to(state.v.dtype)], 1),
                     torch.cat([state.valid[:, 1:], valid_t], 1))
    scores = torch.einsum("bhd,bkhd->bhk", q_t, new.k.to(q_t.dtype)) / D ** 0.5  # [B, H, w]
    out = torch.einsum("bhk,bkhd->bhd", masked_softmax(scores, new.valid[:, None, :]), new.v.to(q_t.dtype))
    return out, new


def local_attention_recurrent(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
                              initial_state: LocalState | None, options: WindowOptions
                              ) -> tuple[Tensor, LocalState | None]:
    """``local_attention_naive``'s contract through ``local_attention_step``, one position at a time."""
    check_inputs(q, k, v, mask, initial_state, options)
    B, T, H, D = q.shape
    state = initial_state if initial_state is not None else init_local_state(B, options.window, H, D, k.dtype,
                                                                            k.device)
    outs = []
    for t in range(T):
        o, state = local_attention_step(q[:, t], k[:, t], v[:, t], None if mask is None else mask[:, t], state)
        outs.append(o)
    return torch.stack(outs, 1), state if options.output_final_state else None
