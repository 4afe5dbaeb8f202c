"""The additive-attention layer's pooling paths: the automatic choice is explicit, and every path can be forced."""

from __future__ import annotations

import pytest
import torch

from attnfree.layers.additive_attention import POOL_PATHS, FastformerAttention, pool_path
from attnfree.testing import assert_close, perturb


def layer() -> FastformerAttention:
    torch.manual_seed(0)
    return perturb(FastformerAttention(12, 3, 0.0, 1e-5, "raw", 4, "learned")).double().eval()


def test_the_automatic_choice() -> None:
    assert pool_path(has_state=False, T=1, masked=False, grad=False) == "parallel"
    assert pool_path(has_state=True, T=5, masked=False, grad=False) == "parallel"
    assert pool_path(has_state=True, T=1, masked=True, grad=False) == "step"
    assert pool_path(has_state=True, T=1, masked=False, grad=True) == "step"
    assert pool_path(has_state=True, T=1, masked=False, grad=False) == "step_inplace"


@pytest.mark.parametrize("path", POOL_PATHS)
def test_every_path_decodes_the_same_token(path: str) -> None:
    """Prefill 7 positions, then one token through the forced path == the parallel form over all 8."""
    attn = layer()
    h = torch.randn(2, 8, 12, dtype=torch.float64)
    positions = torch.arange(8).expand(2, 8)
    with torch.no_grad():
        full = attn(h, positions, None)
        cache: dict = {}
        attn(h[:, :7], positions[:, :7], None, cache)
        attn.path = path
        step = attn(h[:, 7:], positions[:, 7:], None, cache)
    assert_close(f"path {path}", step[:, 0], full[:, 7])


def test_a_forced_step_refuses_what_it_cannot_do() -> None:
    attn = layer()
    h, positions = torch.randn(2, 3, 12, dtype=torch.float64), torch.arange(3).expand(2, 3)
    attn.path = "step"
    with pytest.raises(ValueError, match="needs one real token and a state"):
        attn(h, positions, None, {})  # three tokens, no state
    cache: dict = {}
    attn.path = "parallel"
    attn(h, positions, None, cache)
    attn.path = "step_inplace"
    with pytest.raises(ValueError, match="needs one real token"):
        attn(h[:, :1], positions[:, :1], torch.ones(2, 1, dtype=torch.bool), cache)  # a mask: not in place
