"""Leviathan language models: HuggingFace shells around ``layers.MultiHeadedCorrelation``.

Layout (pre-LayerNorm residual blocks):
    embeddings = Dropout(token + learned position)
    block:  h += Correlation(LN(h))           (causal cross-correlation over the lag set)
            h += FFN(LN(h))                   (block_flavour; a sparse mixture of experts in the MoE model)
    logits = LN(h) W_e^T                      (tied embeddings)

Three models share the blocks:
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
from transformers import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from attnfree.cache import RecurrentCache
from attnfree.layers.correlation import MemberInteraction, MultiHeadedCorrelation
from attnfree.layers.ffn import FeedForward
from attnfree.layers.moe import RoutingStats, SparseMoE
from attnfree.models.base import RecurrentPreTrainedModel
from attnfree.models.common import (
    RecurrentGenerationMixin,
    causal_lm_loss,
    check_forward_kwargs,
    check_input_ids,
    embed_inputs,
    padding_mask,
    position_ids_from_mask,
    resolve_cache,
)
from attnfree.models.compat import cache_kwargs, output_cache
from attnfree.models.leviathan.configuration_leviathan import (
    LeviathanConfig,
    LeviathanEnsembleConfig,
    LeviathanMoEConfig,
)

LayerCaches = list[dict[str, Any]]


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


def routing_report(stats: list[RoutingStats]) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The per-block routing stats as (aux_loss, tokens_per_expert, dropped_tokens); all None without experts."""
    if not stats:
        return None, None, None
    return (torch.stack([s.aux_loss for s in stats]).mean(), torch.stack([s.tokens_per_expert for s in stats]),
            torch.stack([s.dropped for s in stats]))


def as_tensor(x: Tensor | list[Tensor] | tuple[Tensor, ...] | None) -> Tensor | None:
    """A list of per-stream tensors [B, T] as one [S, B, T] tensor."""
    return torch.stack(list(x)) if isinstance(x, (list, tuple)) else x


# ----------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------


class LeviathanComponentBase(GradientCheckpointingLayer):
    """The base block: h += Correlation(LN(h)); h += FFN(LN(h)). h: [B, T, C] -> ([B, T, C], None)."""

    def __init__(self, config: LeviathanConfig):
        super().__init__()
        c = config
        self.correlation = MultiHeadedCorrelation(c.hidden_size, c.n_heads, c.lags, c.segment,
                                                  c.hidden_dropout_prob, c.layer_norm_eps)
        self.ffn = FeedForward(c.hidden_size, c.ffn_multiplier, c.ffn_activation, c.hidden_dropout_prob,
                               c.layer_norm_eps)

    def forward(self, h: Tensor, mask: Tensor | None = None, cache: dict[str, Any] | None = None
                ) -> tuple[Tensor, RoutingStats | None]:
        h = h + self.correlation(h, mask, cache)
        return h + self.ffn(h), None


class LeviathanMoEComponent(GradientCheckpointingLayer):
    """The MoE block: h += Correlation(LN(h)); h += MoE(LN(h)). h: [B, T, C] -> ([B, T, C], RoutingStats)."""

    def __init__(self, config: LeviathanMoEConfig):
        super().__init__()
        c = config
        self.correlation = MultiHeadedCorrelation(c.hidden_size, c.n_heads, c.lags, c.segment,
                                                  c.hidden_dropout_prob, c.layer_norm_eps)
        self.moe = SparseMoE(c.hidden_size, c.ffn_multiplier, c.ffn_activation, c.n_experts, c.router_top_k,
                             c.capacity_factor, c.noise, c.hidden_dropout_prob, c.layer_norm_eps)

    def forward(self, h: Tensor, mask: Tensor | None = None, cache: dict[str, Any] | None = None
                ) -> tuple[Tensor, RoutingStats | None]:
        h = h + self.correlation(h, mask, cache)
        y, stats = self.moe(h, mask)
        return h + y, stats


# ----------------------------------------------------------------------------------------------
# Backbones
# ----------------------------------------------------------------------------------------------


class LeviathanPreTrainedModel(RecurrentPreTrainedModel):
    config_class = LeviathanConfig
    config: LeviathanConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LeviathanComponentBase", "LeviathanMoEComponent"]

    def parameter_counts(self) -> dict[str, int]:
        """Parameters in total and active per token (tied weights once; an MoE token uses top_k experts)."""
        total = sum(p.numel() for p in self.parameters())
        idle = 0
        for module in self.modules():
            if isinstance(module, SparseMoE):
                per_expert = sum(p.numel() for p in module.experts[0].parameters())
                idle += (module.n_experts - module.top_k) * per_expert
        return {"total": total, "active": total - idle}


