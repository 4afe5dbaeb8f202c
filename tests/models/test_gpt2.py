from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import GPT2Config

from attnfree.models.gpt2 import build_gpt2, gpt2_sizes
from attnfree.models.registry import count_parameters
from attnfree.testing import assert_close

SMALL: dict[str, Any] = dict(
    vocab_size=259, hidden_size=32, n_heads=4, num_layers=2, n_positions=64, dropout=0.0,
    pad_token_id=256, bos_token_id=257, eos_token_id=258,
)  # fmt: skip


def gpt2_baseline(vocab_size: int, hidden_size: int, n_heads: int, num_layers: int, n_positions: int, dropout: float,
                  pad_token_id: int, bos_token_id: int, eos_token_id: int, ffn_multiplier: float = 4):
    """The baseline at these sizes, feed-forward width ``round(ffn_multiplier * hidden_size)``."""
    sizes = gpt2_sizes(hidden_size, n_heads, num_layers, n_positions, dropout, vocab_size, pad_token_id,
                       bos_token_id, eos_token_id)
    return build_gpt2(GPT2Config(**sizes, n_inner=round(ffn_multiplier * hidden_size)))


def test_reference_size_has_a_sane_parameter_count() -> None:
    model = gpt2_baseline(vocab_size=32100, hidden_size=256, n_heads=4, num_layers=4, n_positions=1024,
                          dropout=0.1, pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
    embed = 32100 * 256 + 1024 * 256  # tokens + positions (the output layer is tied: counted once)
    block = 12 * 256 * 256 + 13 * 256  # attention 4C^2 + MLP 8C^2, their biases and two layer norms
    n = count_parameters(model)
    print(f"GPT-2 baseline C=256 H=4 L=4 V=32100 T=1024: {n:,} parameters")
    assert n == embed + 4 * block + 2 * 256 == 11_639_296
    assert model.lm_head.weight is model.transformer.wte.weight


def test_config_carries_every_argument() -> None:
    model = gpt2_baseline(**{**SMALL, "dropout": 0.25}, ffn_multiplier=3)
    c = model.config
    assert (c.vocab_size, c.n_embd, c.n_head, c.n_layer, c.n_positions, c.n_inner) == (259, 32, 4, 2, 64, 96)
    assert c.resid_pdrop == c.embd_pdrop == c.attn_pdrop == 0.25
    assert (c.pad_token_id, c.bos_token_id, c.eos_token_id) == (256, 257, 258)
    assert c.tie_word_embeddings and c._attn_implementation == "sdpa"
    assert model.get_submodule("transformer.h.0.mlp.c_fc").weight.shape == (32, 96)


@pytest.mark.parametrize(
    "change, match",
    [({"n_heads": 5}, "divisible"), ({"eos_token_id": 50256}, "eos_token_id=50256 is outside the vocabulary")],
    ids=["heads", "eos-out-of-range"],
)
def test_invalid_sizes_are_refused(change: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        gpt2_baseline(**{**SMALL, **change})


def test_count_parameters_trainable_only() -> None:
    model = gpt2_baseline(**SMALL)
    total = count_parameters(model)
    assert total == sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    model.transformer.wte.weight.requires_grad_(False)  # also freezes the tied output layer
    assert count_parameters(model) == total - 259 * 32
    assert count_parameters(model, trainable_only=False) == total


def left_padded_batch(pad: int) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 256, (n,), generator=g) for n in (11, 4, 7)]
    width = max(len(s) for s in seqs)
    ids = torch.stack([torch.cat([torch.full((width - len(s),), pad), s]) for s in seqs])  # [B, T]
    mask = (torch.arange(width) >= torch.tensor([width - len(s) for s in seqs])[:, None]).long()  # [B, T]
    return seqs, ids, mask


@torch.no_grad()
def test_left_padded_forward_matches_each_sequence_alone() -> None:
    """With explicit ``position_ids`` (counting from each sequence's first real token) a left-padded
    batch gives each sequence's own logits; without them, positions count the pads and logits move."""
    model = gpt2_baseline(**SMALL).eval()
    seqs, ids, mask = left_padded_batch(pad=256)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, T]
    batched = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits  # [B, T, V]
    unpositioned = model(input_ids=ids, attention_mask=mask).logits
    for row, seq in enumerate(seqs):
        alone = model(input_ids=seq[None]).logits[0]  # [T_row, V]
        assert_close(f"row {row}", batched[row, -len(seq) :], alone, rtol=1e-5)
        if len(seq) < ids.shape[1]:
            assert (unpositioned[row, -len(seq) :] - alone).abs().max() > 1e-2


@torch.no_grad()
def test_generate_on_left_padded_batch_matches_alone_when_given_the_mask() -> None:
    """FACTS.md reports greedy ``generate`` on a left-padded GPT-2 batch drifting by > 1.0. Here, with
    ``attention_mask`` passed, generate derives positions from it and matches each prompt alone; the
    drift appears when generate cannot tell pads apart (no mask and a pad id it does not know, or
    pad == eos, which it refuses to infer a mask from). So: always pass ``attention_mask``."""
    model = gpt2_baseline(**SMALL).eval()
    seqs, ids, mask = left_padded_batch(pad=256)
    kwargs = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    batched = model.generate(ids, attention_mask=mask, **kwargs)
    for row, seq in enumerate(seqs):
        alone = model.generate(seq[None], attention_mask=torch.ones(1, len(seq), dtype=torch.long), **kwargs)
        assert torch.equal(batched.sequences[row, ids.shape[1] :], alone.sequences[0, len(seq) :])
        for step, (b, a) in enumerate(zip(batched.logits, alone.logits)):
            assert_close(f"row {row} step {step}", b[row], a[0], rtol=1e-5)
