"""Causal grouped convolution: reference <-> parallel <-> step, with state and left padding."""

import pytest
import torch

from attnfree.ops.conv import causal_conv1d, causal_conv1d_naive, causal_conv1d_step, init_conv_state
from attnfree.testing import assert_close


@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize("groups", [1, 3, 12], ids=["full", "g3", "depthwise"])
@pytest.mark.parametrize("T", [1, 9, 63])
def test_forms_agree(K, groups, T):
    B, C = 3, 12
    x = torch.randn(B, T, C, dtype=torch.float64, requires_grad=True)
    w = torch.randn(C, C // groups, K, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, : T // 2] = False
    ref, ref_state = causal_conv1d_naive(x, w, groups, mask)
    out, state = causal_conv1d(x, w, groups, mask)
    assert_close("parallel", out, ref)
    assert_close("state", state, ref_state)
    do = torch.randn_like(ref)
    gx_ref, gw_ref = torch.autograd.grad((ref * do).sum(), (x, w))
    gx, gw = torch.autograd.grad((out * do).sum(), (x, w))
    assert_close("dx", gx, gx_ref)
    assert_close("dw", gw, gw_ref)
    st = init_conv_state(B, C, K, x.dtype)
    steps = []
    for t in range(T):
        y, st = causal_conv1d_step(x[:, t], w, groups, mask[:, t], st)
        steps.append(y)
    assert_close("step", torch.stack(steps, 1), ref)
    assert_close("step state", st, ref_state)


def test_continue_from_state():
    B, T, C, K = 2, 20, 6, 4
    x, w = torch.randn(B, T, C, dtype=torch.float64), torch.randn(C, 1, K, dtype=torch.float64)
    full, _ = causal_conv1d(x, w, C)
    _, st = causal_conv1d(x[:, :7], w, C)
    rest, _ = causal_conv1d(x[:, 7:], w, C, None, st)
    assert_close("continued", rest, full[:, 7:])
