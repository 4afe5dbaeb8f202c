"""Every trainable model by name: one table from a name to a builder, so training, comparison and the CLI
never branch on model names.

A builder takes a ``ModelSize`` (the shared knobs every family understands), the tokenizer's special
ids and a dict of per-model overrides (any field of that family's config), and returns a freshly
initialised ``PreTrainedModel``. Seed torch before calling it: builders draw the initial weights.

A spec string names a model and, optionally, its overrides: ``fastformer:residual=normed,kernel_size=8``.
Adding a family is one line: ``register_model("leviathan", build_leviathan)``.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from transformers import GPT2Config, PreTrainedConfig, PreTrainedModel

from attnfree.models.baselines import gpt2_baseline
from attnfree.models.fastformer import FastformerConfig, FastformerForCausalLM
from attnfree.models.leviathan import build_leviathan, build_leviathan_ensemble, build_leviathan_moe


@dataclass(frozen=True)
class ModelSize:
    """The sizes every family shares, so models compared side by side are sized alike."""

    hidden_size: int = 128  # C, model width
    n_heads: int = 4  # H
    num_layers: int = 4
    n_positions: int = 1024  # longest sequence (learned position embeddings)
    dropout: float = 0.0  # on embeddings, residual branches (and attention probabilities in GPT-2)

    def __post_init__(self) -> None:
        for name in ("hidden_size", "n_heads", "num_layers", "n_positions"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelSize.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.n_heads:
            raise ValueError(f"ModelSize.hidden_size {self.hidden_size} is not divisible by n_heads {self.n_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ModelSize.dropout must be in [0, 1), got {self.dropout!r}")


class SpecialIds(Protocol):
    """What a builder needs from a tokenizer (``attnfree.data.TextTokenizer`` satisfies it)."""

    vocab_size: int
    pad_token_id: int
    bos_token_id: int
    eos_token_id: int


ModelBuilder = Callable[[ModelSize, SpecialIds, Mapping[str, Any]], PreTrainedModel]

MODELS: dict[str, ModelBuilder] = {}


def register_model(name: str, builder: ModelBuilder) -> None:
    """Add (or replace) a model family under ``name``."""
    if not name or any(c in name for c in ":,= "):
        raise ValueError(f"model name {name!r} must be non-empty and free of ':', ',', '=' and spaces")
    MODELS[name] = builder


# ----------------------------------------------------------------------------------------------
# Overrides: "name:key=value,key=value" and typed config updates
# ----------------------------------------------------------------------------------------------


def parse_value(text: str) -> Any:
    """A command-line value as Python: ints, floats, true/false, none, lists; anything else stays a string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        return text.strip()


def parse_assignments(items: list[str] | tuple[str, ...] | str, what: str = "override") -> dict[str, Any]:
    """``["a=1", "b=x"]`` (or ``"a=1,b=x"``) -> ``{"a": 1, "b": "x"}``; a malformed item is a ValueError."""
    parts = [p for p in items.split(",") if p.strip()] if isinstance(items, str) else list(items)
    out: dict[str, Any] = {}
    for part in parts:
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"{what} {part!r} must look like KEY=VALUE")
        out[key.strip()] = parse_value(value)
    return out


def parse_model_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"fastformer:residual=normed,kernel_size=8"`` -> ``("fastformer", {"residual": "normed", ...})``.

    The name must be registered (ValueError listing the valid names otherwise).
    """
    name, _, rest = spec.strip().partition(":")
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(sorted(MODELS))}")
    return name, parse_assignments(rest, what=f"model override in {spec!r}")


def split_model_list(text: str) -> list[str]:
    """Split ``"fastformer:residual=normed,kernel_size=8,gpt2"`` into model specs: a comma-separated item
    holding ``=`` but no ``:`` continues the previous model's overrides."""
    specs: list[str] = []
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        if "=" in item and ":" not in item and specs:
            specs[-1] += "," + item
        else:
            specs.append(item)
    return specs


def _coerce(value: Any, default: Any) -> Any:
    """Match the type of the config's default where that is lossless (``1`` -> ``1.0`` for a float field,
    ``none`` -> ``"none"`` for a string field)."""
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, str) and value is None:  # "decay=none" names the string choice, not Python's None
        return "none"
    return value


