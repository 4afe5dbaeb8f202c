"""Leviathan language models: the shared recurrent shell around ``layers.MultiHeadedCorrelation``.

Layout (pre-LayerNorm residual blocks):
    embeddings = Dropout(token + learned position)
    block:  h += Correlation(LN(h))           (causal cross-correlation over the lag set)
            h += FFN(LN(h))                   (block_flavour; a sparse mixture of experts in the MoE model)
    logits = LN(h) W_e^T                      (tied embeddings)

Three models share the block:
- ``LeviathanForCausalLM``: one backbone.
- ``LeviathanEnsembleForCausalLM``: M = n_modules x members_per_module backbones, mixed per position across
  members (``layers.MemberInteraction``), a softmax gate over members, one LM head.
- ``LeviathanMoEForCausalLM``: every FFN a noisy top-k mixture of experts; reports ``aux_loss``,
  ``tokens_per_expert`` and ``dropped_tokens`` and adds ``aux_loss_coef * aux_loss`` to the training loss.

Every model decodes with a ``RecurrentCache`` holding one ``CorrelationState`` per block (per member).
Shapes: B batch, T time, C width, V vocabulary, M members, S streams, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
from torch import Tensor, nn
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from attnfree.layers.correlation import MemberInteraction, MultiHeadedCorrelation
from attnfree.layers.ffn import ChannelMix, FeedForward, make_ffn
from attnfree.layers.moe import RoutingStats, SparseMoE
from attnfree.models.base import (
    BlockContext,
    Inputs,
    LayerState,
    RecurrentBlock,
    RecurrentForCausalLM,
    RecurrentModel,
    RecurrentPreTrainedModel,
    as_tensor,
)
from attnfree.models.cache import RecurrentCache
from attnfree.models.common import (
    check_input_ids,
    padding_mask,
)
from attnfree.models.leviathan.configuration_leviathan import (
    LeviathanConfig,
    LeviathanEnsembleConfig,
    LeviathanMoEConfig,
)


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


class LeviathanBlock(RecurrentBlock):
    """h += Correlation(LN(h)); h += FFN(LN(h)), the FFN a sparse mixture of experts under a ``LeviathanMoEConfig``
    (which reports its routing statistics through ``ctx.reports``). h: [B, T, C]."""

    def __init__(self, config: LeviathanConfig):
        super().__init__()
        c = config
        self.correlation = MultiHeadedCorrelation(c.hidden_size, c.n_heads, c.lags, c.segment,
                                                  c.hidden_dropout_prob, c.layer_norm_eps)
        self.gate = nn.Linear(c.hidden_size, c.hidden_size, bias=False) if c.output_gate else None
        self.ffn: nn.Module
        if isinstance(c, LeviathanMoEConfig):
            if c.ffn_activation == "channel_mix":
                raise ValueError("LeviathanMoEConfig.block_flavour 'channel_mix4' is not a mixture-of-experts expert")
            self.ffn = SparseMoE(c.hidden_size, c.ffn_multiplier, c.ffn_activation, c.n_experts, c.router_top_k,
                                 c.capacity_factor, c.noise, c.hidden_dropout_prob, c.layer_norm_eps)
        else:
            self.ffn = make_ffn(c.ffn_activation, c.hidden_size, c.ffn_multiplier, c.hidden_dropout_prob,
                                c.layer_norm_eps)

    def forward(self, h: Tensor, ctx: BlockContext, state: LayerState | None) -> tuple[Tensor, LayerState | None]:
        branch = self.correlation(h, ctx.mask, state)
        if self.gate is not None:  # only the mixer's contribution passes the gate
            branch = torch.sigmoid(self.gate(self.correlation.norm(h))) * branch
        h = h + branch
        if isinstance(self.ffn, SparseMoE):
            y, stats = self.ffn(h, ctx.mask)
            ctx.reports.append(stats)
            return h + y, state
        return h + self.ffn(h, ctx.mask, state), state

    def init_state(self, batch: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
                   ) -> LayerState:
        ffn = self.ffn.init_state(batch, device, dtype) if isinstance(self.ffn, (FeedForward, ChannelMix)) else {}
        return {**self.correlation.init_state(batch, device, dtype), **ffn}


class LeviathanPreTrainedModel(RecurrentPreTrainedModel):
    config_class = LeviathanConfig
    config: LeviathanConfig
    _no_split_modules = ["LeviathanBlock"]

    def parameter_counts(self) -> dict[str, int]:
        """Parameters in total and active per token (tied weights once; an MoE token uses top_k experts)."""
        total = sum(p.numel() for p in self.parameters())
        idle = 0
        for module in self.modules():
            if isinstance(module, SparseMoE):
                per_expert = sum(p.numel() for p in module.experts[0].parameters())
                idle += (module.n_experts - module.top_k) * per_expert
        return {"total": total, "active": total - idle}


class LeviathanModel(LeviathanPreTrainedModel, RecurrentModel):
    """The backbone: embeddings, blocks and the final LayerNorm; returns h [B, T, C] (and any routing report)."""

    block_class = LeviathanBlock
    output_class = LeviathanModelOutput

    def reports_to_outputs(self, reports: list[Any]) -> dict[str, Any]:
        return routing_report(reports)


class LeviathanMoEModel(LeviathanModel):
    """The backbone with mixture-of-experts blocks; its output carries the routing report. Expert capacity and the
    load-balancing loss are over the whole batch, so it never runs in pieces (``chunkable``)."""

    config_class = LeviathanMoEConfig
    chunkable = False


class LeviathanEnsembleModel(LeviathanPreTrainedModel, RecurrentModel):
    """M member backbones mixed per position: returns [B, T, C] (or [S, B, T, C] with module_streams).

    Member i reads stream i // members_per_module. Its blocks' states live in cache layers i*L .. (i+1)*L-1;
    the cache counts tokens per (stream, row), batch S*B. ``output_hidden_states`` gives (the members after
    the interaction [M, B, T, C], the read-out).
    """

    config_class = LeviathanEnsembleConfig
    config: LeviathanEnsembleConfig
    output_class = LeviathanModelOutput

    def __init__(self, config: LeviathanEnsembleConfig):
        RecurrentPreTrainedModel.__init__(self, config)  # members, not the single backbone's embeddings and blocks
        c = config
        self.members = nn.ModuleList([LeviathanModel(c) for _ in range(c.n_members)])
        self.interaction = MemberInteraction(c.hidden_size, c.interaction_heads, c.hidden_dropout_prob,
                                             c.layer_norm_eps)
        self.gate_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        # one softmax over members per read-out: one read-out, or one per module stream
        self.gate = nn.Linear(c.hidden_size, c.n_modules if c.module_streams else 1, bias=False)
        self.final_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.members[0].embed_tokens  # type: ignore[return-value]

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.members[0].embed_tokens = value

    def _member_layers(self) -> list[nn.Module]:
        return [layer for member in self.members for layer in cast(LeviathanModel, member).layers]

    def new_cache(self, batch: int, device: torch.device | None = None) -> RecurrentCache:
        """An unfilled cache: one state per block of every member; ``batch`` counts (stream, row) pairs."""
        return RecurrentCache(len(self._member_layers()), batch, device)

    def empty_cache(self, batch: int, device: torch.device | None = None,
                    dtype: torch.dtype = torch.float32) -> RecurrentCache:
        """Every member block's empty state (the shared [B, T] layout: one stream)."""
        if self.config.module_streams:
            raise ValueError("an ensemble with module_streams has one state per stream and row; its cache layout "
                             "is the shared [B, T] one only without module streams")
        cache = self.new_cache(batch, device)
        cache.layers = [layer.init_state(batch, device, dtype) for layer in self._member_layers()]  # type: ignore[operator]
        return cache

    def prepare(self, input_ids: Tensor | list[Tensor] | None, attention_mask: Tensor | list[Tensor] | None,
                position_ids: Tensor | None, inputs_embeds: Tensor | None, cache: RecurrentCache | None,
                use_cache: bool | None) -> Inputs:
        """The streams as [S, B, T] (S = n_modules with module_streams, else 1); the cache counts S*B rows."""
        c = self.config
        ids = as_tensor(input_ids)
        if ids is None or inputs_embeds is not None:
            raise ValueError("the ensemble takes input_ids, not inputs_embeds (each member has its own embeddings)")
        want = 3 if c.module_streams else 2
        if ids.dim() != want or (c.module_streams and ids.shape[0] != c.n_modules):
            layout = f"[n_modules={c.n_modules}, B, T]" if c.module_streams else "[B, T]"
            raise ValueError(f"input_ids must be {layout} (module_streams={c.module_streams}), "
                             f"got shape {tuple(ids.shape)}")
        ids = ids if c.module_streams else ids.unsqueeze(0)
        check_input_ids(ids.flatten(0, 1), c.vocab_size)
        mask = as_tensor(attention_mask)
        real = torch.ones_like(ids) if mask is None else mask.reshape(ids.shape)
        flat = RecurrentModel.prepare(self, ids.flatten(0, 1), real.flatten(0, 1),  # type: ignore[arg-type]
                                      position_ids, None, cache, use_cache)
        S, B, T = ids.shape
        return Inputs(ids, None, padding_mask(real), real.flatten(0, 1), flat.positions.reshape(S, B, T), flat.cache)

    def mix(self, inputs: Inputs, output_hidden_states: bool) -> tuple[Tensor, tuple[Tensor, ...] | None, list[Any]]:
        """Every member on its module's stream, then the mixing across members and the gated read-out(s)."""
        c, ids, cache = self.config, inputs.input_ids, inputs.cache
        assert ids is not None
        # 1. every member on its module's stream: [M, B, T, C]; member i's blocks hold cache layers i*L..(i+1)*L-1
        L, hs = c.num_hidden_layers, []
        for i, member in enumerate(cast(list[LeviathanModel], list(self.members))):
            s = i // c.members_per_module if c.module_streams else 0
            ctx = BlockContext(inputs.mask[s] if inputs.mask is not None else None, inputs.positions[s])
            states = cache.layers[i * L : (i + 1) * L] if cache is not None else None
            hs.append(member.run(ids[s], None, ctx, states)[0])
            if cache is not None and states is not None:
                cache.layers[i * L : (i + 1) * L] = states
        x = torch.stack(hs)
        # 2. mixing across members at each position, then the gated read-out(s): [R, B, T, C]
        x = x + self.interaction(x)
        g = torch.softmax(self.gate(self.gate_norm(x)), dim=0)  # [M, B, T, R]
        out = self.final_norm(torch.einsum("mbtr,mbtc->rbtc", g, x))
        h = out if c.module_streams else out[0]
        return h, (x, h) if output_hidden_states else None, []


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


class LeviathanEnsembleForCausalLM(LeviathanForCausalLM):
    """The ensemble with one LM head, tied to the first member's token embeddings.

    With ``module_streams`` pass input_ids, attention_mask and labels as [n_modules, B, T] (or lists of
    n_modules [B, T] tensors): logits are [n_modules, B, T, V], module m's read-out predicting stream m, and
    the loss is the token mean over all streams. ``generate()`` takes the shared [B, T] layout only.
    """

    config_class = LeviathanEnsembleConfig
    config: LeviathanEnsembleConfig
    backbone_class = LeviathanEnsembleModel
    _tied_weights_keys = {"lm_head.weight": "model.members.0.embed_tokens.weight"}
