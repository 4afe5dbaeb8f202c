"""Configuration of the causal Fastformer language model."""

from __future__ import annotations

from typing import Any

from huggingface_hub.dataclasses import strict

from attnfree.layers.additive_attention import DECAY_MODES, FOCUS_MODES
from attnfree.layers.ffn import FFN_TYPES
from attnfree.models.base import RecurrentConfig
from attnfree.models.validation import (
    check_choice,
    check_divisible,
    check_non_negative,
    check_positive,
    check_positive_float,
)

FASTFORMER_PRESETS = ("attnfree", "seed", "leap")
WINDOW_SCHEDULES = ("global", "leap")  # named values of ``pool_windows``
LEAP_CYCLE = (4, 8, 16, 0)  # LEAP's default windows after its first (global) layer, repeating; 0 = global


def leap_windows(num_layers: int, n_positions: int) -> tuple[int, ...]:
    """LEAP's default schedule: the first layer global, then 4, 8, 16, global, repeating; a window that would span
    the whole training length (>= n_positions) is global."""
    cycle = [0] + [LEAP_CYCLE[i % len(LEAP_CYCLE)] for i in range(num_layers - 1)]
    return tuple(0 if w >= n_positions else w for w in cycle)


@strict
class FastformerConfig(RecurrentConfig):
    r"""Causal Fastformer (additive attention) language model.

    Sizes default to the earlier ``fastformerLM`` design at its published size (11-12M parameters with the
    T5 vocabulary of 32,100 tokens). Positions: none by default (``position_embedding_type="none"``; the order
    comes from the causal pooling and its decay), so a model runs and serves at any length. Why each default is
    what it is, measured: docs/fastformer.md and docs/results.

    Args (besides ``RecurrentConfig``'s: sizes, positions, dropout, initialisation, special ids):
        preset: "attnfree" (this package's layer) or "seed" (the earlier ``fastformerLM`` package's: the
            mid-attention residual built on the layer-normed input, and logits divided by sqrt(hidden_size)).
            The registered model ``fastformer-seed`` is the whole earlier design: this preset, ``decay="none"``
            and learned positions.
        convolve: add a causal convolution (with residual) before attention in every layer.
        groups: groups of that convolution (1 = full, hidden_size = depthwise).
        kernel_size: K taps of that convolution (its decoding state keeps K-1 inputs).
        local_window: w > 0 adds sliding-window softmax attention over the last w positions (with residual)
            before the additive attention in every layer, the local context in place of the convolution (the
            registered model ``fastformer-local``); its decoding state keeps w keys and values. 0: none.
        local_rotary: rotary position embeddings on that attention's queries and keys (an ordered window).
        decay: per-head recency of the additive pooling: "none" (a plain causal mean), "fixed" (ALiBi slopes as
            a score bias lambda_h * position) or "learned" (slopes trained from there).
        ffn_multiplier: width of the feed-forward layer as a multiple of hidden_size.
        pool_chunk_size: chunk length of the parallel additive-attention form (speed/memory only).

    Local attention (LEAP, the Fastformer author's later design; docs/fastformer.md, "Windowed pooling"):
        preset "leap": every layer's attention is ``LeapAttention`` (one pooling of keys and values, no mid-attention
            residual) instead of ``FastformerAttention``.
        pool_windows: the poolings' window per layer, 0 = global: "global" (every layer), "leap" (LEAP's schedule:
            the first layer global, then 4, 8, 16, global, repeating; windows >= n_positions global), one integer
            for every layer, a list of one per layer, or the same list written "0/4/8/16" (for command lines).
        focus: the pooling score of the leap preset: "vector" (the Fastformer's learned w), "dot" (f . k of two
            projections of the token) or "normed_dot" (f, k standardised per head, a learned rescale).
        alignment: the leap preset's gate sigmoid(q . pooled keys / sqrt(D)) on the pooled values.

    Options toward RWKV's time and channel mixing (each off by default until it earns its place):
        bonus: a learned current-token bonus in the pooled read-out (RWKV's u).
        token_shift: q, k, v from per-channel mixes of each position's and the previous position's input.
        ffn_type: "gelu" (the design), "relu", "leaky_relu", "sqrelu" (squared ReLU) or "channel_mix" (RWKV's:
            token shift, squared ReLU, receptance gate).
    """

    model_type = "fastformer"

    position_embedding_type: str = "none"
    preset: str = "attnfree"
    convolve: bool = False
    groups: int = 1
    kernel_size: int = 4
    local_window: int = 0
    local_rotary: bool = True
    decay: str = "learned"
    ffn_multiplier: int | float = 4
    pool_chunk_size: int = 32
    bonus: bool = False
    token_shift: bool = False
    ffn_type: str = "gelu"
    pool_windows: list[int] | int | str = "global"
    focus: str = "vector"
    alignment: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        kwargs = convert_legacy_fields(self, kwargs)
        super().__post_init__(**kwargs)

    def validate_fields(self) -> None:
        """Raise ValueError naming the first invalid field."""
        super().validate_fields()
        check_positive(self, "groups", "kernel_size", "pool_chunk_size")
        check_non_negative(self, "local_window")
        check_positive_float(self, "ffn_multiplier")
        check_divisible(self, "hidden_size", "groups")
        check_choice(self, "preset", FASTFORMER_PRESETS)
        check_choice(self, "decay", DECAY_MODES)
        check_choice(self, "ffn_type", FFN_TYPES)
        check_choice(self, "focus", FOCUS_MODES)
        self.layer_windows  # noqa: B018 (raises naming pool_windows)
        if self.preset != "leap" and (self.focus != "vector" or self.alignment):
            raise ValueError(f"FastformerConfig.focus={self.focus!r} / alignment={self.alignment} belong to "
                             "preset='leap' (FastformerAttention scores with its learned vectors and has no gate)")
        if self.preset == "leap" and (self.bonus or self.token_shift):
            raise ValueError("FastformerConfig.bonus / token_shift are FastformerAttention's options, not built for "
                             "preset='leap'")

    @property
    def layer_windows(self) -> tuple[int | None, ...]:
        """``pool_windows`` resolved to one window per layer (None = global); a ValueError names the field."""
        L, value = self.num_hidden_layers, self.pool_windows
        if value == "global":
            windows: tuple[int, ...] = (0,) * L
        elif value == "leap":
            windows = leap_windows(L, self.n_positions)
        elif isinstance(value, str):
            try:
                windows = tuple(int(w) for w in value.split("/"))
            except ValueError:
                raise ValueError(f"FastformerConfig.pool_windows must be one of {WINDOW_SCHEDULES} (or an integer, or "
                                 f"windows like '0/4/8/16'), got {value!r}") from None
        else:
            windows = (value,) * L if isinstance(value, int) else tuple(value)
        if len(windows) != L or any(isinstance(w, bool) or not isinstance(w, int) or w < 0 for w in windows):
            raise ValueError(f"FastformerConfig.pool_windows must give {L} windows >= 0 (one per layer, 0 = global), "
                             f"got {value!r}")
        return tuple(w or None for w in windows)

    @property
    def residual(self) -> str:
        """What the mid-attention residual is built on: "raw" (h) or "normed" (the seed preset's n)."""
        return "normed" if self.preset == "seed" else "raw"

    @property
    def logit_scale(self) -> float:
        """Logits are multiplied by this: 1, or 1 / sqrt(hidden_size) in the seed preset."""
        return self.hidden_size ** -0.5 if self.preset == "seed" else 1.0


