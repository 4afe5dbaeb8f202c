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
    init_local_state,
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
    B, T, H, D = q.shape
    w = options.window
    c = block_size(w)
    N = (T + c - 1) // c  # blocks of queries (non-negative operands: ONNX integer division truncates)
    state = initial_state if initial_state is not None else init_local_state(B, w, H, D, k.dtype, k.device)
    # 1. the state's entries in front of the new ones: [B, w + T, ...]
    keys = torch.cat([state.k.to(k.dtype), k], 1)
    values = torch.cat([state.v.to(v.dtype), v], 1)
    valid = torch.cat([state.valid, key_validity(q, mask)], 1)
    # 2. pad to (N + 1) blocks: c - w empty entries in front (block -1 is then the state), the tail to a whole block
    tail = N * c - T
    kp, vp = (F.pad(x, (0, 0, 0, 0, c - w, tail)) for x in (keys, values))
    kvalid = F.pad(valid, (c - w, tail), value=False)
    # 3. the band inside a block's 2c keys, the same for every block, and the padding
    gap = (torch.arange(c, device=q.device)[:, None] + c) - torch.arange(2 * c, device=q.device)[None, :]
    band = (gap >= 0) & (gap < w)  # [c, 2c]
    allowed = band & pairs(kvalid, N, c)[:, :, None, :]  # [B, N, c, 2c]
    # a query with no real key (padding only) attends its band, then outputs 0: no 0/0, and no gradient from it
    empty = ~allowed.any(-1, keepdim=True)  # [B, N, c, 1]
    allowed = allowed | (empty & band)
    # 4. block n's c queries against its 2c keys, as one batch of [c, 2c] attentions ([B N, H, c, D] for SDPA)
    qb = F.pad(q, (0, 0, 0, 0, 0, tail)).unflatten(1, (N, c))
    out = F.scaled_dot_product_attention(heads_first(qb), heads_first(pairs(kp, N, c)), heads_first(pairs(vp, N, c)),
                                         attn_mask=allowed.flatten(0, 1).unsqueeze(1))
    out = out.transpose(1, 2).unflatten(0, (B, N))  # [B, N, c, H, D]
    out = torch.where(empty.unsqueeze(-1), torch.zeros_like(out), out).flatten(1, 2)[:, :T]  # [B, T, H, D]
    # 5. the new state: the last w entries, copied (not views that would keep the whole sequence alive)
    final = LocalState(keys[:, T:].clone(), values[:, T:].clone(), valid[:, T:].clone()) \
        if options.output_final_state else None
    return out, final
