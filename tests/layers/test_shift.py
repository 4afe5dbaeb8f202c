"""Token shift inside a sublayer: the previous position's input, continued across calls through the state."""

from __future__ import annotations

import torch

from attnfree.layers.shift import shifted
from attnfree.layers.sublayer import BlockContext


def test_shifted_continues_across_calls_and_zeroes_padding() -> None:
    x = torch.arange(1.0, 13.0).view(1, 6, 2)
    mask = torch.tensor([[False, True, True, True, True, True]])
    whole = shifted(x, BlockContext(mask, torch.zeros(1, 6, dtype=torch.long)), None)
    assert torch.equal(whole[0, :2], torch.zeros(2, 2)) and torch.equal(whole[0, 2:], x[0, 1:5])
    state: dict = {}
    first = shifted(x[:, :4], BlockContext(mask[:, :4], torch.zeros(1, 4, dtype=torch.long)), state)
    step = shifted(x[:, 4:5], BlockContext(mask[:, 4:5], torch.zeros(1, 1, dtype=torch.long)), state)
    assert torch.equal(torch.cat([first, step], 1), whole[:, :5]) and torch.equal(state["shift"], x[:, 4])
