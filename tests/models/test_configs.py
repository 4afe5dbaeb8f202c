"""Config contracts: every mode string validated where it is set, with the field's name and the allowed values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import PreTrainedConfig

from attnfree import (
    FastformerConfig,
    FastformerForCausalLM,
    LeviathanConfig,
    LeviathanEnsembleConfig,
    LeviathanEnsembleForCausalLM,
    LeviathanForCausalLM,
    LeviathanMoEConfig,
    LeviathanMoEForCausalLM,
)
from attnfree.layers.additive_attention import FastformerAttention

MODELS = {FastformerConfig: FastformerForCausalLM, LeviathanConfig: LeviathanForCausalLM,
          LeviathanEnsembleConfig: LeviathanEnsembleForCausalLM, LeviathanMoEConfig: LeviathanMoEForCausalLM}
TINY = dict(vocab_size=40, hidden_size=8, n_heads=2, num_hidden_layers=1, n_positions=16)


def mode_fields(config_class: type) -> list[str]:
    """The config's own string fields (its modes), not those every transformers config has."""
    inherited = set(getattr(PreTrainedConfig, "__dataclass_fields__", {}))
    return [name for name, f in config_class.__dataclass_fields__.items()
            if isinstance(f.default, str) and name not in inherited]


CASES = [pytest.param(cls, name, id=f"{cls.__name__}.{name}") for cls in MODELS for name in mode_fields(cls)]


def test_the_mode_fields_are_found() -> None:
    assert set(mode_fields(FastformerConfig)) == {"position_embedding_type", "preset", "decay", "ffn_type",
                                                 "focus", "pool_windows"}
    assert set(mode_fields(LeviathanConfig)) == {"position_embedding_type", "block_flavour"}


@pytest.mark.parametrize("config_class, name", CASES)
def test_a_misspelt_mode_is_refused_at_construction(config_class, name: str) -> None:
    with pytest.raises(ValueError, match=rf"{config_class.__name__}\.{name} must be one of \(.+\), got 'misspelt'"):
        config_class(**{name: "misspelt"})


@pytest.mark.parametrize("config_class, name", CASES)
def test_a_misspelt_mode_assigned_later_is_refused_when_the_model_is_built(config_class, name: str) -> None:
    config = config_class(**TINY)
    setattr(config, name, "misspelt")
    with pytest.raises(ValueError, match=rf"\.{name} must be one of"):
        MODELS[config_class](config)


@pytest.mark.parametrize("config_class, name", CASES)
def test_a_misspelt_mode_in_config_json_is_refused(config_class, name: str, tmp_path: Path) -> None:
    config_class(**TINY).save_pretrained(tmp_path)
    values = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**values, name: "misspelt"}))
    with pytest.raises(ValueError, match=rf"\.{name} must be one of"):
        config_class.from_pretrained(tmp_path)


@pytest.mark.parametrize("model_class, config", [
    (LeviathanEnsembleForCausalLM, LeviathanConfig(**TINY)),
    (LeviathanForCausalLM, FastformerConfig(**TINY)),
    (FastformerForCausalLM, LeviathanConfig(**TINY)),
], ids=["ensemble<-leviathan", "leviathan<-fastformer", "fastformer<-leviathan"])
def test_a_model_given_the_wrong_config_class_names_the_one_it_needs(model_class, config) -> None:
    needed = model_class.config_class.__name__
    with pytest.raises(TypeError, match=rf"{model_class.__name__} needs a {needed}, got a {type(config).__name__}"):
        model_class(config)


@pytest.mark.parametrize("name, value", [("residual", "Raw"), ("decay", "learnd")])
def test_the_layer_checks_its_modes_too(name: str, value: str) -> None:
    kwargs = dict(hidden_size=8, n_heads=2, dropout=0.0, eps=1e-5, chunk=4, decay="none", residual="raw")
    with pytest.raises(ValueError, match=rf"{name} must be one of"):
        FastformerAttention(**{**kwargs, name: value})
