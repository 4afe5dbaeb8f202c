"""The sublayer contract, once for every sublayer: one interface, one state dispatch, its own initial values.

Every sublayer (token mixers, convolution, feed-forward flavours, mixture of experts) must give, on a left-padded
batch in float64: the same branch whether run whole, prefilled in chunks or decoded token by token from its own
state; the same branch for a padded row as for the row alone; a state that starts from ``init_state`` as from
nothing, whose leaves are batch-first; and initial values that ``reset_parameters`` restores.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor
from toy_sublayer import RunningMax

from attnfree.layers.additive_attention import FastformerAttention, LeapAttention
from attnfree.layers.conv import CausalConvolution
from attnfree.layers.correlation import MultiHeadedCorrelation
from attnfree.layers.ffn import ChannelMix, FeedForward
from attnfree.layers.local_attention import LocalAttention
from attnfree.layers.moe import SparseMoE
from attnfree.layers.sublayer import BlockContext, Sublayer, stateful, use_path
from attnfree.models.cache import tree_leaves, tree_map
from attnfree.ops.correlation import LagSet
from attnfree.testing import assert_close, perturb

C, H = 12, 3
SUBLAYERS: dict[str, Callable[[], Sublayer]] = {
    "attention": lambda: FastformerAttention(C, H, 0.0, 1e-5, 4),
    "attention-fixed-decay": lambda: FastformerAttention(C, H, 0.0, 1e-5, 4, decay="fixed"),
    "attention-seed": lambda: FastformerAttention(C, H, 0.0, 1e-5, 4, decay="none", residual="normed"),
    "attention-bonus-shift": lambda: FastformerAttention(C, H, 0.0, 1e-5, 4, bonus=True, token_shift=True),
    "attention-window3": lambda: FastformerAttention(C, H, 0.0, 1e-5, 4, window=3),
    "attention-window1-shift": lambda: FastformerAttention(C, H, 0.0, 1e-5, 4, decay="none", window=1,
                                                           token_shift=True),
    "leap-window3": lambda: LeapAttention(C, H, 0.0, 1e-5, 4, window=3),
    "leap-global-normed": lambda: LeapAttention(C, H, 0.0, 1e-5, 4, focus="normed_dot", decay="fixed"),
    "leap-window5-plain": lambda: LeapAttention(C, H, 0.0, 1e-5, 4, window=5, focus="vector", alignment=False),
    "conv": lambda: CausalConvolution(C, 3, 1, 0.0, 1e-5),
    "conv-depthwise": lambda: CausalConvolution(C, 4, C, 0.0, 1e-5),
    "ffn-gelu": lambda: FeedForward(C, 2, "gelu", 0.0, 1e-5),
    "ffn-sqrelu": lambda: FeedForward(C, 2, "sqrelu", 0.0, 1e-5),
    "channel-mix": lambda: ChannelMix(C, 2, 0.0, 1e-5),
    "moe": lambda: SparseMoE(C, 2, "gelu", 3, 2, 1.25, 1.0, 0.0, 1e-5),
    "correlation": lambda: MultiHeadedCorrelation(C, H, LagSet((0, 1, 2, 4, 8), 2), 0.0, 1e-5),
    "local-attention": lambda: LocalAttention(C, H, 3, 0.0, 1e-5),
    "local-attention-wide-no-rotary": lambda: LocalAttention(C, H, 20, 0.0, 1e-5, rotary=False),
    "toy-running-max": lambda: RunningMax(C),  # the toy sublayer of tests/toy_sublayer.py
}


@pytest.fixture(params=sorted(SUBLAYERS))
def name(request) -> str:
    return request.param


def make(name: str) -> Sublayer:
    torch.manual_seed(0)
    return perturb(SUBLAYERS[name](), std=0.3).double().eval()


def padded(B: int = 3, T: int = 11) -> tuple[Tensor, Tensor, Tensor]:
    """x [B, T, C], mask [B, T] (row 1 left-padded by 4, row 2 holds two real tokens), positions [B, T]."""
    x = torch.randn(B, T, C, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, :4], mask[2, : T - 2] = False, False
    return x, mask, (mask.long().cumsum(-1) - 1).clamp_min(0)


def run(layer: Sublayer, x: Tensor, mask: Tensor | None, positions: Tensor, state: dict | None) -> Tensor:
    return layer(x, BlockContext(mask, positions), state)


def test_every_sublayer_is_in_the_table() -> None:
    """Every Sublayer class in attnfree.layers is exercised here (a new one must be added to SUBLAYERS)."""
    import attnfree.layers.additive_attention  # noqa: E401, F401
    import attnfree.layers.conv
    import attnfree.layers.correlation
    import attnfree.layers.ffn  # noqa: E401, F401
    import attnfree.layers.local_attention  # noqa: F401

    def subclasses(cls: type) -> set[type]:
        return {s for c in cls.__subclasses__() for s in {c, *subclasses(c)}}

    ours = {c for c in subclasses(Sublayer) if c.__module__.startswith("attnfree.")}
    tested = {type(f()) for f in SUBLAYERS.values()}
    assert ours <= tested, ours - tested


@pytest.mark.parametrize("chunk", [1, 4])
def test_whole_equals_chunked_prefill_then_token_by_token(name: str, chunk: int) -> None:
    layer = make(name)
    x, mask, pos = padded()
    with torch.no_grad():
        whole = run(layer, x, mask, pos, None)
        state: dict = {}
        spans = [(s, min(s + chunk, 6)) for s in range(0, 6, chunk)]  # the prefix 0..5 in chunks (a short last one)
        pieces = [run(layer, x[:, s:e], mask[:, s:e], pos[:, s:e], state) for s, e in spans]
        pieces += [run(layer, x[:, t:t + 1], mask[:, t:t + 1], pos[:, t:t + 1], state) for t in range(6, 11)]
    got = torch.cat(pieces, 1)
    assert_close(f"{name} chunk={chunk}", got[mask], whole[mask])


def test_a_padded_row_equals_the_row_alone(name: str) -> None:
    layer = make(name)
    x, mask, pos = padded()
    with torch.no_grad():
        batch = run(layer, x, mask, pos, None)
        alone = run(layer, x[1:2, 4:], None, pos[1:2, 4:], None)
    assert_close(name, batch[1, 4:], alone[0])


def test_init_state_is_a_batch_first_start(name: str) -> None:
    layer = make(name)
    x, mask, pos = padded()
    empty = layer.init_state(3, dtype=torch.float64)
    assert all(t.shape[0] == 3 for _, t in tree_leaves(empty)), name
    with torch.no_grad():
        fresh = run(layer, x, mask, pos, {})
        from_init = run(layer, x, mask, pos, empty)
    assert_close(name, from_init[mask], fresh[mask])


def test_reset_parameters_restores_the_initial_values(name: str) -> None:
    torch.manual_seed(0)
    layer = SUBLAYERS[name]()
    initial = {k: v.clone() for k, v in layer.state_dict().items()}
    own = [p for p in layer.parameters(recurse=False)]
    with torch.no_grad():
        for p in own:
            p.add_(1.0)
    torch.manual_seed(0)  # (the constructor's reset_parameters was the first to draw from this seed)
    layer.reset_parameters()
    for key, value in layer.state_dict().items():
        if key.count(".") == 0:  # the sublayer's own tensors (children are the shell's to initialise)
            assert torch.equal(value, initial[key]), (name, key)


def test_a_step_can_be_forced_only_where_it_applies() -> None:
    layer = make("attention")
    x, _, pos = padded()
    with use_path("step"), pytest.raises(ValueError, match="the step path needs one position and a state"):
        run(layer, x, None, pos, {})
    state: dict = {}
    with torch.no_grad():
        run(layer, x[:, :5], None, pos[:, :5], state)
        auto = run(layer, x[:, 5:6], None, pos[:, 5:6], tree_map(state, torch.clone))  # (the step is in place)
        with use_path("parallel"):  # a one-token call through the parallel form continues the same state
            forced = run(layer, x[:, 5:6], None, pos[:, 5:6], state)
    assert_close("parallel one-token", forced, auto)
    with pytest.raises(ValueError, match="path must be one of"), use_path("fast"):
        pass


def test_the_in_place_step_and_the_autograd_step_agree() -> None:
    """Without autograd and padding the attention's step updates its state in place (the decoding hot path)."""
    layer = make("attention")
    x, _, pos = padded()
    states: list[dict] = [{}, {}]
    with torch.no_grad():
        for s in states:
            run(layer, x[:, :5], None, pos[:, :5], s)
        ptr = states[0]["query"].s.data_ptr()
        in_place = run(layer, x[:, 5:6], None, pos[:, 5:6], states[0])
        assert states[0]["query"].s.data_ptr() == ptr
    with torch.enable_grad():
        autograd = run(layer, x[:, 5:6], None, pos[:, 5:6], states[1])
    assert_close("in place vs autograd step", in_place, autograd.detach())


def test_stateful_writes_the_state_back_only_when_caching() -> None:
    calls: list[str] = []

    def step(prev: Tensor) -> tuple[Tensor, Tensor]:
        calls.append("step")
        return prev + 1, prev + 1

    def parallel(prev: Tensor | None, keep: bool) -> tuple[Tensor, Tensor | None]:
        calls.append(f"parallel keep={keep}")
        return torch.zeros(1), torch.zeros(1) if keep else None

    state: dict = {}
    stateful(None, "s", 5, step, parallel)
    stateful(state, "s", 5, step, parallel)
    stateful(state, "s", 1, step, parallel)
    assert calls == ["parallel keep=False", "parallel keep=True", "step"] and float(state["s"]) == 1.0
