"""Causal multi-headed cross-correlation, one token at a time (decoding).

``correlation_step_`` writes the new token into the ring buffers of a ``CorrelationState`` (in place)
and reads back the J queries, the J x L keys and the L values that position t needs:

    R_t(tau) = sum_{j<J} <q_{t-j}, k_{t-tau-j}> / sqrt(J D)
    a_t = softmax_tau R_t,   o_t = sum_tau a_t(tau) v_{t-tau}

Cost per token: O(L J D), independent of t.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from attnfree.ops.correlation.state import (
    CorrelationState,
    LagSet,
    check_inputs,
    check_state,
    init_correlation_state,
    read_slots,
    slots,
    softmax_dtype,
    write_slot_,
)


def _write(state: CorrelationState, q_t: Tensor, k_t: Tensor, v_t: Tensor, mask_t: Tensor | None) -> None:
    """1. Put each row's token at its position ``state.seen`` into its slot of every ring (in place)."""
    t = state.seen  # [B]
    write_slot_(state.q, t % state.q.shape[1], q_t)
    write_slot_(state.k, t % state.k.shape[1], k_t)
    write_slot_(state.v, t % state.v.shape[1], v_t)
    real = torch.ones_like(t, dtype=torch.bool) if mask_t is None else mask_t.bool()
    write_slot_(state.valid, t % state.valid.shape[1], real)


def correlation_step_(q_t: Tensor, k_t: Tensor, v_t: Tensor, spec: LagSet, mask_t: Tensor | None,
                      state: CorrelationState) -> tuple[Tensor, CorrelationState]:
    """One position: q_t, k_t, v_t [B, H, D], mask_t [B] bool or None -> (o_t [B, H, D], state).

    The state is updated in place (and returned): its buffers take the new token, seen grows by one in every row.
    Every read is a gather at slots computed from ``seen``, so the step also traces into an exported graph.
    """
    lag_list, segment = list(spec.lags), spec.segment
    check_state(state, q_t.shape[0], q_t.shape[1], q_t.shape[2], spec.max_lag, segment)
    _write(state, q_t, k_t, v_t, mask_t)
    # 2. positions relative to t of the terms: queries t-j, keys t-tau-j, values t-tau
    B, L, dev = q_t.shape[0], len(lag_list), q_t.device
    lag = torch.as_tensor(lag_list, device=dev)
    dq = -torch.arange(segment, device=dev)  # [J]
    dk = (dq[:, None] - lag[None, :]).reshape(-1)  # [J*L]
    cq, ck, cv = state.q.shape[1], state.k.shape[1], state.v.shape[1]
    valid_k = read_slots(state.valid, slots(state.seen, dk, ck)).view(B, segment, L)  # [B, J, L]
    valid_q = read_slots(state.valid, slots(state.seen, dq, ck))  # [B, J]
    # 3. scores: valid terms only (both positions real), summed over the segment
    keep = valid_q[:, :, None] & valid_k  # [B, J, L]
    qs = read_slots(state.q, slots(state.seen, dq, cq))  # [B, J, H, D]
    ks = read_slots(state.k, slots(state.seen, dk, ck)).view(B, segment, L, *state.k.shape[2:])  # [B, J, L, H, D]
    prods = torch.einsum("bjhd,bjlhd->bjlh", qs, ks)
    R = torch.where(keep[..., None], prods, torch.zeros_like(prods)).sum(1) / math.sqrt(segment * q_t.shape[-1])
    # 4. softmax over the valid lags (0 when none is valid), then mix the values
    lag_ok = read_slots(state.valid, slots(state.seen, -lag, ck))[..., None]  # [B, L, 1]
    sdt = softmax_dtype(q_t.dtype)
    R = R.to(sdt).masked_fill(~lag_ok, torch.finfo(sdt).min)  # [B, L, H]
    a = (torch.softmax(R, dim=1) * lag_ok).to(v_t.dtype)
    o_t = torch.einsum("blh,blhd->bhd", a, read_slots(state.v, slots(state.seen, -lag, cv)))
    state.seen.add_(1)
    return o_t, state


def correlation_recurrent(q: Tensor, k: Tensor, v: Tensor, spec: LagSet, mask: Tensor | None = None,
                          initial_state: CorrelationState | None = None, output_final_state: bool = False
                          ) -> tuple[Tensor, CorrelationState | None]:
    """Causal cross-correlation by ``correlation_step_`` over time: q, k, v [B, T, H, D] -> o [B, T, H, D].

    mask: [B, T] bool (True = real token).  initial_state is not modified (the loop works on a copy).
    """
    check_inputs(q, k, v, spec, mask, initial_state)
    B, T, H, D = q.shape
    if initial_state is None:
        state = init_correlation_state(B, H, D, spec, q.dtype, q.device)
    else:
        state = initial_state.clone()
    outs = []
    for t in range(T):
        mask_t = None if mask is None else mask[:, t]
        o_t, state = correlation_step_(q[:, t], k[:, t], v[:, t], spec, mask_t, state)
        outs.append(o_t)
    return torch.stack(outs, 1), (state if output_final_state else None)
