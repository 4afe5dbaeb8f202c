"""What differs between the transformers releases that pyproject.toml admits, in one place.

transformers 5.24 renamed the cache of every model: outputs carry it as ``cache`` (``past_key_values`` before),
``generate`` hands it to ``prepare_inputs_for_generation`` as ``cache=`` and reads it back from ``outputs.cache``;
``past_key_values`` stays a deprecated alias until 5.40 / 6.0. Our models take the cache under either name on every
supported release, and put it into their outputs under the field that the installed release's ``generate`` reads
(``CACHE_FIELD``). Code that reads a cache from an output uses ``output_cache``.
"""

from __future__ import annotations

from typing import Any

from transformers.modeling_outputs import CausalLMOutputWithPast

# the name of the cache field of transformers' model outputs: "cache" from 5.24 on, "past_key_values" before
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def output_cache(output: Any) -> Any:
    """The cache of a model output, under whichever name the installed transformers uses (None if absent)."""
    return getattr(output, CACHE_FIELD, None)


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """``{CACHE_FIELD: cache}``: keyword arguments that put ``cache`` into a transformers output class."""
    return {CACHE_FIELD: cache}


def enable_activation_checkpointing(model: Any) -> None:
    """Recompute activations in backward: ``activation_checkpointing_enable`` (transformers 5.24 on), or its name
    before, ``gradient_checkpointing_enable``."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
