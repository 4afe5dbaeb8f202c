from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from attnfree.evaluation.bpc import bpc_from_loss, eval_windows, evaluate_bpc
from attnfree.testing import assert_close

V = 259  # the byte tokenizer's vocabulary
BOS = 257


def tiny_gpt2(dtype: torch.dtype = torch.float64, dropout: float = 0.0) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=BOS, eos_token_id=258,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
    )  # fmt: skip
    model = GPT2LMHeadModel(config)
    return (model.double() if dtype == torch.float64 else model.float()).eval()


@pytest.fixture(scope="module")
def model() -> GPT2LMHeadModel:
    return tiny_gpt2()


def tokens(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))


def context_start(p: int, block_size: int, stride: int) -> int:
    """Where the context of input position ``p`` (predicting ``stream[p + 1]``) begins.

    Non-overlapping (stride == block_size): the start of p's own block. Sliding: the first window
    covers targets 0..block_size-1 from position 0; later the window of stride m starts at m * stride
    and is the one that scores positions [(m-1) * stride + block_size, m * stride + block_size).
    """
    if p < block_size:
        return 0
    return ((p - block_size) // stride + 1) * stride


@torch.no_grad()
def brute_force_nats(model, stream: torch.Tensor, block_size: int, stride: int) -> float:
    """Every target scored alone: run the model on exactly its context, take the last log-prob."""
    total = 0.0
    for p in range(stream.numel() - 1):
        context = stream[context_start(p, block_size, stride) : p + 1]
        assert 1 <= context.numel() <= block_size
        logits = model(input_ids=context[None]).logits[0, -1].double()
        total -= torch.log_softmax(logits, -1)[stream[p + 1]].item()
    return total


CASES = {
    "blocks-partial-tail": (53, 16, None, None),
    "blocks-exact": (48, 16, None, None),
    "blocks-shorter-than-one": (10, 16, None, None),
    "blocks-bos": (53, 16, None, BOS),
    "sliding-5": (53, 16, 5, None),
    "sliding-1": (53, 16, 1, None),
    "sliding-7-bos": (53, 16, 7, BOS),
    "sliding-stride-equals-block": (53, 16, 16, None),
}


@pytest.mark.parametrize("n, block_size, stride, bos", CASES.values(), ids=CASES.keys())
def test_matches_brute_force(model, n: int, block_size: int, stride: int | None, bos: int | None) -> None:
    toks = tokens(n)
    result = evaluate_bpc(model, toks, n_chars=n, block_size=block_size, stride=stride, batch_size=3,
                          bos_token_id=bos)  # fmt: skip
    stream = toks if bos is None else torch.cat([torch.tensor([bos]), toks])
    expected = brute_force_nats(model, stream, block_size, stride or block_size)
    assert result.n_tokens == stream.numel() - 1  # nothing dropped, the partial last block included
    assert math.isclose(result.total_nats, expected, rel_tol=1e-10), (result.total_nats, expected)
    assert result.stride == (stride or block_size)


def test_float32_matches_brute_force_to_1e5() -> None:
    model, toks = tiny_gpt2(torch.float32), tokens(53)
    result = evaluate_bpc(model, toks, n_chars=53, block_size=16, stride=5)
    expected = brute_force_nats(model, toks, 16, 5)
    assert math.isclose(result.total_nats, expected, rel_tol=1e-5), (result.total_nats, expected)


@torch.no_grad()
@pytest.mark.parametrize("stride", [1, 5, None], ids=["stride-1", "stride-5", "blocks"])
def test_block_longer_than_text_is_full_context_scoring(model, stride: int | None) -> None:
    toks = tokens(40)
    logits = model(input_ids=toks[None]).logits[0, :-1]  # [T-1, V]
    full = torch.nn.functional.cross_entropy(logits, toks[1:], reduction="sum").item()
    result = evaluate_bpc(model, toks, n_chars=40, block_size=64, stride=stride)
    assert math.isclose(result.total_nats, full, rel_tol=1e-10)


def test_batch_size_does_not_change_the_result(model) -> None:
    toks = tokens(61)
    totals = [evaluate_bpc(model, toks, 61, 8, stride=3, batch_size=b).total_nats for b in (1, 2, 7, 64)]
    assert_close("totals", torch.tensor(totals), torch.tensor(totals[:1] * 4), rtol=1e-12)


class UniformLM(torch.nn.Module):
    """Any causal LM returning ``.logits``: here zeros, so every token costs exactly ln V nats."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the model a device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, V) + self.anchor)


def test_fields_are_consistent_and_bpc_is_per_character() -> None:
    toks, n_chars = tokens(30), 75  # as if each token covered 2.5 characters
    result = evaluate_bpc(UniformLM(), toks, n_chars=n_chars, block_size=8, bos_token_id=BOS)
    assert result.n_tokens == 30 and result.n_chars == 75 and result.block_size == result.stride == 8
    assert math.isclose(result.loss_per_token, math.log(V), rel_tol=1e-6)
    assert math.isclose(result.perplexity, V, rel_tol=1e-5)
    assert math.isclose(result.nats_per_char, 30 * math.log(V) / 75, rel_tol=1e-6)
    assert math.isclose(result.bpc, 30 * math.log2(V) / 75, rel_tol=1e-6)
    assert result.bpc == bpc_from_loss(result.loss_per_token, 30, 75)
    assert "BOS prepended" in result.protocol and "non-overlapping" in result.protocol


def test_protocol_says_when_the_first_token_is_context_only(model) -> None:
    result = evaluate_bpc(model, tokens(20), n_chars=20, block_size=8, stride=4)
    assert result.n_tokens == 19
    assert "first token is context only" in result.protocol and "stride 4" in result.protocol


def test_eval_mode_inside_training_mode_restored() -> None:
    model, toks = tiny_gpt2(dropout=0.5).train(), tokens(33)
    first = evaluate_bpc(model, toks, 33, 16)
    assert model.training
    assert evaluate_bpc(model, toks, 33, 16).total_nats == first.total_nats  # no dropout noise
    assert math.isclose(first.total_nats, brute_force_nats(model.eval(), toks, 16, 16), rel_tol=1e-10)


@pytest.mark.parametrize("n_inputs", [1, 15, 16, 17, 100])
@pytest.mark.parametrize("block_size, stride", [(16, 16), (16, 1), (16, 5), (1, 1)])
def test_windows_score_every_target_once(n_inputs: int, block_size: int, stride: int) -> None:
    scored: list[int] = []
    for begin, end, n_scored in eval_windows(n_inputs, block_size, stride):
        assert 0 < end - begin <= block_size and 0 < n_scored <= end - begin
        scored += range(end - n_scored, end)
    assert scored == list(range(n_inputs))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"block_size": 8, "stride": 0}, "stride"),
        ({"block_size": 8, "stride": 9}, "stride"),
        ({"block_size": 0}, "block_size"),
        ({"block_size": 8, "n_chars": 0}, "n_chars"),
        ({"block_size": 8, "tokens": torch.tensor([5])}, ">= 2 tokens"),
    ],
    ids=["stride-0", "stride-over-block", "block-0", "no-chars", "one-token"],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    args = {"tokens": tokens(20), "n_chars": 20, **kwargs}
    with pytest.raises(ValueError, match=match):
        evaluate_bpc(UniformLM(), **args)


def test_contexts_beyond_the_training_length_and_past_learned_positions() -> None:
    """A position-free model is scored at any context (each L the same as evaluate_bpc with that window and
    stride); a model with learned positions only up to its n_positions."""
    from attnfree import FastformerConfig, FastformerForCausalLM
    from attnfree.evaluation.bpc import evaluate_contexts

    torch.manual_seed(0)
    free = FastformerForCausalLM(FastformerConfig(vocab_size=V, hidden_size=16, n_heads=2, num_hidden_layers=1,
                                                  n_positions=16, position_embedding_type="none",
                                                  hidden_dropout_prob=0.0)).eval()
    stream = tokens(300)
    rows = evaluate_contexts(free, stream, 300, [16, 64, 256], stride_fraction=0.5, bos_token_id=1)
    assert [r.context for r in rows] == [16, 64, 256] and all(r.result is not None for r in rows)
    for r in rows:
        assert r.result is not None
        assert r.result.bpc == pytest.approx(evaluate_bpc(free, stream, 300, r.context, stride=r.context // 2,
                                                          bos_token_id=1).bpc)
    capped = evaluate_contexts(tiny_gpt2(torch.float32), stream, 300, [16, 64, 128], bos_token_id=1)
    assert [r.result is None for r in capped] == [False, False, True] and "n_positions=64" in capped[2].note
    with pytest.raises(ValueError, match="stride_fraction"):
        evaluate_contexts(free, stream, 300, [16], stride_fraction=0.0)
