"""Reference causal additive attention: a float64 loop over time, the equation as written."""

from __future__ import annotations

import torch
from torch import Tensor

from attnfree.ops.additive.state import NO_OPTIONS, AdditiveState, PoolOptions, check_inputs


def additive_pool_naive(x: Tensor, scores: Tensor, mask: Tensor | None = None,
                        initial_state: AdditiveState | None = None, options: PoolOptions = NO_OPTIONS
                        ) -> tuple[Tensor, AdditiveState | None]:
    """g_i = softmax_{j<=i}(a_j) . x_j per head, valid positions only (Fastformer eq. 3-4, causal).

    With ``options.bonus`` u [H] (RWKV's current-token bonus), the current token enters g_i's softmax with a_i + u_h
    (and every later one with a_i: the state never holds the bonus). ``options.chunk_size`` is not used here.

    x: [B, T, H, D], scores: [B, T, H], mask: [B, T] bool (True = real token).
    A previous state (s, z, m) enters as one extra pooled item with score m + log z and value s / z.
    Returns g: [B, T, H, D] in x's dtype (0 where nothing valid was seen yet) and the final state.
    """
    check_inputs(x, scores, mask, initial_state)
    bonus = options.bonus
    B, T, H, D = x.shape
    xd, ad = x.double(), scores.double()
    valid = torch.ones(B, T, dtype=torch.bool, device=x.device) if mask is None else mask.bool()
    out = torch.zeros(B, T, H, D, dtype=torch.float64, device=x.device)
    s = torch.zeros(B, H, D, dtype=torch.float64, device=x.device)
    z = torch.zeros(B, H, dtype=torch.float64, device=x.device)
    m = torch.full((B, H), float("-inf"), dtype=torch.float64, device=x.device)
    for b in range(B):
        for h in range(H):
            # 1. the items pooled so far: the previous state (if any) as one item, then the valid tokens
            items_a: list[Tensor] = []
            items_x: list[Tensor] = []
            top = torch.tensor(float("-inf"), dtype=torch.float64)  # the max over real scores (state's m)
            if initial_state is not None and initial_state.z[b, h] > 0:
                items_a.append(initial_state.m[b, h].double() + initial_state.z[b, h].double().log())
                items_x.append(initial_state.s[b, h].double() / initial_state.z[b, h].double())
                top = initial_state.m[b, h].double()
            for i in range(T):
                if valid[b, i]:
                    items_a.append(ad[b, i, h])
                    items_x.append(xd[b, i, h])
                    top = torch.maximum(top, ad[b, i, h])
                if not items_a:
                    continue  # nothing to pool yet: g_i = 0
                # 2. g_i = sum_j softmax(a)_j x_j over the items up to i (the current one with its bonus)
                a_vec, x_mat = torch.stack(items_a), torch.stack(items_x)
                if bonus is not None and valid[b, i]:
                    a_vec = torch.cat([a_vec[:-1], a_vec[-1:] + bonus[h].double()])
                out[b, i, h] = torch.softmax(a_vec, dim=0) @ x_mat
            # 3. final state relative to the max real score m: s = sum exp(a - m) x, z = sum exp(a - m)
            if items_a:
                a_vec, x_mat = torch.stack(items_a), torch.stack(items_x)
                m[b, h] = top
                w = torch.exp(a_vec - top)
                s[b, h], z[b, h] = w @ x_mat, w.sum()
    final = AdditiveState(s, z, m) if options.output_final_state else None
    if final is not None and x.dtype != torch.float64:
        final = AdditiveState(*(t.float() for t in final))
    return out.to(x.dtype), final
