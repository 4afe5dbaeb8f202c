"""Causal Fastformer: configuration, backbone and causal-LM head (registered in ``attnfree.models.registry``)."""

from attnfree.models.fastformer.configuration_fastformer import FastformerConfig, FastformerLMConfig
from attnfree.models.fastformer.modeling_fastformer import (
    FastformerForCausalLM,
    FastformerModel,
    FastformerPreTrainedModel,
)

__all__ = ["FastformerConfig", "FastformerForCausalLM", "FastformerLMConfig", "FastformerModel",
           "FastformerPreTrainedModel"]
