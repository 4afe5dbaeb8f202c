"""Every trainable model by name, built through one path: so training, comparison and the CLI never branch on names.

A family registers once: ``register_model(name, config_class, build, sizes, defaults)``. Building a model is then
always the same three steps:

1. ``sizes(ModelSize, special ids)``: the shared knobs (width, heads, layers, positions, dropout, vocabulary) as
   fields of the family's config (``recurrent_sizes`` for ours, ``gpt2_sizes`` for the baseline, ...);
2. the family's ``defaults`` (e.g. fastformer-conv's ``convolve=True``), then the caller's overrides, typed like the
   config's defaults and checked against its fields (``configure``);
3. ``build(config)``: the model, freshly initialised (seed torch first).

A spec string names a model and, optionally, its overrides: ``fastformer:residual=normed,kernel_size=8``.

Families registered outside attnfree reach every command (and every process ``attnfree compare`` starts) in two
ways, both loaded once per process, lazily, the first time a name is not found or a checkpoint is loaded
(``load_plugins``): an ``attnfree.models`` entry point of an installed package (a module that registers on import,
or a function to call), and the modules named in ``$ATTNFREE_IMPORT`` (comma-separated; ``attnfree --import``
sets it). ``register_model`` remembers the module that called it, so ``compare`` passes it on to its runs.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import os
import sys
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    Mamba2Config,
    MambaConfig,
    PreTrainedConfig,
    PreTrainedModel,
    RecurrentGemmaConfig,
    RwkvConfig,
)

from attnfree.models.fastformer import FastformerConfig, FastformerForCausalLM
from attnfree.models.gpt2 import build_gpt2, gpt2_sizes
from attnfree.models.leviathan import (
    LeviathanConfig,
    LeviathanEnsembleConfig,
    LeviathanEnsembleForCausalLM,
    LeviathanForCausalLM,
    LeviathanMoEConfig,
    LeviathanMoEForCausalLM,
)
from attnfree.models.peers import build_peer, griffin_sizes, llama_sizes, mamba2_sizes, mamba_sizes, rwkv_sizes


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


Sizes = Callable[[ModelSize, SpecialIds], dict[str, Any]]


def recurrent_sizes(size: ModelSize, ids: SpecialIds) -> dict[str, Any]:
    """The shared sizes as the fields every attnfree family's config has."""
    return {"hidden_size": size.hidden_size, "n_heads": size.n_heads, "num_hidden_layers": size.num_layers,
            "n_positions": size.n_positions, "hidden_dropout_prob": size.dropout, "vocab_size": ids.vocab_size,
            "pad_token_id": ids.pad_token_id, "bos_token_id": ids.bos_token_id, "eos_token_id": ids.eos_token_id}


def one_layer_fewer(size: ModelSize, ids: SpecialIds) -> dict[str, Any]:
    """``recurrent_sizes`` with one layer fewer (at least 1): fastformer-conv's convolutions cost about a layer, so
    its parameter count stays close to the plain model's."""
    return {**recurrent_sizes(size, ids), "num_hidden_layers": max(1, size.num_layers - 1)}


