"""The causal convolution sublayer: F.conv1d of the normalised input with left zero padding, its weight's
initial values. (Its state and padding: tests/layers/test_sublayer.py.)"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnfree.layers.conv import CausalConvolution
from attnfree.layers.sublayer import BlockContext
from attnfree.testing import assert_close


def test_the_branch_is_a_causal_convolution_of_the_normalised_input() -> None:
    torch.manual_seed(0)
    conv = CausalConvolution(8, 3, 2, 0.0, 1e-5).double()
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    expected = F.conv1d(F.pad(conv.norm(x).transpose(1, 2), (2, 0)), conv.weight, groups=2).transpose(1, 2)
    assert_close("conv", conv(x, BlockContext(None, torch.arange(7).expand(2, 7))), expected)


def test_the_weight_starts_normal_with_the_given_std() -> None:
    torch.manual_seed(0)
    w = CausalConvolution(64, 4, 1, 0.0, 1e-5, init_std=0.05).weight
    assert abs(float(w.std()) - 0.05) < 0.005 and abs(float(w.mean())) < 0.005
