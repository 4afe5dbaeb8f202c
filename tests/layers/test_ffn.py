"""The feed-forward sublayers against their formulas: the 'boom' layer with each activation, RWKV's channel mix
(token shift, squared ReLU, receptance gate). (State and padding: tests/layers/test_sublayer.py.)"""

from __future__ import annotations

import pytest
import torch

from attnfree.layers.ffn import ACTIVATIONS, ChannelMix, FeedForward, make_ffn
from attnfree.layers.sublayer import BlockContext
from attnfree.testing import assert_close, perturb


def ctx(T: int) -> BlockContext:
    return BlockContext(None, torch.arange(T).expand(2, T))


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_feed_forward_is_its_formula(activation: str) -> None:
    torch.manual_seed(0)
    ffn = FeedForward(8, 1.5, activation, 0.0, 1e-5).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    assert ffn.up.out_features == 12 and ffn.init_state(2) == {}
    assert_close(activation, ffn(x, ctx(5)), ffn.down(ffn.act(ffn.up(ffn.norm(x)))))


def test_channel_mix_is_rwkv_formula() -> None:
    torch.manual_seed(0)
    cm = perturb(ChannelMix(8, 2, 0.0, 1e-5), std=0.3).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    n = cm.norm(x)
    prev = torch.cat([torch.zeros_like(n[:, :1]), n[:, :-1]], 1)
    mu_k, mu_r = cm.time_mix
    k = torch.relu(cm.up(mu_k * n + (1 - mu_k) * prev)).square()
    expected = torch.sigmoid(cm.receptance(mu_r * n + (1 - mu_r) * prev)) * cm.down(k)
    assert_close("channel mix", cm(x, ctx(5)), expected)


def test_make_ffn_builds_by_name_and_names_the_choices() -> None:
    assert isinstance(make_ffn("channel_mix", 8, 2, 0.0, 1e-5), ChannelMix)
    assert isinstance(make_ffn("sqrelu", 8, 2, 0.0, 1e-5), FeedForward)
    with pytest.raises(ValueError, match="ffn kind must be one of"):
        make_ffn("swiglu", 8, 2, 0.0, 1e-5)
