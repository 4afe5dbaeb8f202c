"""Causal additive attention, one token at a time (the RNN form used for decoding)."""

from __future__ import annotations

import torch
from torch import Tensor

from attnfree.ops.additive.state import (
    NO_OPTIONS,
    AdditiveState,
    PoolOptions,
    check_inputs,
    finite_or_zero,
    init_additive_state,
    read_out_bonus,
    safe_divide,
)


def additive_pool_step(
    x_t: Tensor, a_t: Tensor, mask_t: Tensor | None, state: AdditiveState, bonus: Tensor | None = None
) -> tuple[Tensor, AdditiveState]:
    """One step of s_i = s_{i-1} + exp(a_i) x_i, z_i = z_{i-1} + exp(a_i), g_i = s_i / z_i.

    x_t: [B, H, D], a_t: [B, H], mask_t: [B] bool or None, bonus: [H] or None (the current token's weight times
    e^bonus in the read-out only, ``state.read_out``). Sums are kept relative to the running max m:
    m' = max(m, a_t); s' = exp(m - m') s + exp(a_t - m') x_t; likewise z. Returns (g_t [B, H, D], state').
    """
    acc = state.s.dtype
    a = a_t.to(acc)
    if mask_t is not None:
        a = a.masked_fill(~mask_t.bool().unsqueeze(-1), float("-inf"))
    m_new = torch.maximum(state.m, a)
    mf = finite_or_zero(m_new)
    decay, w = torch.exp(state.m - mf), torch.exp(a - mf)  # both <= 1; 0 for -inf
    s = state.s * decay.unsqueeze(-1) + w.unsqueeze(-1) * x_t.to(acc)
    z = state.z * decay + w
    g = safe_divide(s, z) if bonus is None else read_out_bonus(state.s, state.z, state.m, x_t.to(acc), a, bonus)
    return g.to(x_t.dtype), AdditiveState(s, z, m_new)


@torch.no_grad()
def additive_pool_step_(x_t: Tensor, a_t: Tensor, state: AdditiveState, bonus: Tensor | None = None) -> Tensor:
    """In-place decoding step (no autograd, no allocation of state): same math as ``additive_pool_step``
    for a real token, writing s', z', m' into ``state``'s own tensors. x_t: [B, H, D], a_t: [B, H]."""
    s, z, m = state
    a = a_t.to(s.dtype)
    g = None if bonus is None else read_out_bonus(s, z, m, x_t.to(s.dtype), a, bonus)  # from the sums before
    m_new = torch.maximum(m, a)
    mf = finite_or_zero(m_new)
    decay, w = torch.exp(m - mf), torch.exp(a - mf)
    s.mul_(decay.unsqueeze(-1)).add_(w.unsqueeze(-1) * x_t.to(s.dtype))
    z.mul_(decay).add_(w)
    m.copy_(m_new)
    return (safe_divide(s, z) if g is None else g).to(x_t.dtype)


def additive_pool_recurrent(x: Tensor, scores: Tensor, mask: Tensor | None = None,
                            initial_state: AdditiveState | None = None, options: PoolOptions = NO_OPTIONS
                            ) -> tuple[Tensor, AdditiveState | None]:
    """Same contract as ``additive_pool_parallel``, computed by looping ``additive_pool_step`` over T."""
    check_inputs(x, scores, mask, initial_state)
    B, T, H, D = x.shape
    state = initial_state if initial_state is not None else init_additive_state(B, H, D, x.dtype, x.device)
    outs = []
    for t in range(T):
        g, state = additive_pool_step(x[:, t], scores[:, t], None if mask is None else mask[:, t], state, options.bonus)
        outs.append(g)
    out = torch.stack(outs, dim=1) if outs else x.new_zeros(B, 0, H, D)
    return out, (state if options.output_final_state else None)
