"""The sliding-window attention sublayer: the op on LayerNorm'd, rotated heads, projected; what rotary buys; its
state's size. (Its state dispatch and padding: tests/layers/test_sublayer.py.)"""

from __future__ import annotations

import pytest
import torch

from attnfree.layers.local_attention import LocalAttention
from attnfree.layers.sublayer import BlockContext
from attnfree.models.cache import tree_leaves
from attnfree.ops.local_attention import WindowOptions, local_attention_naive, rotary
from attnfree.testing import assert_close, perturb

C, H = 12, 3


def layer(window: int = 4, use_rotary: bool = True) -> LocalAttention:
    torch.manual_seed(0)
    return perturb(LocalAttention(C, H, window, 0.0, 1e-5, use_rotary), std=0.3).double().eval()


def context(B: int, T: int) -> BlockContext:
    return BlockContext(None, torch.arange(T).expand(B, T))


def test_the_branch_is_the_reference_op_on_normalised_rotated_heads() -> None:
    attn = layer(window=5)
    x = torch.randn(2, 17, C, dtype=torch.float64)
    n = attn.norm(x)
    q, k, v = ((n @ w.T).view(2, 17, H, C // H) for w in attn.qkv.weight.chunk(3))  # W_q, W_k, W_v
    pos = torch.arange(17).expand(2, 17)
    o, _ = local_attention_naive(rotary(q, pos), rotary(k, pos), v, None, None, WindowOptions(5))
    assert_close("branch", attn(x, context(2, 17)), attn.out_proj(o.reshape(2, 17, C)))


@pytest.mark.parametrize("use_rotary", [True, False])
def test_without_rotary_the_window_is_an_unordered_set(use_rotary: bool) -> None:
    """Reordering the keys before the last position (all inside its window) changes its output only with rotary."""
    attn = layer(window=6, use_rotary=use_rotary)
    x = torch.randn(1, 6, C, dtype=torch.float64)
    swapped = x[:, [2, 0, 1, 4, 3, 5]]
    with torch.no_grad():
        a, b = attn(x, context(1, 6))[:, -1], attn(swapped, context(1, 6))[:, -1]
    assert torch.allclose(a, b) != use_rotary


def test_the_state_is_w_keys_and_values_whatever_the_context_length() -> None:
    attn = layer(window=4)
    sizes = []
    for T in (3, 40):
        state: dict = {}
        with torch.no_grad():
            attn(torch.randn(2, T, C, dtype=torch.float64), context(2, T), state)
        sizes.append({name: tuple(t.shape) for name, t in tree_leaves(state)})
    assert sizes[0] == sizes[1] == {"window.k": (2, 4, H, C // H), "window.v": (2, 4, H, C // H),
                                    "window.valid": (2, 4)}


def test_the_window_and_heads_are_checked() -> None:
    with pytest.raises(ValueError, match="WindowOptions.window"):
        LocalAttention(C, H, 0, 0.0, 1e-5)
    with pytest.raises(ValueError, match="not divisible"):
        LocalAttention(C, 5, 4, 0.0, 1e-5)
