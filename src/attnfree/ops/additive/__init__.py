"""Causal additive attention (Fastformer pooling made causal), in three forms with one signature.

For every position i, with scores a_j (one per head) and values x_j:

    g_i = sum_{j<=i} exp(a_j) x_j / sum_{j<=i} exp(a_j)                      (Fastformer eq. 3-4, causal)

which two running sums give exactly: s_i = s_{i-1} + exp(a_i) x_i, z_i = z_{i-1} + exp(a_i), g_i = s_i / z_i.
All forms keep the sums relative to the running maximum m_i = max_{j<=i} a_j (online softmax), so no
exponent is ever positive and no score magnitude can overflow.

- ``additive_pool_naive``: float64 loop over time, the equation as written (reference).
- ``additive_pool_parallel``: chunked matrix form for training and prefill.
- ``additive_pool_recurrent``: one token at a time through ``additive_pool_step`` (decoding).
- ``additive_pool_triton`` (``ops/additive/triton.py``, imported on first use): chunked Triton kernels.
- ``additive_pool``: the dispatcher the layers call: Triton or the parallel form, per ``ops.backend``.
"""

from torch import Tensor

from attnfree.ops.additive.naive import additive_pool_naive
from attnfree.ops.additive.parallel import additive_pool_parallel
from attnfree.ops.additive.recurrent import additive_pool_recurrent, additive_pool_step, additive_pool_step_
from attnfree.ops.additive.state import NO_OPTIONS, AdditiveState, PoolOptions, init_additive_state
from attnfree.ops.backend import get_kernel_backend, use_triton


def additive_pool(x: Tensor, scores: Tensor, mask: Tensor | None = None, initial_state: AdditiveState | None = None,
                  options: PoolOptions = NO_OPTIONS) -> tuple[Tensor, AdditiveState | None]:
    """``additive_pool_parallel``'s contract, run by the Triton kernels when ``use_triton(x, scores)`` says so.

    With backend 'auto' the kernels take CUDA tensors of float32/bfloat16/float16 with T >= 1 (float64 and
    empty sequences stay on PyTorch); with 'triton' forced, an unsupported input raises instead. A current-token
    bonus runs on PyTorch (the kernels do not take one).
    """
    if options.bonus is not None:
        if get_kernel_backend() == "triton":
            raise ValueError("kernel backend 'triton' was forced but the kernels take no current-token bonus")
        return additive_pool_parallel(x, scores, mask, initial_state, options)
    if use_triton(x, scores):
        from attnfree.ops.additive.triton import TRITON_DTYPES, additive_pool_triton  # imports triton

        if get_kernel_backend() == "triton" or (x.dtype in TRITON_DTYPES and x.shape[1] > 0):
            return additive_pool_triton(x, scores, mask, initial_state, options)
    return additive_pool_parallel(x, scores, mask, initial_state, options)


__all__ = [
    "AdditiveState",
    "PoolOptions",
    "additive_pool",
    "additive_pool_naive",
    "additive_pool_parallel",
    "additive_pool_recurrent",
    "additive_pool_step",
    "additive_pool_step_",
    "init_additive_state",
]
