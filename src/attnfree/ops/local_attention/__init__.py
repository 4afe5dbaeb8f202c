"""Sliding-window causal softmax attention ("local attention"), in three forms with one signature.

For every position i and head, with queries q, keys k, values v of head size D and a window of w positions:

    o_i = sum_{j in W_i} exp(q_i . k_j / sqrt(D)) v_j / sum_{j in W_i} exp(q_i . k_j / sqrt(D)),
    W_i = {j : i - w < j <= i, j a real token}

(o_i = 0 when W_i is empty: a query that sees only padding). The window counts positions, padded or not; with
left padding, the only padding there is, that is the same as counting real tokens, so a left-padded row gives what
the row alone gives. Decoding needs the last w keys and values only: a state constant in the context length.

- ``local_attention_naive``: float64, the whole masked score matrix (reference).
- ``local_attention_chunked``: queries in blocks of c >= w against their own and the previous block: O(T w)
  time and memory, continuing from a state (training and prefill).
- ``local_attention_recurrent``: one token at a time through ``local_attention_step`` (decoding).
- ``rotary`` (``rotary_angles`` then ``rotate``): rotary position embedding at given positions, for the layer's
  queries and keys.
"""

from attnfree.ops.local_attention.chunked import local_attention_chunked
from attnfree.ops.local_attention.naive import local_attention_naive
from attnfree.ops.local_attention.recurrent import local_attention_recurrent, local_attention_step
from attnfree.ops.local_attention.rotary import rotary, rotary_angles, rotate
from attnfree.ops.local_attention.state import LocalState, WindowOptions, init_local_state

__all__ = [
    "LocalState",
    "WindowOptions",
    "init_local_state",
    "local_attention_chunked",
    "local_attention_naive",
    "local_attention_recurrent",
    "local_attention_step",
    "rotary",
    "rotary_angles",
    "rotate",
]
