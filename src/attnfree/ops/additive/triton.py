"""Causal additive attention as Triton kernels: chunked forward and backward, same contract as the other forms.

Notation per (batch, head), valid positions only (masked scores are -inf and weigh exactly 0):

    m_i = max(m0, max_{j<=i} a_j),  z_i = e^{m0 - m_i} z0 + sum_{j<=i} e^{a_j - m_i},  s_i likewise with x_j,
    g_i = s_i / z_i  (0 while z_i = 0).

**Forward** (one program per (b, h, D block)): time in chunks of C positions. Inside a chunk the weights
W_ij = e^{a_j - m_i} (j <= i) form a [C, C] lower-triangular tile, so s = W @ x (tl.dot) + e^{m_c - m_i} s_c
where (s_c, z_c, m_c) is the state carried from the previous chunks. Every exponent is <= 0. The forward
saves g, m_i and z_i ([B, H, T] float32) for the backward.

**Backward**. With u_i = dg_i / z_i and c_i = <dg_i, g_i> / z_i (dL/ds_i = u_i, dL/dz_i = -c_i):

    dL/dx_j = sum_{i>=j} e^{a_j - m_i} u_i                     = e^{a_j - m_j} P_j
    dL/da_j = sum_{i>=j} e^{a_j - m_i} (<u_i, x_j> - c_i)      = e^{a_j - m_j} (<x_j, P_j> - Q_j)

with P_j = sum_{i>=j} e^{m_j - m_i} u_i = u_j + e^{m_j - m_{j+1}} P_{j+1} (and Q from c the same way): a
reverse-time scan whose factors are all <= 1 because m never decreases. Chunked like the forward, in
reverse: a [C, C] upper-triangular tile K_ji = e^{m_j - m_i} (i >= j) gives P = K @ u + e^{m_j - m_r} P_r,
where P_r is the carry from the later chunks. Gradients into the final state start the scan
(P = ds_T, Q = -dz_T at m_T); the scan's value at t = 0 gives the initial state's gradients
(ds0 = e^{m0 - m_0} P_0, dz0 = -e^{m0 - m_0} Q_0). As in ``additive_pool_parallel``, the maxima m are a
reference point with no gradient (the final state's m and the initial state's m get none).

Precision: tiles, sums and the carried state are float32 whatever the input dtype (inputs are upcast on
load). float32 inputs dot in IEEE float32; bfloat16/float16 inputs dot in TF32 on the GPU (x is exact in
TF32, the weights <= 1 lose ~5e-4 relative, far below the output's own rounding). Both tiles of a dot are
float32 because Triton's interpreter computes bfloat16 tl.dot wrongly (garbage of ~1e10 in 3.9), so the
CPU tests run the code the GPU runs. float64 is not handled here (the dispatcher uses the PyTorch form).

Triton is optional: the kernels are defined only when ``triton`` imports. ``TRITON_INTERPRET=1`` must be
set before this module is imported for the kernels to run on CPU tensors.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from attnfree.ops.additive.state import NO_OPTIONS, AdditiveState, PoolOptions, check_inputs

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the PyTorch forms run everywhere; the kernels only where triton is installed
    HAS_TRITON = False

MAX_BLOCK_D = 64  # D is split into blocks of at most this many columns (one program each)
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


if HAS_TRITON:

    @triton.jit
    def _additive_fwd_kernel(
        x_ptr, a_ptr, g_ptr, g32_ptr, m_ptr, z_ptr, s0_ptr, z0_ptr, m0_ptr, sT_ptr, zT_ptr, mT_ptr,
        T, H, D,
        sxb, sxt, sxh, sxd,  # x strides (g is contiguous [B, T, H, D])
        sab, sat, sah,  # a strides
        C: tl.constexpr, BLOCK_D: tl.constexpr, HAS_STATE: tl.constexpr, DOT_PRECISION: tl.constexpr,
        SAVE_G32: tl.constexpr,
    ):
        """One program = one (b, h) and one block of D columns; loops over T in chunks of C.

        With SAVE_G32, g is also written in float32 to g32_ptr for the backward: c = <dg, g> / z cancels
        against <x, P> in da when the weights are peaked, so a bfloat16-rounded g would cost da its accuracy.
        """
        pid_bh, pid_d = tl.program_id(0), tl.program_id(1)
        b, h = pid_bh // H, pid_bh % H
        rows = tl.arange(0, C)  # i within the chunk
        cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # d
        dmask = cols < D
        lower = rows[:, None] >= rows[None, :]  # [C, C]: j <= i
        # 1. the carried state (s_c [BLOCK_D], z_c, m_c), from the initial state or empty
        if HAS_STATE:
            s_c = tl.load(s0_ptr + pid_bh * D + cols, mask=dmask, other=0.0)
            z_c = tl.load(z0_ptr + pid_bh)
            m_c = tl.load(m0_ptr + pid_bh)
        else:
            s_c = tl.zeros([BLOCK_D], dtype=tl.float32)
            z_c = tl.sum(tl.zeros([1], dtype=tl.float32), axis=0)
            m_c = z_c - float("inf")
        for t0 in range(0, T, C):
            t = t0 + rows
            tmask = t < T
            # 2. load a chunk: scores a [C] (-inf past T), values x [C, BLOCK_D]
            a = tl.load(a_ptr + b * sab + t * sat + h * sah, mask=tmask, other=float("-inf"))
            x = tl.load(x_ptr + b * sxb + t[:, None] * sxt + h * sxh + cols[None, :] * sxd,
                        mask=tmask[:, None] & dmask[None, :], other=0.0)
            # 3. running max m_i = max(m_c, a_0..a_i) and the weights W_ij = exp(a_j - m_i), j <= i
            m = tl.maximum(tl.max(tl.where(lower, a[None, :], float("-inf")), axis=1), m_c)  # [C]
            valid = m > float("-inf")
            mf = tl.where(valid, m, 0.0)
            w = tl.exp(tl.where(lower, a[None, :] - mf[:, None], float("-inf")))  # [C, C], entries <= 1
            carry = tl.where(valid, tl.exp(m_c - mf), 0.0)  # [C]: rescales the carried state to m_i
            # 4. s = W @ x + carry * s_c, z = rowsum(W) + carry * z_c, g = s / z
            s = tl.dot(w, x.to(tl.float32), input_precision=DOT_PRECISION) + carry[:, None] * s_c[None, :]
            z = tl.sum(w, axis=1) + carry * z_c
            g = tl.where(z[:, None] > 0, s / tl.where(z > 0, z, 1.0)[:, None], 0.0)
            g_off = ((b * T + t[:, None]) * H + h) * D + cols[None, :]
            tl.store(g_ptr + g_off, g.to(g_ptr.dtype.element_ty), mask=tmask[:, None] & dmask[None, :])
            if SAVE_G32:
                tl.store(g32_ptr + g_off, g, mask=tmask[:, None] & dmask[None, :])
            if pid_d == 0:  # m and z are the same for every D block
                tl.store(m_ptr + pid_bh * T + t, m, mask=tmask)
                tl.store(z_ptr + pid_bh * T + t, z, mask=tmask)
            # 5. carry the chunk's last row (rows past T repeat the state at T - 1)
            last = rows == C - 1
            s_c = tl.sum(tl.where(last[:, None], s, 0.0), axis=0)
            z_c = tl.sum(tl.where(last, z, 0.0), axis=0)
            m_c = tl.max(tl.where(last, m, float("-inf")), axis=0)
        tl.store(sT_ptr + pid_bh * D + cols, s_c, mask=dmask)
        if pid_d == 0:
            tl.store(zT_ptr + pid_bh, z_c)
            tl.store(mT_ptr + pid_bh, m_c)

    @triton.jit
    def _additive_bwd_kernel(
        x_ptr, a_ptr, dg_ptr, m_ptr, z_ptr, c_ptr, dsT_ptr, dzT_ptr, m0_ptr,
        dx_ptr, da_ptr, ds0_ptr, dz0_ptr,
        T, H, D, BH,
        sxb, sxt, sxh, sxd,  # x strides (dx is contiguous [B, T, H, D])
        sab, sat, sah,  # a strides
        sgb, sgt, sgh, sgd,  # dg strides
        C: tl.constexpr, BLOCK_D: tl.constexpr, HAS_STATE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        """One program = one (b, h) and one block of D columns; loops over T in chunks of C, last chunk first.

        c = <dg, g> / z [B, H, T] comes precomputed (it needs all of D). da is written per D block, as
        e_j <x_j, P_j> (minus e_j Q_j from block 0): da_ptr is [n_blocks, B, H, T], summed by the caller.
        """
        pid_bh, pid_d = tl.program_id(0), tl.program_id(1)
        b, h = pid_bh // H, pid_bh % H
        rows = tl.arange(0, C)  # j within the chunk (rows of K)
        cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        dmask = cols < D
        upper = rows[:, None] <= rows[None, :]  # [C, C]: i >= j
        # 1. the scan starts from the final state's gradients, relative to m_T = m_{T-1}
        P_r = tl.load(dsT_ptr + pid_bh * D + cols, mask=dmask, other=0.0)  # [BLOCK_D]
        Q_r = -tl.load(dzT_ptr + pid_bh)
        m_r = tl.load(m_ptr + pid_bh * T + T - 1)
        n_chunks = tl.cdiv(T, C)
        for k in range(0, n_chunks):
            t0 = (n_chunks - 1 - k) * C
            t = t0 + rows
            tmask = t < T
            # 2. load the chunk: m, z, c, a [C] and x, dg [C, BLOCK_D]
            m = tl.load(m_ptr + pid_bh * T + t, mask=tmask, other=float("-inf"))
            z = tl.load(z_ptr + pid_bh * T + t, mask=tmask, other=0.0)
            c = tl.load(c_ptr + pid_bh * T + t, mask=tmask, other=0.0)
            a = tl.load(a_ptr + b * sab + t * sat + h * sah, mask=tmask, other=float("-inf"))
            tile_mask = tmask[:, None] & dmask[None, :]
            x = tl.load(x_ptr + b * sxb + t[:, None] * sxt + h * sxh + cols[None, :] * sxd, mask=tile_mask,
                        other=0.0).to(tl.float32)
            dg = tl.load(dg_ptr + b * sgb + t[:, None] * sgt + h * sgh + cols[None, :] * sgd, mask=tile_mask,
                         other=0.0).to(tl.float32)
            u = dg / tl.where(z > 0, z, 1.0)[:, None]  # dg = 0 wherever z = 0 matters not: g = 0 there
            u = tl.where(z[:, None] > 0, u, 0.0)
            # 3. K_ji = exp(m_j - m_i) for i >= j (0 for rows not yet valid and columns past T): all <= 1
            valid = m > float("-inf")
            mf = tl.where(valid, m, 0.0)
            kmask = upper & valid[:, None] & tmask[None, :]
            K = tl.exp(tl.where(kmask, mf[:, None] - mf[None, :], float("-inf")))
            carry = tl.where(valid, tl.exp(mf - m_r), 0.0)  # [C]: e^{m_j - m_r}
            # 4. P = K @ u + carry P_r, Q = K @ c + carry Q_r
            P = tl.dot(K, u, input_precision=DOT_PRECISION) + carry[:, None] * P_r[None, :]
            Q = tl.sum(K * c[None, :], axis=1) + carry * Q_r
            # 5. dx_j = e_j P_j, da_j = e_j (<x_j, P_j> - Q_j), e_j = exp(a_j - m_j) (0 for masked a_j = -inf)
            e = tl.exp(a - mf)
            dx_off = ((b * T + t[:, None]) * H + h) * D + cols[None, :]
            tl.store(dx_ptr + dx_off, (e[:, None] * P).to(dx_ptr.dtype.element_ty), mask=tile_mask)
            da = e * tl.sum(x * P, axis=1) - tl.where(pid_d == 0, e * Q, 0.0)
            tl.store(da_ptr + (pid_d * BH + pid_bh) * T + t, da, mask=tmask)
            # 6. carry row 0 (position t0) to the earlier chunks
            first = rows == 0
            P_r = tl.sum(tl.where(first[:, None], P, 0.0), axis=0)
            Q_r = tl.sum(tl.where(first, Q, 0.0), axis=0)
            m_r = tl.max(tl.where(first, m, float("-inf")), axis=0)
        # 7. the initial state's gradients: ds0 = e^{m0 - m_0} P_0, dz0 = -e^{m0 - m_0} Q_0
        if HAS_STATE:
            m0 = tl.load(m0_ptr + pid_bh)
            scale = tl.where(m0 > float("-inf"), tl.exp(m0 - tl.where(m_r > float("-inf"), m_r, 0.0)), 0.0)
            tl.store(ds0_ptr + pid_bh * D + cols, scale * P_r, mask=dmask)
            if pid_d == 0:
                tl.store(dz0_ptr + pid_bh, -scale * Q_r)


def _dot_precision(dtype: torch.dtype) -> str:
    """IEEE float32 dots for float32 inputs; TF32 tensor cores for bfloat16/float16 inputs."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _f32(*shape: int, device: torch.device) -> Tensor:
    return torch.empty(*shape, dtype=torch.float32, device=device)