ConfigT = TypeVar("ConfigT", bound=PreTrainedConfig)


def configure(config_class: type[ConfigT], base: Mapping[str, Any], overrides: Mapping[str, Any]) -> ConfigT:
    """``config_class(**base, **overrides)``, rejecting override keys the config does not know."""
    defaults = config_class().to_dict()
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        valid = ", ".join(sorted(set(defaults) - set(PreTrainedConfig().to_dict())))
        raise ValueError(f"unknown {config_class.__name__} field(s) {', '.join(unknown)}; valid: {valid}")
    merged = {**base, **{k: _coerce(v, defaults[k]) for k, v in overrides.items()}}
    return config_class(**merged)


# ----------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------


def _fastformer_base(size: ModelSize, ids: SpecialIds) -> dict[str, Any]:
    return {
        "hidden_size": size.hidden_size,
        "n_heads": size.n_heads,
        "num_hidden_layers": size.num_layers,
        "n_positions": size.n_positions,
        "hidden_dropout_prob": size.dropout,
        "vocab_size": ids.vocab_size,
        "pad_token_id": ids.pad_token_id,
        "bos_token_id": ids.bos_token_id,
        "eos_token_id": ids.eos_token_id,
    }


def build_fastformer(size: ModelSize, ids: SpecialIds, overrides: Mapping[str, Any]) -> PreTrainedModel:
    """The causal Fastformer at ``size`` (``convolve=False``)."""
    return FastformerForCausalLM(configure(FastformerConfig, _fastformer_base(size, ids), overrides))


def build_fastformer_conv(size: ModelSize, ids: SpecialIds, overrides: Mapping[str, Any]) -> PreTrainedModel:
    """The earlier work's convolutional variant: a causal convolution in every layer, and one layer fewer
    than ``size`` says (at least 1) so its parameter count stays close to the plain model's."""
    base = {**_fastformer_base(size, ids), "convolve": True, "num_hidden_layers": max(1, size.num_layers - 1)}
    return FastformerForCausalLM(configure(FastformerConfig, base, overrides))


def build_gpt2(size: ModelSize, ids: SpecialIds, overrides: Mapping[str, Any]) -> PreTrainedModel:
    """The matched GPT-2 baseline (``attnfree.models.baselines.gpt2_baseline``); overrides may set
    ``ffn_multiplier`` or any ``GPT2Config`` field."""
    extra = dict(overrides)
    model = gpt2_baseline(
        vocab_size=ids.vocab_size,
        hidden_size=size.hidden_size,
        n_heads=size.n_heads,
        num_layers=size.num_layers,
        n_positions=size.n_positions,
        dropout=size.dropout,
        pad_token_id=ids.pad_token_id,
        bos_token_id=ids.bos_token_id,
        eos_token_id=ids.eos_token_id,
        ffn_multiplier=float(extra.pop("ffn_multiplier", 4)),
    )
    if not extra:
        return model
    config = configure(GPT2Config, model.config.to_diff_dict(), extra)
    return type(model)._from_config(config, attn_implementation="sdpa")


register_model("fastformer", build_fastformer)
register_model("fastformer-conv", build_fastformer_conv)
register_model("gpt2", build_gpt2)
register_model("leviathan", build_leviathan)
register_model("leviathan-ensemble", build_leviathan_ensemble)
register_model("leviathan-moe", build_leviathan_moe)


def build_model(spec: str, size: ModelSize, ids: SpecialIds, overrides: Mapping[str, Any] | None = None
                ) -> PreTrainedModel:
    """Build the model named by ``spec`` (``name`` or ``name:key=value,...``); ``overrides`` are applied
    after the spec's own."""
    name, spec_overrides = parse_model_spec(spec)
    return MODELS[name](size, ids, {**spec_overrides, **(overrides or {})})


def max_positions(model: PreTrainedModel) -> int | None:
    """The longest input the model accepts, or None when it has no position limit."""
    config = model.config
    if getattr(config, "position_embedding_type", "learned") == "none":
        return None
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    return int(limit) if limit else None
