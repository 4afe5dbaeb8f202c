"""Sliding-window attention in O(T w) time and memory: queries in blocks, each block against two blocks of keys.

With blocks of c >= w positions, every key a query can see lies in its own block or the one before it, so block n's
queries take scores against 2c keys ([B, N, H, c, 2c]) and never a T x T matrix. The state's w entries, padded in
front to c with empty ones, are block -1. The band inside the 2c keys is the same for every block: query a of a
block sees key b when 0 <= (a + c) - b < w.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from attnfree.ops.local_attention.state import (
    LocalState,
    WindowOptions,
    check_inputs,
    key_validity,
)

MIN_BLOCK = 16  # blocks never shorter: below that the batched block products are all call overhead


def block_size(window: int) -> int:
    """c: the block length for window w (w itself, at least MIN_BLOCK)."""
    return max(window, MIN_BLOCK)


def pairs(x: Tensor, N: int, c: int) -> Tensor:
    """[B, (N + 1) c, ...] -> [B, N, 2c, ...]: block n's previous block and its own, side by side."""
    blocks = x.unflatten(1, (N + 1, c))
    return torch.cat([blocks[:, :-1], blocks[:, 1:]], 2)


def heads_first(x: Tensor) -> Tensor:
    """[B, N, L, H, D] -> [B N, H, L, D]: blocks as batch rows, the layout SDPA takes."""
    return x.flatten(0, 1).transpose(1, 2)


def local_attention_chunked(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
                            initial_state: LocalState | None, options: WindowOptions
                            ) -> tuple[Tensor, LocalState | None]:
    """``local_attention_naive``'s contract (same values and gradients), in blocks: O(T w) time and memory."""
    check_inputs(q, k, v, mask, initial_state, options)
    B, T = q.shape[:2]
    w = options.window
    c = block_size(w)
    N = (T + c - 1) // c  # blocks of queries (non-negative operands: ONNX integer division truncates)
    # 1. the keys, values and their validity, in (N + 1) blocks: [c - w empty | the state's w | T new | tail], the
    # tail to a whole block; without a state the state's w entries are empty too (c empty in front), as init_local_state
    tail = N * c - T
    keys, values, valid = k, v, key_validity(q, mask)
    if initial_state is not None:
        keys = torch.cat([initial_state.k.to(k.dtype), keys], 1)
        values = torch.cat([initial_state.v.to(v.dtype), values], 1)
        valid = torch.cat([initial_state.valid, valid], 1)
    front = c - w if initial_state is not None else c
    kp, vp = (F.pad(x, (0, 0, 0, 0, front, tail)) for x in (keys, values))
    kvalid = F.pad(valid, (front, tail), value=False)
    # 2. the band inside a block's 2c keys, the same for every block, and the padding
    gap = (torch.arange(c, device=q.device)[:, None] + c) - torch.arange(2 * c, device=q.device)[None, :]
    band = (gap >= 0) & (gap < w)  # [c, 2c]
    allowed = band & pairs(kvalid, N, c)[:, :, None, :]  # [B, N, c, 2c]
    # a query with no real key (only with padding: else it sees itself) attends its band, then outputs 0: no 0/0,
    # and no gradient from it
    empty = ~allowed.any(-1, keepdim=True) if mask is not None else None  # [B, N, c, 1]
    if empty is not None:
        allowed = allowed | (empty & band)
    # 3. block n's c queries against its 2c keys, as one batch of [c, 2c] attentions ([B N, H, c, D] for SDPA)
    qb = F.pad(q, (0, 0, 0, 0, 0, tail)).unflatten(1, (N, c))
    out = F.scaled_dot_product_attention(heads_first(qb), heads_first(pairs(kp, N, c)), heads_first(pairs(vp, N, c)),
                                         attn_mask=allowed.flatten(0, 1).unsqueeze(1))
    out = out.transpose(1, 2).unflatten(0, (B, N))  # [B, N, c, H, D]
    if empty is not None:
        out = torch.where(empty.unsqueeze(-1), torch.zeros_like(out), out)
    out = out.flatten(1, 2)[:, :T]  # [B, T, H, D]
    # 4. the new state: the last w entries before the tail, copied (not views that keep the whole sequence alive)
    last = slice(c + T - w, c + T)
    final = LocalState(kp[:, last].clone(), vp[:, last].clone(), kvalid[:, last].clone()) \
        if options.output_final_state else None
    return out, final
