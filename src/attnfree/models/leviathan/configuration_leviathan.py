"""Configurations of the Leviathan language models: the base model, the ensemble and the mixture of experts."""

from __future__ import annotations

import functools
from typing import Any

import torch
from huggingface_hub.dataclasses import strict

from attnfree.models.base import RecurrentConfig
from attnfree.models.validation import check_choice, check_divisible, check_positive, check_positive_float
from attnfree.ops.correlation import LagSet, make_lags

# block flavour -> (activation of the feed-forward block, its width as a multiple of hidden_size)
BLOCK_FLAVOURS: dict[str, tuple[str, float]] = {
    "gelu4": ("gelu", 4),
    "relu3": ("relu", 3),
    "leaky6": ("leaky_relu", 6),
    "sqrelu4": ("sqrelu", 4),  # squared ReLU (RWKV's channel mix uses it)
    "channel_mix4": ("channel_mix", 4),  # RWKV's channel mix: token shift, squared ReLU, receptance gate
    "channel_mix3.5": ("channel_mix", 3.5),  # the same at gelu4's parameter count (the gate's C x C paid for)
}


@functools.lru_cache(maxsize=64)
def lag_tuple(dense_lags: int, n_positions: int) -> tuple[int, ...]:
    """``make_lags`` as a tuple, made once per (dense_lags, n_positions) on the CPU (also while a model is being
    built on the meta device by ``from_pretrained``)."""
    with torch.device("cpu"):
        return tuple(make_lags(dense_lags, n_positions).tolist())


@strict
class LeviathanConfig(RecurrentConfig):
    r"""Leviathan: a causal language model whose token mixer is multi-headed cross-correlation over a lag set.

    Block (pre-LN):  h += Correlation(LN(h));  h += FFN(LN(h)).  Lags = ``make_lags(dense_lags, n_positions)``:
    0..dense_lags-1 plus dense_lags * 2**m below n_positions (37 lags at the defaults).

    Args (besides ``RecurrentConfig``'s: sizes, positions, dropout, initialisation, special ids):
        dense_lags: the dense lag run 0..dense_lags-1 (before the dilated lags); n_positions bounds the largest lag.
        segment: J, consecutive query/key positions summed into one correlation score.
        block_flavour: feed-forward block: "gelu4" (4x GELU), "relu3" (3x ReLU), "leaky6" (6x LeakyReLU),
            "sqrelu4" (4x squared ReLU), "channel_mix4" (RWKV's channel mix at 4x) or "channel_mix3.5" (at 3.5x: the
            parameters of gelu4, the gate paid for by a narrower FFN).
    """

    model_type = "leviathan"

    dense_lags: int = 32
    segment: int = 4
    block_flavour: str = "gelu4"

    def __post_init__(self, **kwargs: Any) -> None:
        if kwargs.pop("output_gate", False):  # (a legacy config.json holds it at False: nothing to do)
            raise ValueError(f"{type(self).__name__}.output_gate was removed (it lost its ablation: "
                             "docs/leviathan.md); a checkpoint trained with it loads with attnfree before the "
                             "middle-floor change (git history)")
        super().__post_init__(**kwargs)

    @property
    def lags(self) -> tuple[int, ...]:
        """The lag set every correlation layer uses (L entries)."""
        return lag_tuple(self.dense_lags, self.n_positions)

    @property
    def lag_set(self) -> LagSet:
        """The lags and the segment length, as the correlation op takes them."""
        return LagSet(self.lags, self.segment)

    @property
    def ffn_activation(self) -> str:
        return BLOCK_FLAVOURS[self.block_flavour][0]

    @property
    def ffn_multiplier(self) -> float:
        return BLOCK_FLAVOURS[self.block_flavour][1]

    def validate_fields(self) -> None:
        """Raise ValueError naming the first invalid field."""
        super().validate_fields()
        check_positive(self, "dense_lags", "segment")
        check_choice(self, "block_flavour", BLOCK_FLAVOURS)


@strict
class LeviathanEnsembleConfig(LeviathanConfig):
    r"""An ensemble of n_modules x members_per_module Leviathan backbones, each of width ``hidden_size``,
    mixed per position by a multi-headed interaction across members, a learned gate and one LM head.

    Args (besides LeviathanConfig's, which every member uses):
        n_modules: number of modules (groups of members; with ``module_streams`` each has its own data).
        members_per_module: backbones per module.
        interaction_heads: heads of the softmax mixing across members (must divide hidden_size).
        module_streams: each module reads its own stream: ``input_ids`` [n_modules, B, T] (or a list of
            n_modules [B, T] tensors), labels alike; logits are [n_modules, B, T, V], one gated read-out
            per module, and the loss is the mean over modules.
    """

    model_type = "leviathan_ensemble"

    n_modules: int = 4
    members_per_module: int = 2
    interaction_heads: int = 4
    module_streams: bool = False

    @property
    def n_members(self) -> int:
        return self.n_modules * self.members_per_module

    def validate_fields(self) -> None:
        super().validate_fields()
        check_positive(self, "n_modules", "members_per_module", "interaction_heads")
        check_divisible(self, "hidden_size", "interaction_heads")


@strict
class LeviathanMoEConfig(LeviathanConfig):
    r"""Leviathan with every feed-forward block replaced by a sparsely gated mixture of experts
    (``attnfree.layers.moe``); each expert is a ``block_flavour`` feed-forward block.

    Args (besides LeviathanConfig's):
        n_experts: E experts per block.
        router_top_k: experts each token is sent to (not "top_k", which generate() would read as a sampling
            setting).
        capacity_factor: expert capacity = ceil(capacity_factor * tokens * top_k / n_experts), in training.
        noise: scale of the noisy top-k gating noise (0 = plain top-k, no noise weights); training only.
        aux_loss_coef: weight of the load-balancing loss added to the training loss.
    """

    model_type = "leviathan_moe"

    n_experts: int = 8
    router_top_k: int = 2
    capacity_factor: float = 1.25
    noise: float = 1.0
    aux_loss_coef: float = 0.01

    def validate_fields(self) -> None:
        super().validate_fields()
        check_positive(self, "n_experts", "router_top_k")
        if self.router_top_k > self.n_experts:
            raise ValueError(f"{type(self).__name__}.router_top_k={self.router_top_k} must be <= "
                             f"n_experts={self.n_experts}")
        if self.ffn_activation == "channel_mix":
            raise ValueError(f"{type(self).__name__}.block_flavour {self.block_flavour!r} cannot be an expert (the "
                             "channel mix keeps a state; experts are stateless feed-forward blocks)")
        check_positive_float(self, "capacity_factor")
        for f in ("noise", "aux_loss_coef"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"{type(self).__name__}.{f} must be >= 0, got {v!r}")
