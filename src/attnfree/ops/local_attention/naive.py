"""Reference sliding-window attention: one float64 masked softmax over every (query, key) pair, as written."""

from __future__ import annotations

import torch
from torch import Tensor

from attnfree.ops.local_attention.state import (
    LocalState,
    WindowOptions,
    check_inputs,
    init_local_state,
    key_validity,
)


def local_attention_naive(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
                          initial_state: LocalState | None, options: WindowOptions
                          ) -> tuple[Tensor, LocalState | None]:
    """o_i = sum_j softmax_j(q_i . k_j / sqrt(D)) v_j over the real keys j with i - w < j <= i.

    q, k, v: [B, T, H, D]; mask: [B, T] bool (True = real token); a previous state's w entries stand at positions
    -w .. -1. A query with no real key in its window gets 0. Builds the whole [B, H, T, w + T] score matrix: the
    reference only. Returns o [B, T, H, D] in q's dtype and, with ``options.output_final_state``, the last w
    entries (state included) as the new state.
    """
    check_inputs(q, k, v, mask, initial_state, options)
    B, T, H, D = q.shape
    w = options.window
    state = initial_state if initial_state is not None else init_local_state(B, w, H, D, k.dtype, k.device)
    # 1. every key and value, the state's first: key j sits at position j - w
    keys = torch.cat([state.k.double(), k.double()], 1)  # [B, w + T, H, D]
    values = torch.cat([state.v.double(), v.double()], 1)
    valid = torch.cat([state.valid, key_validity(q, mask)], 1)  # [B, w + T]
    # 2. query i sees key j when 0 <= (i + w) - j < w and the key is real
    gap = (torch.arange(T, device=q.device)[:, None] + w) - torch.arange(w + T, device=q.device)[None, :]
    allowed = ((gap >= 0) & (gap < w))[None, None] & valid[:, None, None, :]  # [B, 1, T, w + T]
    scores = torch.einsum("bihd,bjhd->bhij", q.double(), keys) / D ** 0.5  # [B, H, T, w + T]
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)  # (no key: 0)
    out = torch.einsum("bhij,bjhd->bihd", probs, values)
    final = None
    if options.output_final_state:
        final = LocalState(keys[:, T:].to(k.dtype), values[:, T:].to(v.dtype), valid[:, T:].clone())
    return out.to(q.dtype), final
