"""Causal multi-headed cross-correlation with Triton kernels (forward and backward): the GPU fast path.

Same signature and values as ``correlation_parallel``. Two generic kernels do all the O(T L D) work, each
program owning one (batch, head, block of BLOCK_T positions), looping over the L lags and accumulating in
float32; loads along D are contiguous (coalesced), and every lag's block of shifted rows is one more
coalesced [BLOCK_T, BLOCK_D] tile:

    scores(x, y)[t, l]      = <x_t, y_{t - tau_l}>                  (0 when t - tau_l < 0)
    mix(w, x)[t]            = sum_l w[l, t] x_{t - tau_l}            (the forward mix, and dq)
    mix_reverse(w, x)[s]    = sum_l w[l, s + tau_l] x_{s + tau_l}    (dk and dv: a scatter written as a gather)

Forward (P, R, a kept in float32, layout [B, H, L, T] so that a lag's row is contiguous along T):

    P = scores(q, k);  R = box_J(P) / sqrt(J D);  a = softmax over valid lags (R);  o = mix(a, v)

Backward, with do = dL/do (box_J sums the J previous positions, box_J^T the J next ones):

    da = scores(do, v);  dR = a * (da - sum_l a da);  dP = box_J^T(dR) / sqrt(J D)
    dq = mix(dP, k);  dk = mix_reverse(dP, q);  dv = mix_reverse(a, do)

No atomics: every output row is written by exactly one program. The box sums and the softmax over L are
cheap O(T L) PyTorch glue between the kernels. Masked positions: q and k are zeroed before the kernels
(autograd zeroes their gradients), lags reaching a masked or negative position are left out of the softmax,
and a row with no valid lag gets a = 0, hence o = 0.

``initial_state`` and ``output_final_state`` work as in ``correlation_parallel``: the state's history is
prepended (the kernels run on the extended sequence) and the final state is sliced from the inputs.

Triton is imported under a guard, so this module imports without it; ``correlation_triton`` then raises.
With ``TRITON_INTERPRET=1`` set before this module is first imported, the kernels run on CPU tensors
through Triton's interpreter (slowly): that is how the tests check them on machines without a GPU.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from attnfree.ops.correlation.state import (
    CorrelationState,
    LagSet,
    check_inputs,
    prepend_history,
    seen_after,
    state_from_sequence,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # the PyTorch forms still work; correlation_triton raises
    triton = None

BLOCK_T = 64  # positions per program
MAX_BLOCK_D = 64  # head-size tile (a power of two); larger D loops (scores) or tiles the grid (mix)

if triton is not None:

    @triton.jit
    def _scores_kernel(x_ptr, y_ptr, lags_ptr, out_ptr, T, H, D, L,
                       BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        """out[b, h, l, t] = <x[b, t, h], y[b, t - tau_l, h]> (fp32; 0 when t - tau_l < 0). x, y [B, T, H, D]."""
        # 1. this program's positions t and its (batch, head)
        bh = tl.program_id(0)
        b, h = bh // H, bh % H
        t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T]
        t_ok = t < T
        x_rows = ((b * T + t).to(tl.int64) * H + h) * D  # offsets of x_t
        out_rows = out_ptr + (bh * L).to(tl.int64) * T + t  # lag 0's row of out
        # 2. one lag at a time: the shifted tile of y against x, summed over D in chunks
        for l in range(L):
            tau = tl.load(lags_ptr + l)
            s = t - tau
            s_ok = t_ok & (s >= 0)
            y_rows = ((b * T + s).to(tl.int64) * H + h) * D  # offsets of y_{t - tau}
            acc = tl.zeros([BLOCK_T], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                d = d0 + tl.arange(0, BLOCK_D)
                d_ok = (d < D)[None, :]
                x = tl.load(x_ptr + x_rows[:, None] + d[None, :], mask=t_ok[:, None] & d_ok, other=0.0)
                y = tl.load(y_ptr + y_rows[:, None] + d[None, :], mask=s_ok[:, None] & d_ok, other=0.0)
                acc += tl.sum(x.to(tl.float32) * y.to(tl.float32), axis=1)
            tl.store(out_rows + l * T, acc, mask=t_ok)

    @triton.jit
    def _mix_kernel(w_ptr, x_ptr, lags_ptr, out_ptr, T, H, D, L,
                    REVERSE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        """out[b, t, h] = sum_l w[b, h, l, t] x[b, t - tau_l, h]      (REVERSE False)
        out[b, s, h] = sum_l w[b, h, l, s + tau_l] x[b, s + tau_l, h]  (REVERSE True; terms past T dropped).

        w [B, H, L, T] float32, x and out [B, T, H, D]; accumulates in float32, stores out's dtype.
        """
        # 1. this program's positions, its (batch, head) and its tile of D
        bh = tl.program_id(0)
        b, h = bh // H, bh % H
        t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T]
        d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
        t_ok = t < T
        d_ok = (d < D)[None, :]
        w_rows = w_ptr + (bh * L).to(tl.int64) * T  # lag 0's row of w
        acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        # 2. one lag at a time: weight column times the tile of shifted rows
        for l in range(L):
            tau = tl.load(lags_ptr + l)
            if REVERSE:
                s = t + tau  # the query position that read position t through this lag
                s_ok = t_ok & (s < T)
                w = tl.load(w_rows + l * T + s, mask=s_ok, other=0.0)
            else:
                s = t - tau  # the key/value position that position t reads through this lag
                s_ok = t_ok & (s >= 0)
                w = tl.load(w_rows + l * T + t, mask=s_ok, other=0.0)
            x_rows = ((b * T + s).to(tl.int64) * H + h) * D
            x = tl.load(x_ptr + x_rows[:, None] + d[None, :], mask=s_ok[:, None] & d_ok, other=0.0)
            acc += w[:, None] * x.to(tl.float32)
        # 3. one store of the tile
        out_rows = ((b * T + t).to(tl.int64) * H + h) * D
        tl.store(out_ptr + out_rows[:, None] + d[None, :], acc.to(out_ptr.dtype.element_ty), mask=t_ok[:, None] & d_ok)


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _blocks(T: int, D: int, block_t: int | None, block_d: int | None) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_D), powers of two; the defaults fit the sizes (no tile much larger than T or D)."""
    bt = block_t if block_t is not None else min(BLOCK_T, max(16, _pow2(T)))
    bd = block_d if block_d is not None else min(MAX_BLOCK_D, max(16, _pow2(D)))
    for name, value in (("block_t", bt), ("block_d", bd)):
        if value < 1 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two, got {value}")
    return bt, bd


