"""The Leviathan ensemble: M jointly trained Leviathan backbones mixed per position, one LM head.

M = n_modules x members_per_module members. Per position, a multi-headed softmax mixing across the members
(``MemberInteraction``), then a learned softmax gate over members gives the read-out (one, or one per module
stream). With ``module_streams`` each module reads its own stream: inputs, masks and labels are [S, B, T] (S =
n_modules), logits [S, B, T, V]; this model owns that layout, nothing in the shared shell knows it.

Member i reads stream i // members_per_module; its blocks' states live in cache layers i*L .. (i+1)*L-1, and the
cache counts tokens per (stream, row): batch S*B. Shapes: B batch, T time, C width, V vocabulary, M members,
S streams, R read-outs.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import Tensor, nn

from attnfree.layers.sublayer import BlockContext
from attnfree.layers.validation import check_heads
from attnfree.models.base import Inputs, prepare_inputs
from attnfree.models.cache import RecurrentCache
from attnfree.models.common import check_forward_kwargs, check_input_ids, padding_mask, resolve_cache
from attnfree.models.compat import cache_kwargs
from attnfree.models.leviathan.configuration_leviathan import LeviathanEnsembleConfig
from attnfree.models.leviathan.modeling_leviathan import (
    LeviathanForCausalLM,
    LeviathanModel,
    LeviathanModelOutput,
    LeviathanPreTrainedModel,
)


def as_streams(x: Tensor | list[Tensor] | tuple[Tensor, ...] | None) -> Tensor | None:
    """Per-stream tensors given as a list of [B, T] (or already [S, B, T]) as one [S, B, T] tensor."""
    return torch.stack(list(x)) if isinstance(x, (list, tuple)) else x


class MemberInteraction(nn.Module):
    """Pre-LN multi-headed softmax mixing across members at each position. x: [M, B, T, C] -> [M, B, T, C].

    Per position (b, t) and head: s[m, m'] = <q_m, k_m'> / sqrt(D), a = softmax over m', o_m = sum a v_m'.
    The residual is added by the caller. Members are a set here (no order, no mask): each row of the
    softmax has all M entries; per position, so causal in time trivially.
    """

    def __init__(self, hidden_size: int, n_heads: int, dropout: float, eps: float):
        super().__init__()
        check_heads(hidden_size, n_heads)
        self.n_heads = n_heads
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.out = nn.Linear(hidden_size, hidden_size, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        M, B, T, C = x.shape
        qkv = self.qkv(self.norm(x)).view(M, B, T, 3, self.n_heads, C // self.n_heads)
        q, k, v = qkv.permute(3, 1, 2, 4, 0, 5).unbind(0)  # [B, T, H, M, D]
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # [B, T, H, M, M]
        o = torch.matmul(torch.softmax(scores, dim=-1), v)  # [B, T, H, M, D]
        return self.dropout(self.out(o.permute(3, 0, 1, 2, 4).reshape(M, B, T, C)))


class LeviathanEnsembleModel(LeviathanPreTrainedModel):
    """M member backbones mixed per position: returns [B, T, C] (or [S, B, T, C] with module_streams).
    ``output_hidden_states`` gives (the members after the interaction [M, B, T, C], the read-out)."""

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

    def _members(self) -> list[LeviathanModel]:
        return cast(list[LeviathanModel], list(self.members))

    def _member_layers(self) -> list[nn.Module]:
        return [layer for member in self._members() for layer in member.layers]

    # -- the cache ------------------------------------------------------------------------------------------

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

    # -- forward --------------------------------------------------------------------------------------------

    def prepare(self, input_ids: Tensor | list[Tensor] | None, attention_mask: Tensor | list[Tensor] | None,
                position_ids: Tensor | None, cache: RecurrentCache | None, use_cache: bool | None) -> Inputs:
        """The streams as [S, B, T] (S = n_modules with module_streams, else 1); the cache counts S*B rows."""
        c = self.config
        ids = as_streams(input_ids)
        if ids is None:
            raise ValueError("the ensemble takes input_ids, not inputs_embeds (each member has its own embeddings)")
        want = 3 if c.module_streams else 2
        if ids.dim() != want or (c.module_streams and ids.shape[0] != c.n_modules):
            layout = f"[n_modules={c.n_modules}, B, T]" if c.module_streams else "[B, T]"
            raise ValueError(f"input_ids must be {layout} (module_streams={c.module_streams}), "
                             f"got shape {tuple(ids.shape)}")
        ids = ids if c.module_streams else ids.unsqueeze(0)
        check_input_ids(ids.flatten(0, 1), c.vocab_size)
        mask = as_streams(attention_mask)
        real = torch.ones_like(ids) if mask is None else mask.reshape(ids.shape)
        flat = prepare_inputs(self, ids.flatten(0, 1), real.flatten(0, 1), position_ids, None, cache, use_cache)
        S, B, T = ids.shape
        return Inputs(ids, None, padding_mask(real), real.flatten(0, 1), flat.positions.reshape(S, B, T), flat.cache)

    def mix(self, inputs: Inputs) -> tuple[Tensor, Tensor]:
        """Every member on its module's stream, then the mixing across members and the gated read-out(s):
        (h [R, B, T, C], the members [M, B, T, C])."""
        c, ids, cache = self.config, inputs.input_ids, inputs.cache
        assert ids is not None
        # 1. every member on its module's stream: [M, B, T, C]; member i's blocks hold cache layers i*L..(i+1)*L-1
        L, hs = c.num_hidden_layers, []
        for i, member in enumerate(self._members()):
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
        return self.final_norm(torch.einsum("mbtr,mbtc->rbtc", g, x)), x

    def forward(self, input_ids: Tensor | list[Tensor] | None = None,
                attention_mask: Tensor | list[Tensor] | None = None, position_ids: Tensor | None = None,
                inputs_embeds: Tensor | None = None, cache: RecurrentCache | None = None,
                use_cache: bool | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, past_key_values: RecurrentCache | None = None,
                **kwargs: Any) -> LeviathanModelOutput:
        # 1. the streams, mask, cache, positions
        check_forward_kwargs(self, kwargs)
        if inputs_embeds is not None:
            raise ValueError("the ensemble takes input_ids, not inputs_embeds (each member has its own embeddings)")
        inputs = self.prepare(input_ids, attention_mask, position_ids, resolve_cache(cache, past_key_values),
                              use_cache)
        # 2. members, interaction, read-out(s)
        out, members = self.mix(inputs)
        h = out if self.config.module_streams else out[0]
        # 3. count the tokens the cache has now seen
        if inputs.cache is not None:
            inputs.cache.advance(inputs.real)
        return LeviathanModelOutput(last_hidden_state=h, **cache_kwargs(inputs.cache),
                                    hidden_states=(members, h) if output_hidden_states else None)


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

    def lm_loss(self, logits: Tensor, labels: Any, attention_mask: Any, num_items_in_batch: Tensor | int | None
                ) -> Tensor:
        """The shell's loss with the streams flattened into the batch: logits [(S,) B, T, V], labels [(S,) B, T]."""
        flat = logits.reshape(-1, *logits.shape[-2:])  # [S*B, T, V]
        mask = as_streams(attention_mask)
        labels = as_streams(labels)
        assert labels is not None
        return super().lm_loss(flat, labels.reshape(flat.shape[:2]),
                               mask.reshape(flat.shape[:2]) if mask is not None else None, num_items_in_batch)
