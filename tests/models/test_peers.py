"""The modern RNN peers, from transformers' own classes, sized like GPT-2 and run through the same pipeline."""

from __future__ import annotations

import warnings

import pytest
import torch

from attnfree.data import ByteTokenizer
from attnfree.models.registry import ModelSize, build_model, count_parameters
from attnfree.training import TrainSettings, train

TOK = ByteTokenizer()
PEERS = ["rwkv", "mamba"]


@pytest.mark.parametrize("name", PEERS)
def test_a_peer_is_within_5_percent_of_the_matched_gpt2(name: str) -> None:
    for size in (ModelSize(128, 4, 4, 64), ModelSize(256, 4, 4, 1024)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "no size within 5%" warning at the sizes we compare at
            peer = build_model(name, size, TOK)
        target = count_parameters(build_model("gpt2", size, TOK))
        assert abs(count_parameters(peer) - target) <= 0.05 * target, (name, size)
        assert peer.get_output_embeddings().weight is peer.get_input_embeddings().weight  # tied, like ours


@pytest.mark.parametrize("name", PEERS)
def test_a_peer_saves_loads_generates_and_trains(name: str, tmp_path, data_dir) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = build_model(name, ModelSize(32, 2, 2, 64), TOK).eval()
    model.save_pretrained(tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    ids = torch.tensor([TOK.encode("ROMEO:")])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert loaded.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False).shape == (1, 11)
    text = tmp_path / "t.txt"
    text.write_text((data_dir / "tinyshakespeare" / "input.txt").read_text()[:5_000])
    run = train(TrainSettings(model=name, data=str(text), hidden_size=32, n_heads=2, num_layers=2, block_size=32,
                              batch_size=4, max_steps=3, output_dir=str(tmp_path / "run"), progress=False))
    assert 0 < run.bpc < 10 and run.parameters == count_parameters(model)
