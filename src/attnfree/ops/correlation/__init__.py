"""Causal multi-headed cross-correlation ("Leviathan"), in three forms with one signature.

Per head, with a lag set L (dense lags 0..n-1 plus dilated ones, see ``make_lags``) and segment length J:

    R_t(tau) = sum_{j<J} <q_{t-j}, k_{t-tau-j}> / sqrt(J D)   (terms at masked/negative positions dropped)
    a_t      = softmax over the valid lags (t - tau >= 0 and not masked) of R_t
    o_t      = sum_tau a_t(tau) v_{t-tau}                       (0 when no lag is valid)

A masked position behaves as if it did not exist, so a left-padded sequence gives, at its real
positions, the outputs of the same sequence alone. Cost O(T L J D), never O(T^2).

- ``correlation_naive``: float64 loop over t and lags, the equations as written (reference).
- ``correlation_parallel``: banded block matmuls and a box filter, for training and prefill.
- ``correlation_recurrent``: one token at a time through ``correlation_step_`` (decoding, in place).
- ``correlation_triton`` (in ``.triton``, imported only when used): Triton kernels, forward and backward.
- ``correlation``: the dispatcher the layers call: the Triton kernels when ``attnfree.ops.backend.use_triton``
  says so (CUDA tensors with triton installed, or the backend forced to 'triton'), else the parallel form.
  float64 inputs take the parallel form under 'auto' and raise under a forced 'triton' (the kernels accumulate in
  float32), as the additive op does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnfree.ops.backend import get_kernel_backend, use_triton
from attnfree.ops.correlation.naive import correlation_naive
from attnfree.ops.correlation.parallel import correlation_parallel
from attnfree.ops.correlation.recurrent import correlation_recurrent, correlation_step_
from attnfree.ops.correlation.state import CorrelationState, LagSet, init_correlation_state, make_lags


def correlation(q: Tensor, k: Tensor, v: Tensor, spec: LagSet, mask: Tensor | None = None,
                initial_state: CorrelationState | None = None, output_final_state: bool = False
                ) -> tuple[Tensor, CorrelationState | None]:
    """Causal cross-correlation for training and prefill on the chosen kernel backend (same signature and
    values as ``correlation_parallel``): Triton kernels where ``use_triton`` says so, PyTorch otherwise."""
    args = (q, k, v, spec, mask, initial_state, output_final_state)
    if use_triton(q, k, v):
        if q.dtype != torch.float64:
            from attnfree.ops.correlation.triton import correlation_triton  # imports triton: only when used

            return correlation_triton(*args)
        if get_kernel_backend() == "triton":  # forced: say why it cannot run rather than fall back silently
            raise ValueError("kernel backend 'triton' was forced but q is float64; the kernels accumulate in "
                             "float32: pass float32/bfloat16/float16 inputs or use the 'torch' backend")
    return correlation_parallel(*args)


__all__ = [
    "CorrelationState",
    "LagSet",
    "correlation",
    "correlation_naive",
    "correlation_parallel",
    "correlation_recurrent",
    "correlation_step_",
    "init_correlation_state",
    "make_lags",
]
