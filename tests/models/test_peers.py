"""The sub-quadratic peers, from transformers' own classes, sized like GPT-2 and run through the same pipeline."""

from __future__ import annotations

import warnings

import pytest
import torch

from attnfree.data import ByteTokenizer
from attnfree.evaluation.recall import MQARTask, RecallSettings, train_recall
from attnfree.models.decode_state import decode_state_bytes
from attnfree.models.peers import griffin_window, mambapy_available
from attnfree.models.registry import ModelSize, build_model, count_parameters
from attnfree.training import TrainSettings, train

TOK = ByteTokenizer()
PEERS = ["rwkv", "mamba", "mamba2", "griffin", "llama"]


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


@pytest.mark.parametrize("name", PEERS)
def test_a_peer_is_scored_on_recall_with_its_decode_state(name: str) -> None:
    settings = RecallSettings(MQARTask(seq_len=16, n_pairs=2, vocab_size=32), width=32, layers=2, heads=2,
                              train_examples=64, test_examples=16, steps=2, batch_size=8)
    result = train_recall(name, settings)
    assert 0 <= result.accuracy <= 1 and result.state_bytes > 0 and result.steps == 2


def test_each_peer_keeps_the_state_its_design_says() -> None:
    """Constant in the context length for the recurrences; Griffin's grows with the context up to its window (its
    local attention's keys and values), then stays; the attention baselines' KV caches grow without bound."""
    size = ModelSize(32, 2, 3, 64)
    states = {name: [decode_state_bytes(build_model(name, size, TOK), t) for t in (8, 40, 64)]
              for name in (*PEERS, "gpt2")}
    for name in ("rwkv", "mamba", "mamba2"):
        assert states[name][0] == states[name][1] == states[name][2] > 0, (name, states[name])
    window = griffin_window(64)  # 32: the state stops growing once the window is full
    assert states["griffin"][0] < states["griffin"][1] == states["griffin"][2], states["griffin"]
    kv_per_token = 2 * 1 * (32 // 2) * 4  # keys and values, one KV head of size D = 16, float32, one attention block
    assert states["griffin"][2] - states["griffin"][0] == kv_per_token * (window - 1 - 8)
    assert states["gpt2"][0] < states["gpt2"][1] < states["gpt2"][2]
    kv_per_token = 2 * 32 * 4 * 3  # keys and values of width C = 32 in each of the 3 layers, float32
    assert states["llama"][2] - states["llama"][0] == kv_per_token * (64 - 8) == states["gpt2"][2] - states["gpt2"][0]


def test_llama_is_a_rotary_transformer_of_the_shared_shape() -> None:
    """Rotary positions and no position table: the shared width, heads, layers and limit; only the MLP is sized."""
    config = build_model("llama", ModelSize(128, 4, 4, 512), TOK).config
    heads = (config.num_attention_heads, config.num_key_value_heads, config.head_dim)
    assert config.hidden_size == 128 and heads == (4, 4, 32)
    assert config.num_hidden_layers == 4 and config.max_position_embeddings == 512
    assert config.rope_parameters["rope_type"] == "default"
    model = build_model("llama", ModelSize(32, 2, 2, 64), TOK)
    assert not any("position" in name for name, _ in model.named_parameters())
    with pytest.raises(ValueError, match="divisible by n_heads"):
        build_model("llama", ModelSize(30, 4, 2, 64), TOK)


def test_griffin_keeps_its_structure_and_refuses_a_model_without_attention() -> None:
    config = build_model("griffin", ModelSize(128, 4, 4, 512), TOK).config
    assert config.block_types == ["recurrent", "recurrent", "attention"] and config.num_key_value_heads == 1
    assert config.attention_window_size == 256 and config.lru_width == 128
    assert build_model("griffin", ModelSize(32, 2, 2, 64), TOK).config.block_types == ["recurrent", "attention"]
    with pytest.raises(ValueError, match="griffin needs at least 2 layers"):
        build_model("griffin", ModelSize(32, 2, 1, 64), TOK)


def test_mamba_takes_mambapy_scan_when_it_is_installed() -> None:
    model = build_model("mamba", ModelSize(32, 2, 2, 64), TOK)
    assert model.config.use_mambapy == mambapy_available()
    if mambapy_available():  # the parallel scan gives the sequential loop's values and gradients
        torch.manual_seed(0)
        ids = torch.randint(0, 256, (2, 24))
        sequential = build_model("mamba:use_mambapy=false", ModelSize(32, 2, 2, 64), TOK)
        sequential.load_state_dict(model.state_dict())
        out_p, out_s = model(ids, labels=ids), sequential(ids, labels=ids)
        torch.testing.assert_close(out_p.logits, out_s.logits, rtol=1e-4, atol=1e-4)
        out_p.loss.backward()
        out_s.loss.backward()
        for (name, a), b in zip(model.named_parameters(), sequential.parameters(), strict=True):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-5, msg=name)
