"""Causal Fastformer language model: HuggingFace shell around ``layers.FastformerAttention``.

Layout (Megatron-style pre-LayerNorm residual blocks):
    embeddings = Dropout(LayerNorm(token + learned position))
    layer:  h += Conv(LN(h))            (if config.convolve)
            h  = FastformerAttention(h) (two additive poolings, residuals inside)
            h += FFN(LN(h))
    logits = (LN(h) W_e^T + b) / sqrt(C)    (tied embeddings, the design's logit scaling)
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from attnfree.cache import RecurrentCache
from attnfree.layers.additive_attention import FastformerAttention, alibi_log_slopes
from attnfree.layers.conv import CausalConvolution
from attnfree.layers.ffn import FeedForward
from attnfree.models.base import RecurrentPreTrainedModel
from attnfree.models.common import (
    RecurrentGenerationMixin,
    causal_lm_loss,
    check_forward_kwargs,
    embed_inputs,
    padding_mask,
    position_ids_from_mask,
    resolve_cache,
)
from attnfree.models.compat import cache_kwargs, output_cache
from attnfree.models.fastformer.configuration_fastformer import FastformerConfig


class FastformerLayer(GradientCheckpointingLayer):
    def __init__(self, config: FastformerConfig):
        super().__init__()
        c = config
        self.conv = (CausalConvolution(c.hidden_size, c.kernel_size, c.groups, c.hidden_dropout_prob, c.layer_norm_eps)
                     if c.convolve else None)
        self.attention = FastformerAttention(c.hidden_size, c.n_heads, c.hidden_dropout_prob, c.layer_norm_eps,
                                             c.residual, c.pool_chunk_size, c.decay)
        self.ffn = FeedForward(c.hidden_size, c.ffn_multiplier, "gelu", c.hidden_dropout_prob, c.layer_norm_eps)

    def forward(self, h: Tensor, positions: Tensor, mask: Tensor | None = None,
                cache: dict[str, Any] | None = None) -> Tensor:
        if self.conv is not None:
            h = h + self.conv(h, mask, cache)
        h = self.attention(h, positions, mask, cache)
        return h + self.ffn(h)


class FastformerPreTrainedModel(RecurrentPreTrainedModel):
    config_class = FastformerConfig
    config: FastformerConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["FastformerLayer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The shell's initialisation, plus: N(0, initializer_range) convolution weights, zero score vectors
        (uniform pooling at the start, as in the design), ALiBi slopes for a learned decay."""
        super()._init_weights(module)
        if isinstance(module, CausalConvolution):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, FastformerAttention):
            init.zeros_(module.query_score)
            init.zeros_(module.key_score)
            if module.decay == "learned":
                init.copy_(module.log_slopes, alibi_log_slopes(module.n_heads).repeat(2, 1))


class FastformerModel(FastformerPreTrainedModel):
    """The backbone: embeddings, layers and the final LayerNorm; returns hidden states [B, T, C]."""

    def __init__(self, config: FastformerConfig):
        super().__init__(config)
        c = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.embed_positions = (nn.Embedding(c.n_positions, c.hidden_size)
                                if c.position_embedding_type == "learned" else None)
        self.embed_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)
        self.layers = nn.ModuleList([FastformerLayer(c) for _ in range(c.num_hidden_layers)])
        self.final_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embed_tokens = value  # type: ignore[assignment]

    def embed(self, input_ids: Tensor | None, inputs_embeds: Tensor | None, position_ids: Tensor) -> Tensor:
        """Token (+ learned position) embeddings, LayerNorm, dropout: [B, T] -> [B, T, C]."""
        return self.dropout(self.embed_norm(embed_inputs(self.embed_tokens, self.embed_positions, input_ids,
                                                         inputs_embeds, position_ids)))

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        cache: RecurrentCache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: RecurrentCache | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        # 1. shapes, mask, cache
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        B, T = input_ids.shape[:2] if input_ids is not None else inputs_embeds.shape[:2]  # type: ignore[union-attr]
        device = input_ids.device if input_ids is not None else inputs_embeds.device  # type: ignore[union-attr]
        if T == 0:
            raise ValueError("empty input: the sequence has no tokens")
        mask = padding_mask(attention_mask)
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        check_forward_kwargs(self, kwargs)
        cache = resolve_cache(cache, past_key_values)
        if use_cache and cache is None:
            cache = RecurrentCache(self.config.num_hidden_layers, B, device)
        cache = cache if use_cache else None
        if position_ids is None:
            position_ids = position_ids_from_mask(mask, B, T, cache, device)

        # 2. embeddings, then the layers (each reads and updates its own recurrent state)
        h = self.embed(input_ids, inputs_embeds, position_ids)
        hidden_states: list[Tensor] = []
        for i, layer in enumerate(self.layers):
            if output_hidden_states:
                hidden_states.append(h)
            h = layer(h, position_ids, mask, cache.layers[i] if cache is not None else None)
        h = self.final_norm(h)
        if output_hidden_states:
            hidden_states.append(h)

        # 3. count the tokens the cache has now seen
        if cache is not None:
            cache.advance(attention_mask if attention_mask is not None else torch.ones(B, T, device=device))
        # the cache field is named as the installed transformers' generate() reads it (models.compat)
        return BaseModelOutputWithPast(last_hidden_state=h, **cache_kwargs(cache),
                                       hidden_states=tuple(hidden_states) if output_hidden_states else None)


# our prepare_inputs_for_generation takes fewer arguments than GenerationMixin's, hence the ignore
class FastformerForCausalLM(RecurrentGenerationMixin, FastformerPreTrainedModel, GenerationMixin):  # type: ignore[misc]
    """Backbone + tied LM head (with bias) scaled by 1/sqrt(C); loss shifts labels inside, like GPT-2."""

    backbone_class = FastformerModel
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: FastformerConfig):
        super().__init__(config)
        self.model = FastformerModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        self.logit_scale = 1.0 / math.sqrt(config.hidden_size) if config.scale_logits else 1.0
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value  # type: ignore[assignment]

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        cache: RecurrentCache | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        num_items_in_batch: Tensor | int | None = None,
        past_key_values: RecurrentCache | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        check_forward_kwargs(self, kwargs)
        out = self.model(input_ids, attention_mask, position_ids, inputs_embeds, resolve_cache(cache, past_key_values),
                         use_cache, output_hidden_states)
        h = out.last_hidden_state if not logits_to_keep else out.last_hidden_state[:, -logits_to_keep:]
        # (h W^T + b) s as (s h) W^T + s b: the scale touches [B, T, C], not the V/C times larger logits
        logits = self.lm_head(h) if self.logit_scale == 1.0 else F.linear(
            h * self.logit_scale, self.lm_head.weight, self.lm_head.bias * self.logit_scale)  # [B, T, V]
        loss = None
        if labels is not None:
            smoothing = self.config.label_smoothing if self.training else 0.0  # never at evaluation
            loss = causal_lm_loss(logits, labels, attention_mask, smoothing, num_items_in_batch)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **cache_kwargs(output_cache(out)),
                                      hidden_states=out.hidden_states)
