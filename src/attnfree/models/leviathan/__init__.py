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
    LeviathanBlock,
    LeviathanCausalLMOutput,
    LeviathanEnsembleForCausalLM,
    LeviathanEnsembleModel,
    LeviathanForCausalLM,
    LeviathanModel,
    LeviathanModelOutput,
    LeviathanMoEForCausalLM,
    LeviathanMoEModel,
    LeviathanPreTrainedModel,
)

__all__ = [
    "BLOCK_FLAVOURS",
    "PRESETS",
    "LeviathanCausalLMOutput",
    "LeviathanBlock",
    "LeviathanConfig",
    "LeviathanEnsembleConfig",
    "LeviathanEnsembleForCausalLM",
    "LeviathanEnsembleModel",
    "LeviathanForCausalLM",
    "LeviathanModel",
    "LeviathanModelOutput",
    "LeviathanMoEConfig",
    "LeviathanMoEForCausalLM",
    "LeviathanMoEModel",
    "LeviathanPreTrainedModel",
    "leviathan_config",
]
