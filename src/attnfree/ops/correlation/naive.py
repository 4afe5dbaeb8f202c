"""Causal multi-headed cross-correlation, the reference: a float64 loop over t and lags, as written.

Per head, with lag set L (sorted, L[0] = 0) and segment length J:

    R_t(tau) = sum_{j<J} <q_{t-j}, k_{t-tau-j}> / sqrt(J D)   (terms at masked/negative positions dropped)
    a_t      = softmax over the valid lags (t - tau >= 0 and not masked) of R_t
    o_t      = sum_tau a_t(tau) v_{t-tau}                       (0 when no lag is valid)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from attnfree.ops.correlation.state import (
    CorrelationState,
    LagSet,
    check_inputs,
    prepend_history,
    seen_after,
    state_from_sequence,
)

Seq = Sequence[Tensor]  # one tensor per position


def _score(qs: Seq, ks: Seq, valid: Seq, t: int, tau: int, segment: int) -> Tensor:
    """R_t(tau) from per-position q_t, k_t [B, H, D] (float64) and valid_t [B] bool: returns [B, H]."""
    total = torch.zeros_like(qs[t][..., 0])
    for j in range(segment):
        if t - tau - j < 0:  # this term and all later ones reach before the start
            break
        keep = (valid[t - j] & valid[t - tau - j])[:, None]  # [B, 1]
        total = total + torch.where(keep, (qs[t - j] * ks[t - tau - j]).sum(-1), 0.0)
    return total / math.sqrt(segment * qs[t].shape[-1])


def _output_at(qs: Seq, ks: Seq, vs: Seq, valid: Seq, t: int, lags: list[int], segment: int) -> Tensor:
    """o_t [B, H, D] from per-position q, k, v [B, H, D] (float64) and valid [B] bool."""
    scores, ok, values = [], [], []
    for tau in lags:
        if tau <= t:
            scores.append(_score(qs, ks, valid, t, tau, segment))
            ok.append(valid[t - tau])
            values.append(vs[t - tau])
        else:  # a lag reaching before the start
            scores.append(torch.zeros_like(qs[t][..., 0]))
            ok.append(torch.zeros_like(valid[t]))
            values.append(torch.zeros_like(vs[t]))
    R = torch.stack(scores, -1)  # [B, H, L]
    lag_ok = torch.stack(ok, -1)[:, None, :]  # [B, 1, L]
    a = torch.softmax(R.masked_fill(~lag_ok, float("-inf")), dim=-1)
    a = torch.where(lag_ok.any(-1, keepdim=True), a, 0.0)  # nothing valid -> 0, not NaN
    return torch.einsum("bhl,blhd->bhd", a, torch.stack(values, 1))


def correlation_naive(q: Tensor, k: Tensor, v: Tensor, spec: LagSet, mask: Tensor | None = None,
                      initial_state: CorrelationState | None = None, output_final_state: bool = False
                      ) -> tuple[Tensor, CorrelationState | None]:
    """Reference causal cross-correlation: q, k, v [B, T, H, D], mask [B, T] bool -> o [B, T, H, D].

    spec: the lags and segment length J (``LagSet``). Computes in float64, returns the input dtype.
    """
    lag_list = check_inputs(q, k, v, spec, mask, initial_state)
    segment = spec.segment
    T = q.shape[1]
    # 1. the sequence to run on: the state's history (if any) followed by the new tokens
    qa, ka, va, valid, start = prepend_history(q, k, v, mask, initial_state)
    if valid is None:
        valid = torch.ones(qa.shape[:2], dtype=torch.bool, device=q.device)
    # 2. the equations, one position at a time, in float64
    # (per-position tensors: small ops only, which also keeps the backward pass cheap)
    qs, ks, vs = (x.double().unbind(1) for x in (qa, ka, va))  # T x [B, H, D]
    ok = valid.unbind(1)  # T x [B]
    outs = [_output_at(qs, ks, vs, ok, t, lag_list, segment) for t in range(start, start + T)]
    o = torch.stack(outs, 1).to(q.dtype)
    # 3. the state after the last token, from the same extended sequence
    if not output_final_state:
        return o, None
    seen = seen_after(initial_state, q.shape[0], T, q.device)
    return o, state_from_sequence(qa, ka, va, valid, lag_list[-1], segment, seen)
