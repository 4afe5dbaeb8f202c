"""The models users compare against today, from transformers' own classes: the sub-quadratic RWKV-4, Mamba, Mamba-2
and Griffin, and the attention baseline of their papers, a Llama-style Transformer ("Transformer++").

Like the GPT-2 baseline, nothing here is ours but the sizing: each peer is the stock implementation, sized so that
its parameter count is within 5% of the GPT-2 baseline of the same ``ModelSize``. One integer knob per peer does it,
the rest of each design kept as its authors published it:

- ``rwkv`` (RWKV-4, ``RwkvForCausalLM``): the shared width and layers; knob: the channel-mix width.
- ``mamba`` (``MambaForCausalLM``): expand 2, state 16, conv 4; knob: the number of layers. With the optional
  ``mambapy`` package installed (``pip install "attnfree[mamba]"``) its training scan is mambapy's parallel scan
  (``use_mambapy``) instead of transformers' sequential loop over time.
- ``mamba2`` (Mamba-2, ``Mamba2ForCausalLM``): expand 2, head size 32 (so 2C/32 SSD heads), one group, state 64,
  conv 4, SSD chunks of ``min(64, n_positions)``; knob: the number of layers.
- ``griffin`` (RecurrentGemma, ``RecurrentGemmaForCausalLM``: Griffin's RG-LRU recurrence plus local attention):
  the shared width, layers and heads; blocks recurrent, recurrent, attention, repeated (``griffin_blocks``); one
  key-value head
  (multi-query, as Griffin); RG-LRU width = C; the local-attention window is half the training length, capped at
  2,048 (Griffin's ratio: 1,024-token windows at 2,048-token training); knob: the gated MLP's width.
- ``llama`` (``LlamaForCausalLM``: rotary positions, RMSNorm, a SwiGLU MLP, no biases): the shared width, layers
  and heads, as many key-value heads as query heads; knob: the SwiGLU width. Unlike GPT-2's learned positions,
  rotary ones need no table to learn, so it is the attention baseline at long blocks.

Input and output embeddings are tied, as in every other model here. The recurrent peers do not read
``attention_mask`` as ours do: they are trained and scored here on unpadded windows only. ``decode_state_bytes``
measures what each one carries from token to token.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedConfig, PreTrainedModel

from attnfree.models.gpt2 import gpt2_sizes

MATCH_TOLERANCE = 0.05  # parameters within 5% of the matched GPT-2


def count_on_meta(build: Callable[[], torch.nn.Module]) -> int:
    """Parameters of a model built on the meta device (no memory, no initialisation), tied tensors once."""
    with torch.device("meta"):
        return sum(p.numel() for p in build().parameters())


def gpt2_parameters(hidden_size: int, n_heads: int, num_layers: int, n_positions: int, vocab_size: int) -> int:
    """The matched GPT-2's parameter count (the target every peer is sized to)."""
    sizes = gpt2_sizes(hidden_size, n_heads, num_layers, n_positions, 0.0, vocab_size, 0, 0, 0)
    return count_on_meta(lambda: GPT2LMHeadModel(GPT2Config(**sizes)))


def closest(target: int, knobs: Iterable[int], count: Callable[[int], int], name: str) -> tuple[int, int]:
    """(knob, parameters) of the knob whose model's parameter count is closest to ``target`` (a warning when even
    that one is off by more than ``MATCH_TOLERANCE``: tiny sizes, where fixed per-layer parameters dominate)."""
    best = min(((k, count(k)) for k in knobs), key=lambda kp: abs(kp[1] - target))
    if abs(best[1] - target) > MATCH_TOLERANCE * target:
        warnings.warn(f"{name}: no size within {MATCH_TOLERANCE:.0%} of the matched GPT-2's {target:,} parameters; "
                      f"closest {best[1]:,}", stacklevel=3)
    return best


def rwkv_config(hidden_size: int, num_layers: int, vocab_size: int, bos: int, eos: int, intermediate: int,
                **extra: Any) -> PreTrainedConfig:
    from transformers import RwkvConfig

    return RwkvConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                      attention_hidden_size=hidden_size, intermediate_size=intermediate, bos_token_id=bos,
                      eos_token_id=eos, tie_word_embeddings=True, **extra)


def mamba_config(hidden_size: int, num_layers: int, vocab_size: int, bos: int, eos: int, pad: int,
                 **extra: Any) -> PreTrainedConfig:
    from transformers import MambaConfig

    return MambaConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers, expand=2,
                       state_size=16, conv_kernel=4, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
                       tie_word_embeddings=True, **extra)


def mamba2_config(hidden_size: int, num_layers: int, n_positions: int, vocab_size: int, bos: int, eos: int, pad: int,
                  **extra: Any) -> PreTrainedConfig:
    from transformers import Mamba2Config

    head_dim, expand = 32, 2
    return Mamba2Config(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers, expand=expand,
                        head_dim=head_dim, num_heads=expand * hidden_size // head_dim, n_groups=1, state_size=64,
                        conv_kernel=4, chunk_size=min(64, n_positions), bos_token_id=bos, eos_token_id=eos,
                        pad_token_id=pad, tie_word_embeddings=True, **extra)