def scores(x: Tensor, y: Tensor, lags: Tensor, bt: int, bd: int) -> Tensor:
    """x, y [B, T, H, D] contiguous, lags [L] int32 -> [B, H, L, T] float32 with [.., l, t] = <x_t, y_{t-tau_l}>."""
    B, T, H, D = x.shape
    out = torch.empty(B, H, lags.numel(), T, dtype=torch.float32, device=x.device)
    grid = (B * H, triton.cdiv(T, bt))  # B * H on the axis without the 65535 limit
    _scores_kernel[grid](x, y, lags, out, T, H, D, lags.numel(), BLOCK_T=bt, BLOCK_D=bd)
    return out


def mix(w: Tensor, x: Tensor, lags: Tensor, reverse: bool, bt: int, bd: int) -> Tensor:
    """w [B, H, L, T] float32, x [B, T, H, D] -> [B, T, H, D] (x's dtype): sum_l w[l, t] x_{t-tau_l}, or with
    ``reverse`` sum_l w[l, t+tau_l] x_{t+tau_l}."""
    B, T, H, D = x.shape
    out = torch.empty_like(x)
    grid = (B * H, triton.cdiv(T, bt), triton.cdiv(D, bd))
    _mix_kernel[grid](w, x, lags, out, T, H, D, lags.numel(), REVERSE=reverse, BLOCK_T=bt, BLOCK_D=bd)
    return out


def box_sum(p: Tensor, segment: int, reverse: bool = False) -> Tensor:
    """p [B, H, L, T] -> sum_{j<J} p[..., t-j] (or p[..., t+j] with ``reverse``), terms outside [0, T) dropped."""
    T = p.shape[-1]
    padded = F.pad(p, (0, segment - 1) if reverse else (segment - 1, 0))  # [B, H, L, T + J - 1]
    return sum((padded[..., j : j + T] for j in range(segment)), torch.zeros_like(p))


def lag_ok(valid: Tensor | None, lags: Tensor, B: int, T: int) -> Tensor:
    """Which lags row t may attend: t - tau >= 0 and position t - tau real. -> [B, 1, L, T] bool."""
    pos = torch.arange(T, device=lags.device)[None, :] - lags[:, None]  # [L, T]
    ok = (pos >= 0)[None].expand(B, -1, -1)
    if valid is not None:
        ok = ok & valid[:, pos.clamp(min=0)]
    return ok[:, None]


