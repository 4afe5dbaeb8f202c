"""Leviathan (causal cross-correlation): base, ensemble and mixture-of-experts models (registered, with the Auto
classes, in ``attnfree.models.registry``)."""

from __future__ import annotations

from attnfree.models.leviathan.configuration_leviathan import (
    BLOCK_FLAVOURS,
    LeviathanConfig,
    LeviathanEnsembleConfig,
    LeviathanMoEConfig,
)
from attnfree.models.leviathan.ensemble import LeviathanEnsembleForCausalLM, LeviathanEnsembleModel
from attnfree.models.leviathan.modeling_leviathan import (
    LeviathanBlock,
    LeviathanCausalLMOutput,
    LeviathanForCausalLM,
    LeviathanModel,
    LeviathanModelOutput,
    LeviathanMoEBlock,
    LeviathanMoEForCausalLM,
    LeviathanMoEModel,
    LeviathanPreTrainedModel,
)

__all__ = [
    "BLOCK_FLAVOURS",
    "LeviathanBlock",
    "LeviathanCausalLMOutput",
    "LeviathanConfig",
    "LeviathanEnsembleConfig",
    "LeviathanEnsembleForCausalLM",
    "LeviathanEnsembleModel",
    "LeviathanForCausalLM",
    "LeviathanModel",
    "LeviathanModelOutput",
    "LeviathanMoEBlock",
    "LeviathanMoEConfig",
    "LeviathanMoEForCausalLM",
    "LeviathanMoEModel",
    "LeviathanPreTrainedModel",
]
