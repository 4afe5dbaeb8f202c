"""The one builder path: names, specs, overrides, sizes."""

from __future__ import annotations

import pytest
import torch

from attnfree import FastformerConfig, FastformerForCausalLM
from attnfree.data import ByteTokenizer
from attnfree.models.decode_state import decode_state_bytes
from attnfree.models.registry import (
    MODELS,
    ModelSize,
    build_model,
    count_parameters,
    parse_model_spec,
    register_model,
    split_model_list,
)

SIZE = ModelSize(hidden_size=64, n_heads=4, num_layers=4, n_positions=64)


def test_conv_variant_has_one_layer_fewer_and_matched_parameters():
    torch.manual_seed(0)
    plain, conv, gpt2 = (build_model(name, SIZE, ByteTokenizer()) for name in ("fastformer", "fastformer-conv", "gpt2"))
    assert plain.config.num_hidden_layers == 4 and conv.config.num_hidden_layers == 3 and conv.config.convolve
    counts = [count_parameters(m) for m in (plain, conv, gpt2)]
    assert max(counts) / min(counts) < 1.1, counts


def test_local_variant_replaces_the_convolution_at_matched_parameters_and_sizes_its_window():
    nano = ModelSize(hidden_size=128, n_heads=4, num_layers=4, n_positions=64)
    local, conv, gpt2 = (build_model(name, nano, ByteTokenizer()) for name in ("fastformer-local", "fastformer-conv",
                                                                               "gpt2"))
    assert local.config.num_hidden_layers == 3 and not local.config.convolve and local.config.local_window == 16
    assert list(local.model.layers[0].order) == ["local", "attention", "ffn"]
    assert count_parameters(local) == count_parameters(conv)  # 4 C^2 a layer each: the K = 4 taps or W_qkv, W_o
    assert abs(count_parameters(local) / count_parameters(gpt2) - 1) <= 0.05
    assert build_model("fastformer-local", ModelSize(32, 2, 2, 512), ByteTokenizer()).config.local_window == 128
    assert build_model("fastformer-local", ModelSize(32, 2, 2, 2), ByteTokenizer()).config.local_window == 1
    assert build_model("fastformer-local:local_window=8", nano, ByteTokenizer()).config.local_window == 8
    states = [decode_state_bytes(local, T) for T in (5, 16, 100)]  # w keys and values from the start: constant
    assert states[0] == states[1] == states[2], states


def test_spec_overrides_reach_the_config():
    assert parse_model_spec("fastformer:preset=seed,kernel_size=8") == (
        "fastformer", {"preset": "seed", "kernel_size": 8})
    model = build_model("fastformer-conv:kernel_size=8", SIZE, ByteTokenizer(), {"label_smoothing": 0})
    assert model.config.kernel_size == 8 and model.config.label_smoothing == 0.0
    gpt2 = build_model("gpt2:n_inner=128,activation_function=relu", SIZE, ByteTokenizer())
    assert gpt2.config.n_inner == 128 and gpt2.config.activation_function == "relu"
    design = build_model("fastformer:decay=none,bonus=true", SIZE, ByteTokenizer())
    assert design.config.decay == "none" and design.config.bonus is True  # the string choice, not None
    with pytest.raises(ValueError, match="unknown FastformerConfig field.*kernal"):
        build_model("fastformer:kernal=3", SIZE, ByteTokenizer())


def test_model_lists_keep_overrides_with_their_model():
    assert split_model_list("fastformer:preset=seed,kernel_size=8,gpt2") == [
        "fastformer:preset=seed,kernel_size=8", "gpt2"]


def test_register_model_is_one_line():
    register_model("tiny-fastformer", FastformerConfig, FastformerForCausalLM, defaults={"n_heads": 1})
    try:
        assert build_model("tiny-fastformer", SIZE, ByteTokenizer()).config.n_heads == 1
    finally:
        del MODELS["tiny-fastformer"]


