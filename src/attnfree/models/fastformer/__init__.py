"""Causal Fastformer: configuration, backbone and causal-LM head, registered with the Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from attnfree.models.fastformer.configuration_fastformer import FastformerConfig, FastformerLMConfig
from attnfree.models.fastformer.modeling_fastformer import (
    FastformerForCausalLM,
    FastformerModel,
    FastformerPreTrainedModel,
)

AutoConfig.register(FastformerConfig.model_type, FastformerConfig, exist_ok=True)
AutoModel.register(FastformerConfig, FastformerModel, exist_ok=True)
AutoModelForCausalLM.register(FastformerConfig, FastformerForCausalLM, exist_ok=True)

__all__ = ["FastformerConfig", "FastformerForCausalLM", "FastformerLMConfig", "FastformerModel",
           "FastformerPreTrainedModel"]
