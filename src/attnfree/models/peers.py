"""The attention-free models users pick today, from transformers' own classes: RWKV-4 and Mamba (and Mamba-2).

Like the GPT-2 baseline, nothing here is ours but the sizing: each peer is the stock implementation, sized so that
its parameter count is within 5% of the GPT-2 baseline of the same ``ModelSize`` (``matched_sizes``). One integer
knob per peer does it: RWKV's channel-mix width (its layers and width follow the shared sizes), Mamba's number of
layers (a Mamba layer holds about half a transformer layer's parameters at expand 2). Input and output embeddings
are tied, as in every other model here.

On CPU, transformers runs Mamba's reference scan (a Python loop over time; no CUDA kernel): about 1.6 s per
training step at width 128 and block 64, twenty times RWKV's. RWKV runs its PyTorch WKV loop over time too.
Both ignore ``attention_mask``: they are trained and scored here on unpadded windows only.
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


def build_peer(config: PreTrainedConfig) -> PreTrainedModel:
    """The transformers causal LM of a peer's config (RWKV or Mamba), freshly initialised."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config)


def rwkv_sizes(size: Any, ids: Any) -> dict[str, Any]:
    """RwkvConfig fields: the shared width and layers, the channel-mix width matched to GPT-2's parameters."""
    target = gpt2_parameters(size.hidden_size, size.n_heads, size.num_layers, size.n_positions, ids.vocab_size)
    step = 16

    def count(intermediate: int) -> int:
        config = rwkv_config(size.hidden_size, size.num_layers, ids.vocab_size, ids.bos_token_id,
                             ids.eos_token_id, intermediate)
        return count_on_meta(lambda: build_peer(config))

    intermediate, _ = closest(target, range(step, 8 * size.hidden_size + step, step), count, "rwkv")
    config = rwkv_config(size.hidden_size, size.num_layers, ids.vocab_size, ids.bos_token_id, ids.eos_token_id,
                         intermediate)
    return {k: v for k, v in config.to_dict().items() if k in _fields(config)}


def mamba_sizes(size: Any, ids: Any) -> dict[str, Any]:
    """MambaConfig fields: the shared width, the number of layers matched to GPT-2's parameters."""
    target = gpt2_parameters(size.hidden_size, size.n_heads, size.num_layers, size.n_positions, ids.vocab_size)

    def count(layers: int) -> int:
        config = mamba_config(size.hidden_size, layers, ids.vocab_size, ids.bos_token_id, ids.eos_token_id,
                              ids.pad_token_id)
        return count_on_meta(lambda: build_peer(config))

    layers, _ = closest(target, range(1, 4 * size.num_layers + 1), count, "mamba")
    config = mamba_config(size.hidden_size, layers, ids.vocab_size, ids.bos_token_id, ids.eos_token_id,
                          ids.pad_token_id)
    return {k: v for k, v in config.to_dict().items() if k in _fields(config)}


def _fields(config: PreTrainedConfig) -> set[str]:
    """The config class's own fields (what the registry may set and override)."""
    return set(type(config)().to_dict()) - {"transformers_version", "architectures", "model_type"}