class _CorrelationFunction(torch.autograd.Function):
    """o = mix(softmax_valid(box_J(scores(q, k)) / sqrt(J D)), v) with the backward written out (module doc)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, q: Tensor, k: Tensor, v: Tensor, lags: Tensor, ok: Tensor, segment: int, bt: int, bd: int
    ) -> Tensor:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # [B, T, H, D]
        scale = 1.0 / math.sqrt(segment * q.shape[-1])
        # 1. P_t(tau) = <q_t, k_{t-tau}> (kernel), 2. R = box sum over the segment (glue)
        r = box_sum(scores(q, k, lags, bt, bd), segment) * scale  # [B, H, L, T] fp32
        # 3. softmax over the valid lags; rows with none give a = 0
        a = torch.softmax(r.masked_fill(~ok, torch.finfo(r.dtype).min), dim=2) * ok
        # 4. o_t = sum_tau a_t(tau) v_{t-tau} (kernel)
        ctx.save_for_backward(q, k, v, lags, a)
        ctx.segment, ctx.scale, ctx.blocks = segment, scale, (bt, bd)
        return mix(a, v, lags, False, bt, bd)

    @staticmethod
    def backward(ctx: Any, do: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        q, k, v, lags, a = ctx.saved_tensors
        bt, bd = ctx.blocks
        do = do.contiguous()
        # 1. da_t(tau) = <do_t, v_{t-tau}> (kernel); softmax backward (glue)
        da = scores(do, v, lags, bt, bd)  # [B, H, L, T] fp32
        dr = a * (da - (a * da).sum(2, keepdim=True))
        # 2. through the box sum: each R_t summed P_{t-j}, so dP_t gathers dR_{t+j}
        dp = box_sum(dr, ctx.segment, reverse=True) * ctx.scale
        # 3. the three gathers (kernels)
        dq = mix(dp, k, lags, False, bt, bd)  # sum_tau dP_t(tau) k_{t-tau}
        dk = mix(dp, q, lags, True, bt, bd)  # sum_tau dP_{s+tau}(tau) q_{s+tau}
        dv = mix(a, do, lags, True, bt, bd)  # sum_tau a_{s+tau}(tau) do_{s+tau}
        return dq, dk, dv, None, None, None, None, None


def _correlate(
    q: Tensor, k: Tensor, v: Tensor, lags: list[int], segment: int, valid: Tensor | None,
    block_t: int | None, block_d: int | None,
) -> Tensor:
    """q, k, v [B, T, H, D], valid [B, T] bool or None -> o [B, T, H, D] through the kernels."""
    B, T, _, D = q.shape
    bt, bd = _blocks(T, D, block_t, block_d)
    taus = torch.tensor(lags, dtype=torch.int32, device=q.device)  # [L]
    # a masked position is absent: its q and k add nothing to any segment sum (autograd zeroes their grads)
    if valid is not None:
        q, k = q * valid[:, :, None, None], k * valid[:, :, None, None]
    ok = lag_ok(valid, taus.long(), B, T)  # [B, 1, L, T]
    o: Tensor = _CorrelationFunction.apply(q, k, v, taus, ok, segment, bt, bd)
    return o


def correlation_triton(q: Tensor, k: Tensor, v: Tensor, spec: LagSet, mask: Tensor | None = None,
                       initial_state: CorrelationState | None = None, output_final_state: bool = False,
                       *, block_t: int | None = None, block_d: int | None = None
                       ) -> tuple[Tensor, CorrelationState | None]:
    """Causal cross-correlation through the Triton kernels: q, k, v [B, T, H, D] -> o [B, T, H, D].

    Arguments as ``correlation_parallel``; ``block_t`` / ``block_d`` override the tile sizes (powers of two).
    Needs CUDA tensors, or CPU tensors with ``TRITON_INTERPRET=1`` set before this module was imported.
    """
    if triton is None:
        raise RuntimeError("correlation_triton needs the triton package, which is not installed")
    lag_list = check_inputs(q, k, v, spec, mask, initial_state)
    segment = spec.segment
    T = q.shape[1]
    # 1. the sequence to run on: the state's history (if any) followed by the new tokens
    qa, ka, va, valid, start = prepend_history(q, k, v, mask, initial_state)
    # 2. all positions at once through the kernels; drop the outputs at the history positions
    o = _correlate(qa, ka, va, lag_list, segment, valid, block_t, block_d)[:, start:]
    if not output_final_state:
        return o, None
    # 3. the state after the last token (a slice of the inputs, as in the PyTorch form)
    seen = seen_after(initial_state, q.shape[0], T, q.device)
    return o, state_from_sequence(qa, ka, va, valid, lag_list[-1], segment, seen)