def local_window(n_positions: int) -> int:
    """fastformer-local's default window for a model trained on ``n_positions`` tokens: a quarter of it (16 at 64),
    at least 1; shorter than the context, so the global pooling and the window divide the work."""
    return max(1, n_positions // 4)


def local_attention_sizes(size: ModelSize, ids: SpecialIds) -> dict[str, Any]:
    """``one_layer_fewer`` (the window's q, k, v and output projections cost what fastformer-conv's K = 4
    convolution costs, 4 C^2 a layer) with the window sized to the training length (``local_window``)."""
    return {**one_layer_fewer(size, ids), "local_window": local_window(size.n_positions)}


def baseline_gpt2_sizes(size: ModelSize, ids: SpecialIds) -> dict[str, Any]:
    return gpt2_sizes(size.hidden_size, size.n_heads, size.num_layers, size.n_positions, size.dropout,
                      ids.vocab_size, ids.pad_token_id, ids.bos_token_id, ids.eos_token_id)


@dataclass(frozen=True)
class ModelEntry:
    """How to build one registered model (see the module docstring)."""

    config_class: type[PreTrainedConfig]
    build: Callable[[Any], PreTrainedModel]
    sizes: Sizes = recurrent_sizes
    defaults: Mapping[str, Any] = field(default_factory=dict)
    module: str = ""  # the module that registered it (``__main__`` for a script)


MODELS: dict[str, ModelEntry] = {}
ENTRY_POINT_GROUP = "attnfree.models"  # installed packages' families: a module or a function per entry point
IMPORT_ENV = "ATTNFREE_IMPORT"  # comma-separated modules that register families, imported by load_plugins
_plugins_loaded = False


def register_model(name: str, config_class: type[PreTrainedConfig], build: Callable[[Any], PreTrainedModel],
                   sizes: Sizes = recurrent_sizes, defaults: Mapping[str, Any] | None = None,
                   auto: bool = True) -> None:
    """Add (or replace) a model under ``name``: one line per family.

    ``build`` is usually the family's ForCausalLM class. With ``auto`` (and a class for ``build``), the config and
    model classes are also registered with transformers' AutoConfig / AutoModelForCausalLM (and AutoModel for the
    backbone class the LM names as ``backbone_class``, if any).
    """
    if not name or any(c in name for c in ":,= "):
        raise ValueError(f"model name {name!r} must be non-empty and free of ':', ',', '=' and spaces")
    caller = sys._getframe(1).f_globals.get("__name__", "")  # who registers: compare passes it on to its runs
    MODELS[name] = ModelEntry(config_class, build, sizes, dict(defaults or {}), caller)
    if auto and isinstance(build, type) and issubclass(build, PreTrainedModel):
        model_type = getattr(config_class, "model_type", "")
        if model_type:
            AutoConfig.register(model_type, config_class, exist_ok=True)
            AutoModelForCausalLM.register(config_class, build, exist_ok=True)
            backbone = getattr(build, "backbone_class", None)
            if isinstance(backbone, type) and issubclass(backbone, PreTrainedModel):
                AutoModel.register(config_class, backbone, exist_ok=True)


def import_models(modules: Iterable[str]) -> None:
    """Import each named module (they register families on import); a module that is not found is a ValueError."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            raise ValueError(f"cannot import model module {module!r}: {err}") from None


def load_plugins() -> None:
    """Once per process: import the modules named in ``$ATTNFREE_IMPORT``, then load every ``attnfree.models``
    entry point (a loaded function is called: it registers)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    import_models(m.strip() for m in os.environ.get(IMPORT_ENV, "").split(",") if m.strip())
    for point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        loaded = point.load()
        if callable(loaded) and not isinstance(loaded, types.ModuleType):
            loaded()


def plugin_modules(specs: Iterable[str]) -> list[str]:
    """The modules outside attnfree that registered the models of ``specs``: what another process must import to
    find them. A model registered in a script (``__main__``) is a ValueError: no other process can import it."""
    modules = []
    for spec in specs:
        name, _ = parse_model_spec(spec)
        module = MODELS[name].module
        if module == "__main__":
            raise ValueError(f"model {name!r} is registered in a script (__main__), which a run's process cannot "
                             "import: register it in a module and name that module with 'attnfree --import MODULE' "
                             f"(or ${IMPORT_ENV}, or an '{ENTRY_POINT_GROUP}' entry point)")
        if module and module != "attnfree" and not module.startswith("attnfree."):
            modules.append(module)
    return list(dict.fromkeys(modules))


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

    The name must be registered, here or by a plugin (ValueError listing the valid names otherwise).
    """
    name, _, rest = spec.strip().partition(":")
    if name not in MODELS:
        load_plugins()
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


def build_model(spec: str, size: ModelSize, ids: SpecialIds, overrides: Mapping[str, Any] | None = None
                ) -> PreTrainedModel:
    """Build the model named by ``spec`` (``name`` or ``name:key=value,...``); ``overrides`` are applied after the
    spec's own (see the module docstring)."""
    name, spec_overrides = parse_model_spec(spec)
    entry = MODELS[name]
    config = configure(entry.config_class, {**entry.sizes(size, ids), **entry.defaults},
                       {**spec_overrides, **(overrides or {})})
    return entry.build(config)


def max_positions(model: PreTrainedModel) -> int | None:
    """The longest input the model accepts, or None when it has no position limit."""
    config = model.config
    if getattr(config, "position_embedding_type", "learned") == "none":
        return None
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    return int(limit) if limit else None


def count_parameters(model: torch.nn.Module, trainable_only: bool = True) -> int:
    """Number of parameters, counting each shared (tied) tensor once (``parameters()`` yields a shared one once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


register_model("fastformer", FastformerConfig, FastformerForCausalLM)
register_model("fastformer-conv", FastformerConfig, FastformerForCausalLM, one_layer_fewer, {"convolve": True})
# the local context by sliding-window attention in place of the convolution (the design's own next step)
register_model("fastformer-local", FastformerConfig, FastformerForCausalLM, local_attention_sizes)
# the earlier fastformerLM package's design, whole: its residual and logit scale, no recency, learned positions
register_model("fastformer-seed", FastformerConfig, FastformerForCausalLM, defaults={
    "preset": "seed", "decay": "none", "position_embedding_type": "learned"})
# LEAP (mtanghu/LEAP): windowed pooling by its schedule, the focus f . k and the alignment gate (docs/fastformer.md)
register_model("leap", FastformerConfig, FastformerForCausalLM, defaults={
    "preset": "leap", "pool_windows": "leap", "focus": "dot", "alignment": True})
register_model("leviathan", LeviathanConfig, LeviathanForCausalLM)
register_model("leviathan-ensemble", LeviathanEnsembleConfig, LeviathanEnsembleForCausalLM)
register_model("leviathan-moe", LeviathanMoEConfig, LeviathanMoEForCausalLM)
register_model("gpt2", GPT2Config, build_gpt2, baseline_gpt2_sizes, auto=False)
register_model("rwkv", RwkvConfig, build_peer, rwkv_sizes, auto=False)
register_model("mamba", MambaConfig, build_peer, mamba_sizes, auto=False)
register_model("mamba2", Mamba2Config, build_peer, mamba2_sizes, auto=False)
register_model("griffin", RecurrentGemmaConfig, build_peer, griffin_sizes, auto=False)
register_model("llama", LlamaConfig, build_peer, llama_sizes, auto=False)
