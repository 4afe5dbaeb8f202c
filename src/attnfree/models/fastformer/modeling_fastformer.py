"""Causal Fastformer language model: the shared recurrent shell around ``layers.FastformerAttention``.

Layout (Megatron-style pre-LayerNorm residual blocks, each sublayer adding its branch to h):
    embeddings = Dropout(LayerNorm(token (+ learned position)))
    layer:  h += Conv(LN(h))               (if config.convolve)
            h += LocalAttention(h)         (if config.local_window: softmax over the last w positions)
            h += FastformerAttention(h)    (two additive poolings)
            h += FFN(LN(h))
    logits = LN(h) W_e^T + b               (tied embeddings; times 1/sqrt(C) in the seed preset)
"""

from __future__ import annotations

from typing import Any, cast

from torch import Tensor

from attnfree.layers.additive_attention import FastformerAttention, LeapAttention
from attnfree.layers.conv import CausalConvolution
from attnfree.layers.ffn import make_ffn
from attnfree.layers.local_attention import LocalAttention
from attnfree.layers.sublayer import Sublayer
from attnfree.models.base import (
    RecurrentBlock,
    RecurrentConfig,
    RecurrentForCausalLM,
    RecurrentModel,
    RecurrentPreTrainedModel,
    SublayerBlock,
)
from attnfree.models.fastformer.configuration_fastformer import FastformerConfig


def make_attention(c: FastformerConfig, window: int | None) -> Sublayer:
    """The attention of a layer pooling over ``window``: LEAP's in the leap preset, the Fastformer's otherwise."""
    if c.preset == "leap":
        return LeapAttention(c.hidden_size, c.n_heads, c.hidden_dropout_prob, c.layer_norm_eps, c.pool_chunk_size,
                             window, c.focus, c.alignment, c.decay)
    return FastformerAttention(c.hidden_size, c.n_heads, c.hidden_dropout_prob, c.layer_norm_eps, c.pool_chunk_size,
                               c.decay, c.residual, c.bonus, c.token_shift, window)


def fastformer_sublayers(c: FastformerConfig, index: int = 0) -> list[tuple[str, Sublayer]]:
    """The sublayers of layer ``index``, in order: (convolution,) (local attention,) attention, feed-forward."""
    conv = [("conv", CausalConvolution(c.hidden_size, c.kernel_size, c.groups, c.hidden_dropout_prob,
                                       c.layer_norm_eps, c.initializer_range))] if c.convolve else []
    local = [("local", LocalAttention(c.hidden_size, c.n_heads, c.local_window, c.hidden_dropout_prob,
                                      c.layer_norm_eps, c.local_rotary))] if c.local_window else []
    attention = make_attention(c, c.layer_windows[index])
    ffn = make_ffn(c.ffn_type, c.hidden_size, c.ffn_multiplier, c.hidden_dropout_prob, c.layer_norm_eps)
    return [*conv, *local, ("attention", attention), ("ffn", ffn)]


class FastformerLayer(SublayerBlock):
    def __init__(self, config: FastformerConfig, index: int = 0):
        super().__init__(fastformer_sublayers(config, index))


class FastformerPreTrainedModel(RecurrentPreTrainedModel):
    config_class = FastformerConfig
    config: FastformerConfig
    _no_split_modules = ["FastformerLayer"]


class FastformerModel(FastformerPreTrainedModel, RecurrentModel):
    """The backbone: embeddings (with a LayerNorm), layers and the final LayerNorm; returns h [B, T, C]."""

    block_class = FastformerLayer
    embedding_norm = True

    def make_block(self, config: RecurrentConfig, index: int) -> RecurrentBlock:
        """Layer ``index`` with its own pooling window."""
        return FastformerLayer(cast(FastformerConfig, config), index)


class FastformerForCausalLM(FastformerPreTrainedModel, RecurrentForCausalLM):  # type: ignore[misc]
    """Backbone + tied LM head with a bias (scaled by 1/sqrt(C) in the seed preset)."""

    backbone_class = FastformerModel
    head_bias = True

    def __init__(self, config: FastformerConfig, *args: Any, **kwargs: Any):
        super().__init__(config, *args, **kwargs)
        self.logit_scale = config.logit_scale

    def compute_logits(self, h: Tensor) -> Tensor:
        if self.logit_scale == 1.0:
            return super().compute_logits(h)
        # (h W^T + b) s as (s h) W^T + b + (s - 1) b: the scale touches [B, T, C], not the V/C times larger logits,
        # and a decoding step still reads the head's transposed copy (``compute_logits``)
        return super().compute_logits(h * self.logit_scale) + (self.logit_scale - 1.0) * self.lm_head.bias
