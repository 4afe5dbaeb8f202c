"""Leviathan (causal cross-correlation): base, ensemble and mixture-of-experts models (registered, with the Auto
classes, in ``attnfree.models.registry``)."""

from __future__ import annotations

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
    "leviathan_config",
]
