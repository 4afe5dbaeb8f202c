"""Windowed causal additive pooling (LEAP's local attention): the softmax of the additive pooling over the last k
positions only, in three forms with one signature.

For every position i, with scores a_j (one per head) and values x_j:

    g_i = sum_{i-k<j<=i} exp(a_j) x_j / sum_{i-k<j<=i} exp(a_j)

Padding has a = -inf and weighs nothing; a window holding no real token gives 0.

- ``windowed_pool_naive``: float64 loop over time, the equation as written (reference).
- ``windowed_pool_parallel``: training and prefill; ``windowed_pool_blocks`` (blocks of length k, the previous
  block's suffix joined to the current block's prefix, van Herk / Gil-Werman, each part relative to its own max:
  O(T D) per head whatever k, never a difference) or, for short windows, ``windowed_pool_banded`` (each window a
  masked row over two blocks, relative to its own max).
- ``windowed_pool_recurrent``: one token at a time through ``windowed_pool_step`` on a ring of the last k entries.
"""

from attnfree.ops.windowed.naive import windowed_pool_naive
from attnfree.ops.windowed.parallel import windowed_pool_banded, windowed_pool_blocks, windowed_pool_parallel
from attnfree.ops.windowed.recurrent import windowed_pool_recurrent, windowed_pool_step
from attnfree.ops.windowed.state import WindowOptions, WindowState, init_window_state

__all__ = [
    "WindowOptions",
    "WindowState",
    "init_window_state",
    "windowed_pool_banded",
    "windowed_pool_blocks",
    "windowed_pool_naive",
    "windowed_pool_parallel",
    "windowed_pool_recurrent",
    "windowed_pool_step",
]
