"""The correlation sublayer: the op on the projections of the normalised input, projected out; the lag set and
segment length reach the op. (State and padding: tests/layers/test_sublayer.py.)"""

from __future__ import annotations

import torch

from attnfree.layers.correlation import MultiHeadedCorrelation
from attnfree.layers.sublayer import BlockContext
from attnfree.ops.correlation import LagSet, correlation_naive
from attnfree.testing import assert_close, perturb


def test_the_branch_is_the_op_on_the_projections() -> None:
    torch.manual_seed(0)
    spec = LagSet((0, 1, 3, 6), 2)
    layer = perturb(MultiHeadedCorrelation(12, 3, spec, 0.0, 1e-5), std=0.3).double()
    x = torch.randn(2, 10, 12, dtype=torch.float64)
    q, k, v = layer.qkv(layer.norm(x)).view(2, 10, 3, 3, 4).unbind(2)
    expected = layer.out(correlation_naive(q, k, v, spec)[0].reshape(2, 10, 12))
    assert_close("correlation", layer(x, BlockContext(None, torch.arange(10).expand(2, 10))), expected)
    state = layer.init_state(2)["ring"]
    assert state.k.shape == (2, 6 + 2, 3, 4) and not state.valid.any()