class LeviathanModel(LeviathanPreTrainedModel):
    """The backbone: embeddings, blocks and the final LayerNorm; returns hidden states [B, T, C]."""

    block_class: ClassVar[type[nn.Module]] = LeviathanComponentBase

    def __init__(self, config: LeviathanConfig):
        super().__init__(config)
        c = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.embed_positions = (nn.Embedding(c.n_positions, c.hidden_size)
                                if c.position_embedding_type == "learned" else None)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)
        self.layers = nn.ModuleList([self.block_class(c) for _ in range(c.num_hidden_layers)])
        self.final_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embed_tokens = value  # type: ignore[assignment]

    def embed(self, input_ids: Tensor | None, inputs_embeds: Tensor | None, position_ids: Tensor) -> Tensor:
        """Token (+ learned position) embeddings, dropout: [B, T] -> [B, T, C]."""
        return self.dropout(embed_inputs(self.embed_tokens, self.embed_positions, input_ids, inputs_embeds,
                                         position_ids))

    def run(self, input_ids: Tensor | None, inputs_embeds: Tensor | None, position_ids: Tensor,
            mask: Tensor | None, caches: LayerCaches | None, output_hidden_states: bool = False
            ) -> tuple[Tensor, list[Tensor], list[RoutingStats]]:
        """Embeddings, blocks (each reading and updating its own cache dict), final LN -> h [B, T, C],
        the hidden states before each block (if asked) and the blocks' routing stats."""
        h = self.embed(input_ids, inputs_embeds, position_ids)
        hidden_states: list[Tensor] = []
        stats: list[RoutingStats] = []
        for i, layer in enumerate(self.layers):
            if output_hidden_states:
                hidden_states.append(h)
            h, s = layer(h, mask, caches[i] if caches is not None else None)
            if s is not None:
                stats.append(s)
        h = self.final_norm(h)
        if output_hidden_states:
            hidden_states.append(h)
        return h, hidden_states, stats

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
    ) -> LeviathanModelOutput:
        # 1. shapes, mask, cache
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        ref = input_ids if input_ids is not None else inputs_embeds
        assert ref is not None
        B, T, device = ref.shape[0], ref.shape[1], ref.device
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

        # 2. embeddings, blocks, final LN
        h, hidden_states, stats = self.run(input_ids, inputs_embeds, position_ids, mask,
                                           cache.layers if cache is not None else None, bool(output_hidden_states))

        # 3. count the tokens the cache has now seen
        if cache is not None:
            cache.advance(attention_mask if attention_mask is not None else torch.ones(B, T, device=device))
        # the cache field is named as the installed transformers' generate() reads it (models.compat)
        aux_loss, tokens_per_expert, dropped = routing_report(stats)
        return LeviathanModelOutput(last_hidden_state=h, **cache_kwargs(cache),
                                    hidden_states=tuple(hidden_states) if output_hidden_states else None,
                                    aux_loss=aux_loss, tokens_per_expert=tokens_per_expert, dropped_tokens=dropped)


class LeviathanMoEModel(LeviathanModel):
    """The backbone with mixture-of-experts blocks; its output carries the routing report."""

    config_class = LeviathanMoEConfig
    block_class = LeviathanMoEComponent