def griffin_window(n_positions: int) -> int:
    """Griffin's local-attention window for a model trained on ``n_positions`` tokens: half of it, at most 2,048."""
    return max(1, min(2048, n_positions // 2))


def griffin_blocks(num_layers: int) -> list[str]:
    """Griffin's pattern, two recurrent blocks then one local-attention block, repeated; with two layers one of each,
    so that every model has its attention (transformers' RecurrentGemma cannot decode without an attention block)."""
    if num_layers < 2:
        raise ValueError(f"griffin needs at least 2 layers (a recurrent and a local-attention block), got {num_layers}")
    return ["recurrent", "recurrent", "attention"] if num_layers >= 3 else ["recurrent", "attention"]


def griffin_config(hidden_size: int, n_heads: int, num_layers: int, n_positions: int, vocab_size: int, bos: int,
                   eos: int, pad: int, intermediate: int, **extra: Any) -> PreTrainedConfig:
    from transformers import RecurrentGemmaConfig

    return RecurrentGemmaConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                                lru_width=hidden_size, num_attention_heads=n_heads, num_key_value_heads=1,
                                attention_window_size=griffin_window(n_positions), intermediate_size=intermediate,
                                block_types=griffin_blocks(num_layers), bos_token_id=bos,
                                eos_token_id=eos, pad_token_id=pad, tie_word_embeddings=True, **extra)


def llama_config(hidden_size: int, n_heads: int, num_layers: int, n_positions: int, vocab_size: int, bos: int,
                 eos: int, pad: int, intermediate: int, **extra: Any) -> PreTrainedConfig:
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                       num_attention_heads=n_heads, num_key_value_heads=n_heads, head_dim=hidden_size // n_heads,
                       intermediate_size=intermediate, max_position_embeddings=n_positions, bos_token_id=bos,
                       eos_token_id=eos, pad_token_id=pad, tie_word_embeddings=True, **extra)


def mambapy_available() -> bool:
    """Whether the optional ``mambapy`` package (Mamba's parallel scan on any device) is installed."""
    from importlib.util import find_spec

    return find_spec("mambapy") is not None


def build_peer(config: PreTrainedConfig) -> PreTrainedModel:
    """The transformers causal LM of a peer's config, freshly initialised."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config)


def matched(name: str, size: Any, knobs: Iterable[int], make: Callable[[int], PreTrainedConfig]) -> dict[str, Any]:
    """The fields of ``make(knob)`` for the knob whose model's parameter count is closest to the matched GPT-2's."""
    target = gpt2_parameters(size.hidden_size, size.n_heads, size.num_layers, size.n_positions,
                             make(next(iter(knobs))).vocab_size)
    knob, _ = closest(target, knobs, lambda k: count_on_meta(lambda: build_peer(make(k))), name)
    config = make(knob)
    return {k: v for k, v in config.to_dict().items() if k in _fields(config)}


def rwkv_sizes(size: Any, ids: Any) -> dict[str, Any]:
    """RwkvConfig fields: the shared width and layers; knob: the channel-mix width."""
    return matched("rwkv", size, range(16, 8 * size.hidden_size + 16, 16), lambda inner: rwkv_config(
        size.hidden_size, size.num_layers, ids.vocab_size, ids.bos_token_id, ids.eos_token_id, inner))


def mamba_sizes(size: Any, ids: Any) -> dict[str, Any]:
    """MambaConfig fields: the shared width; knob: the number of layers; mambapy's scan when it is installed."""
    return matched("mamba", size, range(1, 4 * size.num_layers + 1), lambda layers: mamba_config(
        size.hidden_size, layers, ids.vocab_size, ids.bos_token_id, ids.eos_token_id, ids.pad_token_id,
        use_mambapy=mambapy_available()))


def mamba2_sizes(size: Any, ids: Any) -> dict[str, Any]:
    """Mamba2Config fields: the shared width; knob: the number of layers."""
    return matched("mamba2", size, range(1, 4 * size.num_layers + 1), lambda layers: mamba2_config(
        size.hidden_size, layers, size.n_positions, ids.vocab_size, ids.bos_token_id, ids.eos_token_id,
        ids.pad_token_id))


def griffin_sizes(size: Any, ids: Any) -> dict[str, Any]:
    """RecurrentGemmaConfig fields: the shared width, heads and layers; knob: the gated MLP's width (half of it in
    each of its two branches)."""
    return matched("griffin", size, range(32, 16 * size.hidden_size + 32, 32), lambda inner: griffin_config(
        size.hidden_size, size.n_heads, size.num_layers, size.n_positions, ids.vocab_size, ids.bos_token_id,
        ids.eos_token_id, ids.pad_token_id, inner))


def llama_sizes(size: Any, ids: Any) -> dict[str, Any]:
    """LlamaConfig fields: the shared width, heads, layers and positions; knob: the SwiGLU width."""
    return matched("llama", size, range(16, 8 * size.hidden_size + 16, 16), lambda inner: llama_config(
        size.hidden_size, size.n_heads, size.num_layers, size.n_positions, ids.vocab_size, ids.bos_token_id,
        ids.eos_token_id, ids.pad_token_id, inner))


def _fields(config: PreTrainedConfig) -> set[str]:
    """The config class's own fields (what the registry may set and override)."""
    return set(type(config)().to_dict()) - {"transformers_version", "architectures", "model_type"}
