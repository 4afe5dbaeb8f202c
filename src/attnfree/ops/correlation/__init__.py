"""Causal multi-headed cross-correlation ("Leviathan"), in three forms with one signature.

Per head, with a lag set L (dense lags 0..n-1 plus dilated ones, see ``make_lags``) and segment length J:

    R_t(tau) = sum_{j<J} <q_{t-j}, k_{t-tau-j}> / sqrt(J D)   (terms at masked/negative positions dropped)
    a_t      = softmax over the valid lags (t - tau >= 0 and not masked) of R_t
    o_t      = sum_tau a_t(tau) v_{t-tau}                       (0 when no lag is valid)

A masked position behaves as if it did not exist, so a left-padded sequence gives, at its real
positions, the outputs of the same sequence alone. Cost O(T L J D), never O(T^2).

- ``correlation_naive``: float64 loop over t and lags, the equations as written (reference).
- ``correlation_parallel``: banded block matmuls and a box filter, for training and prefill.
- ``correlation_recurrent``: one token at a time through ``correlation_step`` (decoding).
"""

from attnfree.ops.correlation.naive import correlation_naive
from attnfree.ops.correlation.parallel import correlation_parallel
from attnfree.ops.correlation.recurrent import correlation_recurrent, correlation_step
from attnfree.ops.correlation.state import CorrelationState, init_correlation_state, make_lags

CORRELATION_IMPLS = {
    "naive": correlation_naive,
    "parallel": correlation_parallel,
    "recurrent": correlation_recurrent,
}

__all__ = [
    "CORRELATION_IMPLS",
    "CorrelationState",
    "correlation_naive",
    "correlation_parallel",
    "correlation_recurrent",
    "correlation_step",
    "init_correlation_state",
    "make_lags",
]