class LeviathanEnsembleModel(LeviathanPreTrainedModel):
    """M member backbones mixed per position: returns [B, T, C] (or [S, B, T, C] with module_streams).

    Member i reads stream i // members_per_module. Its blocks' states live in cache layers i*L .. (i+1)*L-1;
    the cache counts tokens per (stream, row), batch S*B. ``output_hidden_states`` gives (the members after
    the interaction [M, B, T, C], the read-out).
    """

    config_class = LeviathanEnsembleConfig
    config: LeviathanEnsembleConfig

    def __init__(self, config: LeviathanEnsembleConfig):
        super().__init__(config)
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

    def streams(self, input_ids: Tensor | None, attention_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """input_ids and attention_mask as [S, B, T] (S = n_modules with module_streams, else 1)."""
        c = self.config
        if input_ids is None:
            raise ValueError("the ensemble takes input_ids (each member has its own embeddings)")
        want = 3 if c.module_streams else 2
        if input_ids.dim() != want or (c.module_streams and input_ids.shape[0] != c.n_modules):
            layout = f"[n_modules={c.n_modules}, B, T]" if c.module_streams else "[B, T]"
            raise ValueError(f"input_ids must be {layout} (module_streams={c.module_streams}), "
                             f"got shape {tuple(input_ids.shape)}")
        ids = input_ids if c.module_streams else input_ids.unsqueeze(0)
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask.reshape(ids.shape)
        check_input_ids(ids.flatten(0, 1), c.vocab_size)
        return ids, mask

    def forward(
        self,
        input_ids: Tensor | list[Tensor] | None = None,
        attention_mask: Tensor | list[Tensor] | None = None,
        position_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        cache: RecurrentCache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: RecurrentCache | None = None,
        **kwargs: Any,
    ) -> LeviathanModelOutput:
        c = self.config
        # 1. streams [S, B, T], mask, cache (one state per member block; batch S*B for the token counts)
        if inputs_embeds is not None:
            raise ValueError("the ensemble takes input_ids, not inputs_embeds (each member has its own embeddings)")
        ids, attn = self.streams(as_tensor(input_ids), as_tensor(attention_mask))
        S, B, T = ids.shape
        mask = padding_mask(attn)
        use_cache = use_cache if use_cache is not None else (c.use_cache and not self.training)
        check_forward_kwargs(self, kwargs)
        cache = resolve_cache(cache, past_key_values)
        if use_cache and cache is None:
            cache = RecurrentCache(c.n_members * c.num_hidden_layers, S * B, ids.device)
        cache = cache if use_cache else None
        if position_ids is None:
            flat_mask = mask.flatten(0, 1) if mask is not None else None
            position_ids = position_ids_from_mask(flat_mask, S * B, T, cache, ids.device)
        positions = position_ids.reshape(S, B, T)

        # 2. every member on its module's stream: [M, B, T, C]
        L, per_module = c.num_hidden_layers, c.members_per_module
        hs = []
        for i, member in enumerate(cast(list[LeviathanModel], list(self.members))):
            s = i // per_module if c.module_streams else 0
            caches = cache.layers[i * L : (i + 1) * L] if cache is not None else None
            hs.append(member.run(ids[s], None, positions[s], mask[s] if mask is not None else None, caches)[0])
        x = torch.stack(hs)

        # 3. mixing across members at each position, then the gated read-out(s): [R, B, T, C]
        x = x + self.interaction(x)
        g = torch.softmax(self.gate(self.gate_norm(x)), dim=0)  # [M, B, T, R]
        out = self.final_norm(torch.einsum("mbtr,mbtc->rbtc", g, x))
        h = out if c.module_streams else out[0]

        # 4. count the tokens the cache has now seen
        if cache is not None:
            cache.advance(attn.flatten(0, 1))
        return LeviathanModelOutput(last_hidden_state=h, **cache_kwargs(cache),
                                    hidden_states=(x, h) if output_hidden_states else None)


# ----------------------------------------------------------------------------------------------
# Causal-LM heads
# ----------------------------------------------------------------------------------------------


# our prepare_inputs_for_generation takes fewer arguments than GenerationMixin's, hence the ignore
class LeviathanForCausalLM(RecurrentGenerationMixin, LeviathanPreTrainedModel, GenerationMixin):  # type: ignore[misc]
    """Backbone + tied LM head; the loss shifts labels inside, like GPT-2."""

    backbone_class: ClassVar[type[LeviathanPreTrainedModel]] = LeviathanModel
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LeviathanConfig):
        super().__init__(config)
        self.model: LeviathanPreTrainedModel = self.backbone_class(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()  # type: ignore[return-value]

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def extra_loss(self, out: LeviathanModelOutput) -> Tensor | None:
        """A term added to the training loss (the MoE's load balancing); none here."""
        return None

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
    ) -> LeviathanCausalLMOutput:
        check_forward_kwargs(self, kwargs)
        out = self.model(input_ids, attention_mask, position_ids, inputs_embeds, resolve_cache(cache, past_key_values),
                         use_cache, output_hidden_states)
        h = out.last_hidden_state if not logits_to_keep else out.last_hidden_state[..., -logits_to_keep:, :]
        logits = self.lm_head(h)  # [B, T, V] (ensemble with module_streams: [S, B, T, V])
        loss = None
        if labels is not None:
            smoothing = self.config.label_smoothing if self.training else 0.0  # never at evaluation
            mask = as_tensor(attention_mask)
            flat = logits.reshape(-1, *logits.shape[-2:])  # streams flattened into the batch
            loss = causal_lm_loss(flat, as_tensor(labels).reshape(flat.shape[:2]),  # type: ignore[union-attr]
                                  mask.reshape(flat.shape[:2]) if mask is not None else None, smoothing,
                                  num_items_in_batch)
            extra = self.extra_loss(out) if self.training else None
            loss = loss + extra if extra is not None else loss
        return LeviathanCausalLMOutput(loss=loss, logits=logits, **cache_kwargs(output_cache(out)),
                                       hidden_states=out.hidden_states, aux_loss=out.aux_loss,
                                       tokens_per_expert=out.tokens_per_expert, dropped_tokens=out.dropped_tokens)


class LeviathanMoEForCausalLM(LeviathanForCausalLM):
    """Leviathan with mixture-of-experts blocks; training loss += aux_loss_coef * aux_loss."""

    config_class = LeviathanMoEConfig
    config: LeviathanMoEConfig
    backbone_class = LeviathanMoEModel

    def extra_loss(self, out: LeviathanModelOutput) -> Tensor | None:
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
