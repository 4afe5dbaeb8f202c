"""Leviathan (causal cross-correlation): base, ensemble and mixture-of-experts models, registered with the Auto
classes, plus the builders the model registry calls."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from attnfree.models.leviathan.configuration_leviathan import (
    BLOCK_FLAVOURS,
    PRESETS,
    LeviathanConfig,
    LeviathanEnsembleConfig,
    LeviathanMoEConfig,
    leviathan_config,
)
from attnfree.models.leviathan.modeling_leviathan import (
    LeviathanCausalLMOutput,
    LeviathanComponentBase,
    LeviathanEnsembleForCausalLM,
    LeviathanEnsembleModel,
    LeviathanForCausalLM,
    LeviathanModel,
    LeviathanModelOutput,
    LeviathanMoEComponent,
    LeviathanMoEForCausalLM,
    LeviathanMoEModel,
    LeviathanPreTrainedModel,
)

for _config, _model, _lm in (
    (LeviathanConfig, LeviathanModel, LeviathanForCausalLM),
    (LeviathanEnsembleConfig, LeviathanEnsembleModel, LeviathanEnsembleForCausalLM),
    (LeviathanMoEConfig, LeviathanMoEModel, LeviathanMoEForCausalLM),
):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)
    AutoModelForCausalLM.register(_config, _lm, exist_ok=True)


def _config_from(config_class: type[LeviathanConfig], size: Any, ids: Any,
                 overrides: Mapping[str, Any] | None) -> LeviathanConfig:
    """``size`` (registry.ModelSize: hidden_size, n_heads, num_layers, n_positions, dropout) and the tokenizer's
    special ids, then ``overrides`` (any field of ``config_class``; unknown names are a ValueError)."""
    overrides = dict(overrides or {})
    known = {f.name for f in fields(config_class)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown {config_class.__name__} field(s) {', '.join(unknown)}")
    base = {"hidden_size": size.hidden_size, "n_heads": size.n_heads, "num_hidden_layers": size.num_layers,
            "n_positions": size.n_positions, "hidden_dropout_prob": size.dropout, "vocab_size": ids.vocab_size,
            "pad_token_id": ids.pad_token_id, "bos_token_id": ids.bos_token_id, "eos_token_id": ids.eos_token_id}
    return config_class(**{**base, **overrides})


def build_leviathan(size: Any, ids: Any, overrides: Mapping[str, Any] | None = None) -> LeviathanForCausalLM:
    """Leviathan at ``size`` (a registry ``ModelBuilder``)."""
    return LeviathanForCausalLM(_config_from(LeviathanConfig, size, ids, overrides))


def build_leviathan_ensemble(size: Any, ids: Any, overrides: Mapping[str, Any] | None = None
                             ) -> LeviathanEnsembleForCausalLM:
    """The ensemble; every member has ``size`` unless overridden (e.g. ``hidden_size`` for narrower members)."""
    config = _config_from(LeviathanEnsembleConfig, size, ids, overrides)
    return LeviathanEnsembleForCausalLM(config)  # type: ignore[arg-type]


def build_leviathan_moe(size: Any, ids: Any, overrides: Mapping[str, Any] | None = None) -> LeviathanMoEForCausalLM:
    """Leviathan with mixture-of-experts blocks at ``size``."""
    return LeviathanMoEForCausalLM(_config_from(LeviathanMoEConfig, size, ids, overrides))  # type: ignore[arg-type]


__all__ = [
    "BLOCK_FLAVOURS",
    "PRESETS",
    "LeviathanCausalLMOutput",
    "LeviathanComponentBase",
    "LeviathanConfig",
    "LeviathanEnsembleConfig",
    "LeviathanEnsembleForCausalLM",
    "LeviathanEnsembleModel",
    "LeviathanForCausalLM",
    "LeviathanModel",
    "LeviathanModelOutput",
    "LeviathanMoEComponent",
    "LeviathanMoEConfig",
    "LeviathanMoEForCausalLM",
    "LeviathanMoEModel",
    "LeviathanPreTrainedModel",
    "build_leviathan",
    "build_leviathan_ensemble",
    "build_leviathan_moe",
    "leviathan_config",
]