# Fields of checkpoints saved before the seed design became a preset and the options that lost their ablations went
# (docs/fastformer.md, "Removed options"): each either maps onto today's fields or is refused, naming why.
REMOVED_OPTIONS = {"pool_head_size": (0, None), "decay_per": ("head", None), "output_gate": (False, None)}


def convert_legacy_fields(config: FastformerConfig, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Read a legacy config.json's ``residual`` / ``scale_logits`` as ``preset`` and accept removed options at their
    old defaults (a checkpoint that never used them); anything else is a ValueError naming the field."""
    kwargs = dict(kwargs)
    legacy = (kwargs.pop("residual", "raw"), bool(kwargs.pop("scale_logits", False)))
    if legacy == ("normed", True):
        config.preset = "seed"
    elif legacy != ("raw", False):
        raise ValueError(f"FastformerConfig: residual={legacy[0]!r} with scale_logits={legacy[1]} is no longer built; "
                         "the earlier design is preset='seed' (residual 'normed' with scale_logits true), "
                         "this package's is the default preset='attnfree'")
    for name, neutral in REMOVED_OPTIONS.items():
        if name in kwargs and kwargs.pop(name) not in neutral:
            raise ValueError(f"FastformerConfig.{name} was removed (it lost its ablation: docs/fastformer.md, "
                             f"'Removed options'); a checkpoint trained with it loads with attnfree before the "
                             f"middle-floor change (git history)")
    return kwargs


# The name used by the earlier ``fastformerLM`` package.
FastformerLMConfig = FastformerConfig