def _launch_config(D: int, chunk_size: int, block_d: int | None) -> tuple[int, int]:
    """Chunk C: a power of two in [16, 128] (tl.dot needs >= 16); D block: a power of two >= 16, <= 64."""
    C = min(max(16, triton.next_power_of_2(chunk_size)), 128)
    BD = block_d if block_d is not None else min(MAX_BLOCK_D, triton.next_power_of_2(D))
    if BD < 16 or BD & (BD - 1):
        raise ValueError(f"block_d must be a power of two >= 16, got {BD}")
    return C, max(16, BD)


class _AdditivePoolTriton(torch.autograd.Function):
    """(x [B,T,H,D], a [B,T,H] float32 with -inf = masked, s0, z0, m0 | None) -> (g, s_T, z_T, m_T)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, a: Tensor, s0: Tensor | None, z0: Tensor | None, m0: Tensor | None,
                chunk: int, block_d: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        B, T, H, D = x.shape
        dev = x.device
        g = torch.empty(B, T, H, D, dtype=x.dtype, device=dev)
        m, z = _f32(B, H, T, device=dev), _f32(B, H, T, device=dev)  # per position, for the backward
        sT, zT, mT = _f32(B, H, D, device=dev), _f32(B, H, device=dev), _f32(B, H, device=dev)
        has_state, low = s0 is not None, x.dtype != torch.float32
        g32 = torch.empty(B, T, H, D, dtype=torch.float32, device=dev) if low else g  # float32 g for backward
        s0_, z0_, m0_ = (s0, z0, m0) if has_state else (sT, zT, mT)  # placeholders, never read
        grid = (B * H, triton.cdiv(D, block_d))
        _additive_fwd_kernel[grid](
            x, a, g, g32, m, z, s0_, z0_, m0_, sT, zT, mT, T, H, D, *x.stride(), *a.stride(),
            C=chunk, BLOCK_D=block_d, HAS_STATE=has_state, DOT_PRECISION=_dot_precision(x.dtype), SAVE_G32=low,
        )
        ctx.save_for_backward(x, a, g32, m, z, m0)
        ctx.chunk, ctx.block_d, ctx.has_state = chunk, block_d, has_state
        ctx.mark_non_differentiable(mT)
        return g, sT, zT, mT

    @staticmethod
    def backward(ctx: Any, dg: Tensor | None, dsT: Tensor | None, dzT: Tensor | None,
                 _dmT: Tensor | None) -> tuple[Tensor | None, ...]:
        x, a, g, m, z, m0 = ctx.saved_tensors
        B, T, H, D = x.shape
        dev = x.device
        # 1. c_i = <dg_i, g_i> / z_i [B, H, T] needs all of D: computed here (flash attention's "delta")
        dg = torch.zeros_like(g) if dg is None else dg
        c = (dg.float() * g.float()).sum(-1).transpose(1, 2)
        c = torch.where(z > 0, c / z.clamp_min(1e-30), torch.zeros_like(c)).contiguous()
        dsT = _f32(B, H, D, device=dev).zero_() if dsT is None else dsT.float().contiguous()
        dzT = _f32(B, H, device=dev).zero_() if dzT is None else dzT.float().contiguous()
        # 2. the reverse chunked scan
        n_blocks = triton.cdiv(D, ctx.block_d)
        dx = torch.empty(B, T, H, D, dtype=x.dtype, device=x.device)
        da = _f32(n_blocks, B, H, T, device=dev)
        ds0, dz0 = _f32(B, H, D, device=dev), _f32(B, H, device=dev)
        _additive_bwd_kernel[(B * H, n_blocks)](
            x, a, dg, m, z, c, dsT, dzT, m0 if ctx.has_state else dzT, dx, da, ds0, dz0,
            T, H, D, B * H, *x.stride(), *a.stride(), *dg.stride(),
            C=ctx.chunk, BLOCK_D=ctx.block_d, HAS_STATE=ctx.has_state, DOT_PRECISION=_dot_precision(x.dtype),
        )
        # 3. da: sum the D blocks' parts, back to [B, T, H]
        da_total = da.sum(0).transpose(1, 2)
        state_grads = (ds0, dz0) if ctx.has_state else (None, None)
        return dx, da_total, *state_grads, None, None, None


def additive_pool_triton(x: Tensor, scores: Tensor, mask: Tensor | None = None,
                         initial_state: AdditiveState | None = None, options: PoolOptions = NO_OPTIONS,
                         block_d: int | None = None) -> tuple[Tensor, AdditiveState | None]:
    """Same contract as ``additive_pool_parallel`` (g [B, T, H, D], final state), computed by Triton kernels.

    x: [B, T, H, D] float32/bfloat16/float16 on CUDA (or CPU under ``TRITON_INTERPRET=1``), scores: [B, T, H],
    mask: [B, T] bool. No current-token bonus (``options.bonus`` must be None). options.chunk_size is rounded to a
    power of two in [16, 128]; block_d (default
    min(64, next_pow2(D))) splits D across programs. Gradients reach x, scores and the initial state's s and z.
    """
    if not HAS_TRITON:
        raise RuntimeError("additive_pool_triton needs the triton package (pip install 'attnfree[triton]')")
    check_inputs(x, scores, mask, initial_state)
    if options.bonus is not None:
        raise ValueError("additive_pool_triton takes no current-token bonus (options.bonus must be None)")
    if x.dtype not in TRITON_DTYPES:
        raise ValueError(f"additive_pool_triton supports x dtypes {TRITON_DTYPES}, got {x.dtype}")
    if x.shape[1] == 0:
        raise ValueError("additive_pool_triton needs T >= 1, got x of shape " + str(tuple(x.shape)))
    # 1. masked positions become scores of -inf: weight exactly 0, gradient exactly 0
    a = scores.to(torch.float32)
    if mask is not None:
        a = a.masked_fill(~mask.bool().unsqueeze(-1), float("-inf"))
    chunk, bd = _launch_config(x.shape[-1], options.chunk_size, block_d)
    # 2. the kernels, with the initial state (float32, contiguous) if there is one
    state: tuple[Tensor | None, ...] = (None, None, None)
    if initial_state is not None:
        state = tuple(t.to(torch.float32).contiguous() for t in initial_state)
    g, sT, zT, mT = _AdditivePoolTriton.apply(x, a, *state, chunk, bd)
    return g, (AdditiveState(sT, zT, mT) if options.output_final_state else None)
