"""Causal additive attention (Fastformer pooling made causal), in three forms with one signature.

For every position i, with scores a_j (one per head) and values x_j:

    g_i = sum_{j<=i} exp(a_j) x_j / sum_{j<=i} exp(a_j)                      (Fastformer eq. 3-4, causal)

which two running sums give exactly: s_i = s_{i-1} + exp(a_i) x_i, z_i = z_{i-1} + exp(a_i), g_i = s_i / z_i.
All forms keep the sums relative to the running maximum m_i = max_{j<=i} a_j (online softmax), so no
exponent is ever positive and no score magnitude can overflow.

- ``additive_pool_naive``: float64 loop over time, the equation as written (reference).
- ``additive_pool_parallel``: chunked matrix form for training and prefill.
- ``additive_pool_recurrent``: one token at a time through ``additive_pool_step`` (decoding).
"""

from attnfree.ops.additive.naive import additive_pool_naive
from attnfree.ops.additive.parallel import additive_pool_parallel
from attnfree.ops.additive.recurrent import additive_pool_recurrent, additive_pool_step, additive_pool_step_
from attnfree.ops.additive.state import AdditiveState, init_additive_state

ADDITIVE_POOL_IMPLS = {
    "naive": additive_pool_naive,
    "parallel": additive_pool_parallel,
    "recurrent": additive_pool_recurrent,
}

__all__ = [
    "ADDITIVE_POOL_IMPLS",
    "AdditiveState",
    "additive_pool_naive",
    "additive_pool_parallel",
    "additive_pool_recurrent",
    "additive_pool_step",
    "additive_pool_step_",
    "init_additive_state",
]
