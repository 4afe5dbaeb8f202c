"""Causal Fastformer language model: the shared recurrent shell around ``layers.FastformerAttention``.

Layout (Megatron-style pre-LayerNorm residual blocks):
    embeddings = Dropout(LayerNorm(token + learned position))
    layer:  h += Conv(LN(h))            (if config.convolve)
            h  = FastformerAttention(h) (two additive poolings, residuals inside)
            h += FFN(LN(h))
    logits = LN(h) W_e^T + b            (tied embeddings; divided by sqrt(C) with scale_logits, as the design did)
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import initialization as init

from attnfree.layers.additive_attention import FastformerAttention, alibi_log_slopes
from attnfree.layers.conv import CausalConvolution
from attnfree.layers.ffn import make_ffn
from attnfree.models.base import (
    BlockContext,
    LayerState,
    RecurrentBlock,
    RecurrentForCausalLM,
    RecurrentModel,
    RecurrentPreTrainedModel,
)
from attnfree.models.fastformer.configuration_fastformer import FastformerConfig


class FastformerLayer(RecurrentBlock):
    def __init__(self, config: FastformerConfig):
        super().__init__()
        c = config
        self.conv = (CausalConvolution(c.hidden_size, c.kernel_size, c.groups, c.hidden_dropout_prob, c.layer_norm_eps)
                     if c.convolve else None)
        self.attention = FastformerAttention(c.hidden_size, c.n_heads, c.hidden_dropout_prob, c.layer_norm_eps,
                                             c.residual, c.pool_chunk_size, c.decay, c.mixer_options)
        self.ffn = make_ffn(c.ffn_type, c.hidden_size, c.ffn_multiplier, c.hidden_dropout_prob, c.layer_norm_eps)

    def forward(self, h: Tensor, ctx: BlockContext, state: LayerState | None) -> tuple[Tensor, LayerState | None]:
        if self.conv is not None:
            h = h + self.conv(h, ctx.mask, state)
        h = self.attention(h, ctx.positions, ctx.mask, state)
        return h + self.ffn(h, ctx.mask, state), state

    def init_state(self, batch: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
                   ) -> LayerState:
        conv = self.conv.init_state(batch, device, dtype) if self.conv is not None else {}
        return {**conv, **self.attention.init_state(batch, device, dtype), **self.ffn.init_state(batch, device, dtype)}


class FastformerPreTrainedModel(RecurrentPreTrainedModel):
    config_class = FastformerConfig
    config: FastformerConfig
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
                init.copy_(module.log_slopes, alibi_log_slopes(module.log_slopes.shape[1]).repeat(2, 1))
            if module.options.bonus:
                init.zeros_(module.bonus)
            if module.options.token_shift:
                init.constant_(module.time_mix, 0.5)


class FastformerModel(FastformerPreTrainedModel, RecurrentModel):
    """The backbone: embeddings (with a LayerNorm), layers and the final LayerNorm; returns h [B, T, C]."""

    block_class = FastformerLayer
    embedding_norm = True


class FastformerForCausalLM(FastformerPreTrainedModel, RecurrentForCausalLM):  # type: ignore[misc]
    """Backbone + tied LM head with a bias (scaled by 1/sqrt(C) with ``scale_logits``)."""

    backbone_class = FastformerModel
    head_bias = True

    def __init__(self, config: FastformerConfig, *args: Any, **kwargs: Any):
        super().__init__(config, *args, **kwargs)
        self.logit_scale = 1.0 / math.sqrt(config.hidden_size) if config.scale_logits else 1.0

    def compute_logits(self, h: Tensor) -> Tensor:
        if self.logit_scale == 1.0:
            return super().compute_logits(h)
        # (h W^T + b) s as (s h) W^T + s b: the scale touches [B, T, C], not the V/C times larger logits
        return F.linear(h * self.logit_scale, self.lm_head.weight, self.lm_head.bias * self.logit_scale)
