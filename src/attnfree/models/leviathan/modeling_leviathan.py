"""Leviathan language models: the shared recurrent shell around ``layers.MultiHeadedCorrelation``.

Layout (pre-LayerNorm residual blocks):
    embeddings = Dropout(token + learned position)
    block:  h += Correlation(LN(h))           (causal cross-correlation over the lag set)
            h += FFN(LN(h))                   (block_flavour; a sparse mixture of experts in the MoE model)
    logits = LN(h) W_e^T                      (tied embeddings)

Two models here, a third built of the first (``ensemble.py``):
- ``LeviathanForCausalLM``: one backbone.
- ``LeviathanMoEForCausalLM``: every FFN a noisy top-k mixture of experts; reports ``aux_loss``,
  ``tokens_per_expert`` and ``dropped_tokens`` and adds ``aux_loss_coef * aux_loss`` to the training loss.

Every model decodes with a ``RecurrentCache`` holding each block's correlation ring buffers.
Shapes: B batch, T time, C width, V vocabulary, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from attnfree.layers.correlation import MultiHeadedCorrelation
from attnfree.layers.ffn import make_ffn
from attnfree.layers.moe import RoutingStats, SparseMoE
from attnfree.layers.sublayer import Sublayer
from attnfree.models.base import (
    RecurrentBlock,
    RecurrentForCausalLM,
    RecurrentModel,
    RecurrentPreTrainedModel,
    SublayerBlock,
)
from attnfree.models.leviathan.configuration_leviathan import LeviathanConfig, LeviathanMoEConfig


@dataclass
class LeviathanModelOutput(BaseModelOutputWithPast):
    """BaseModelOutputWithPast plus the MoE routing report (None for models without experts).

    aux_loss: scalar, mean over blocks of the Switch load-balancing loss (1.0 = balanced).
    tokens_per_expert: [num_layers, E] long, assignments each expert processed.
    dropped_tokens: [num_layers] long, assignments dropped by the capacity limit (training only).
    """

    aux_loss: Tensor | None = None
    tokens_per_expert: Tensor | None = None
    dropped_tokens: Tensor | None = None


@dataclass
class LeviathanCausalLMOutput(CausalLMOutputWithPast):
    """CausalLMOutputWithPast plus the MoE routing report (see ``LeviathanModelOutput``)."""

    aux_loss: Tensor | None = None
    tokens_per_expert: Tensor | None = None
    dropped_tokens: Tensor | None = None


def routing_report(stats: list[RoutingStats]) -> dict[str, Tensor]:
    """The blocks' routing stats as output fields (aux_loss, tokens_per_expert, dropped_tokens); empty without."""
    if not stats:
        return {}
    return {"aux_loss": torch.stack([s.aux_loss for s in stats]).mean(),
            "tokens_per_expert": torch.stack([s.tokens_per_expert for s in stats]),
            "dropped_tokens": torch.stack([s.dropped for s in stats])}


def leviathan_sublayers(c: LeviathanConfig, ffn: Sublayer) -> list[tuple[str, Sublayer]]:
    """The sublayers of one block: the correlation, then ``ffn``."""
    correlation = MultiHeadedCorrelation(c.hidden_size, c.n_heads, c.lag_set, c.hidden_dropout_prob, c.layer_norm_eps)
    return [("correlation", correlation), ("ffn", ffn)]


class LeviathanBlock(SublayerBlock):
    """h += Correlation(LN(h)); h += FFN(LN(h)). h: [B, T, C]."""

    def __init__(self, config: LeviathanConfig):
        c = config
        ffn = make_ffn(c.ffn_activation, c.hidden_size, c.ffn_multiplier, c.hidden_dropout_prob, c.layer_norm_eps)
        super().__init__(leviathan_sublayers(c, ffn))


class LeviathanMoEBlock(SublayerBlock):
    """h += Correlation(LN(h)); h += SparseMoE(h): its routing statistics go to ``ctx.reports``."""

    def __init__(self, config: LeviathanMoEConfig):
        c = config
        moe = SparseMoE(c.hidden_size, c.ffn_multiplier, c.ffn_activation, c.n_experts, c.router_top_k,
                        c.capacity_factor, c.noise, c.hidden_dropout_prob, c.layer_norm_eps)
        super().__init__(leviathan_sublayers(c, moe))


class LeviathanPreTrainedModel(RecurrentPreTrainedModel):
    config_class = LeviathanConfig
    config: LeviathanConfig
    _no_split_modules = ["LeviathanBlock", "LeviathanMoEBlock"]


class LeviathanModel(LeviathanPreTrainedModel, RecurrentModel):
    """The backbone: embeddings, blocks and the final LayerNorm; returns h [B, T, C] (and any routing report)."""

    block_class: ClassVar[type[RecurrentBlock]] = LeviathanBlock
    output_class = LeviathanModelOutput

    def reports_to_outputs(self, reports: list[Any]) -> dict[str, Any]:
        return routing_report(reports)


class LeviathanMoEModel(LeviathanModel):
    """The backbone with mixture-of-experts blocks; its output carries the routing report. Expert capacity and the
    load-balancing loss are over the whole batch, so it never runs in pieces (``chunkable``)."""

    config_class = LeviathanMoEConfig
    block_class = LeviathanMoEBlock
    chunkable = False


class LeviathanForCausalLM(LeviathanPreTrainedModel, RecurrentForCausalLM):  # type: ignore[misc]
    """Backbone + tied LM head; the loss shifts labels inside, like GPT-2."""

    backbone_class: ClassVar[type[RecurrentPreTrainedModel]] = LeviathanModel
    output_class = LeviathanCausalLMOutput


class LeviathanMoEForCausalLM(LeviathanForCausalLM):
    """Leviathan with mixture-of-experts blocks; training loss += aux_loss_coef * aux_loss."""

    config_class = LeviathanMoEConfig
    config: LeviathanMoEConfig
    backbone_class = LeviathanMoEModel

    def extra_loss(self, out: Any) -> Tensor | None:
        return self.config.aux_loss_coef * out.aux_loss if out.aux_loss is not None else None
