"""The contract every recurrent family implements, and the shell they all share.

A family writes (see ``models/fastformer`` and ``models/leviathan``, and the toy family in
``tests/models/test_contract.py``):

- a config: a ``RecurrentConfig`` subclass (the shared fields are here) whose ``validate_fields`` checks its own;
- its block: a ``RecurrentBlock`` with ``forward(h, ctx, state) -> (h, state)`` for training, prefill and the
  one-token step alike, and ``init_state(batch, device, dtype)``: the state of a sequence that has seen nothing.
  A state is a dict of tensors or trees of tensors with the batch first (``models.cache``): that is all serving,
  beam search and export need of it. Most blocks are a ``SublayerBlock``: residual sublayers in order, each with
  its own state under its own name (the sublayer interface, ``layers.sublayer``);
- two thin classes naming the block: ``XModel(RecurrentModel)`` with ``block_class`` and
  ``XForCausalLM(RecurrentForCausalLM)`` with ``backbone_class``;
- one registration line in ``models/registry.py``.

The shell gives the rest: embeddings -> blocks -> final LayerNorm -> tied LM head, the loss, generation over a
``RecurrentCache`` (prefill, then one token per step), weight initialisation, the accessors transformers expects,
Auto registration, checkpoints loadable by path, and (through ``inference``) chunked prefill, export and serving.

Loadable by path, everywhere: ``save_pretrained`` writes ``auto_map`` into config.json and, beside the weights, a
small module (``attnfree_remote.py``) that imports the family's classes from the installed attnfree. So
``AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=True)`` works in an interpreter that never imported
attnfree (lm-evaluation-harness's ``--model hf``, ``pipeline(model=ckpt)``): the code that runs is the installed
package's, not a copy frozen into the checkpoint.

Shapes: B batch, T time, C width, V vocabulary.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, cast

import torch
from huggingface_hub.dataclasses import strict
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from attnfree.layers.sublayer import BlockContext, Sublayer
from attnfree.models.cache import RecurrentCache
from attnfree.models.common import (
    causal_lm_loss,
    check_forward_kwargs,
    embed_inputs,
    padding_mask,
    position_ids_from_mask,
    resolve_cache,
)
from attnfree.models.compat import cache_kwargs, output_cache
from attnfree.models.validation import (
    check_choice,
    check_divisible,
    check_non_negative,
    check_positive,
    check_positive_float,
    check_probability,
    check_token_ids,
)

REMOTE_CODE_FILE = "attnfree_remote.py"
POSITION_EMBEDDING_TYPES = ("learned", "none")


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


@strict
class RecurrentConfig(PreTrainedConfig):
    r"""The fields every attnfree family shares (a family's config subclasses this and adds its own).

    Args:
        vocab_size: V; 32,100 is the T5 tokenizer the earlier work used.
        hidden_size: model width C (= n_heads * head size D).
        n_heads: H heads of the token mixer.
        num_hidden_layers: number of blocks.
        n_positions: longest sequence with ``position_embedding_type="learned"``.
        position_embedding_type: "learned" or "none" (no length limit when decoding).
        hidden_dropout_prob: dropout on embeddings and on every residual branch.
        initializer_range: std of the normal init of linear and embedding weights.
        layer_norm_eps: epsilon of every LayerNorm.
        label_smoothing: applied to the training loss only; evaluation loss is plain cross-entropy.
        sequence_chunk: run sequences longer than this in pieces of this many positions, every block carrying
            its state from piece to piece: the same values and gradients (tested), and on a CPU faster once a
            sequence's activations outgrow the caches (docs/performance.md); 0 runs whole sequences.
    """

    vocab_size: int = 32100
    hidden_size: int = 256
    n_heads: int = 4
    num_hidden_layers: int = 4
    n_positions: int = 1024
    position_embedding_type: str = "learned"
    hidden_dropout_prob: float = 0.1
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-5
    label_smoothing: float = 0.0
    sequence_chunk: int = 0
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | None = 1
    use_cache: bool = True
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        self.validate_fields()
        super().__post_init__(**kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads

    def validate_fields(self) -> None:
        """Raise ValueError naming the first invalid field (a family extends this, calling super() first)."""
        check_positive(self, "vocab_size", "hidden_size", "n_heads", "num_hidden_layers", "n_positions")
        check_non_negative(self, "sequence_chunk")
        check_divisible(self, "hidden_size", "n_heads")
        check_choice(self, "position_embedding_type", POSITION_EMBEDDING_TYPES)
        check_probability(self, "hidden_dropout_prob", "label_smoothing")
        check_positive_float(self, "initializer_range", "layer_norm_eps")
        check_token_ids(self, "pad_token_id", "bos_token_id", "eos_token_id")


# ----------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------


LayerState = dict[str, Any]


@dataclass
class Inputs:
    """One forward's checked inputs (``RecurrentModel.prepare``): ids [B, T] or embeddings [B, T, C], the padding
    mask (None when nothing is padded), the real-token indicator [B, T] the cache counts, positions, the cache."""

    input_ids: Tensor | None
    inputs_embeds: Tensor | None
    mask: Tensor | None
    real: Tensor
    positions: Tensor
    cache: RecurrentCache | None


def prepare_inputs(model: Any, input_ids: Tensor | None, attention_mask: Tensor | None, position_ids: Tensor | None,
                   inputs_embeds: Tensor | None, cache: RecurrentCache | None, use_cache: bool | None) -> Inputs:
    """A backbone's checked inputs: exactly one of ids and embeddings, no empty sequence; the padding mask; the cache
    (``model.new_cache`` when caching without one); positions counting real tokens (continuing the cache's)."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("give exactly one of input_ids or inputs_embeds")
    ref = input_ids if input_ids is not None else inputs_embeds
    assert ref is not None
    B, T, device = ref.shape[0], ref.shape[1], ref.device
    if T == 0:
        raise ValueError("empty input: the sequence has no tokens")
    mask = padding_mask(attention_mask)
    use_cache = use_cache if use_cache is not None else (model.config.use_cache and not model.training)
    cache = (cache if cache is not None else model.new_cache(B, device)) if use_cache else None
    if position_ids is None:
        position_ids = position_ids_from_mask(mask, B, T, cache, device)
    real = attention_mask if attention_mask is not None else torch.ones(B, T, device=device)
    return Inputs(input_ids, inputs_embeds, mask, real, position_ids, cache)


class RecurrentBlock(GradientCheckpointingLayer):
    """One block of a family: ``forward(h [B, T, C], ctx, state) -> (h [B, T, C], state)``.

    ``state`` is None when nothing is cached (training), else this block's state dict: empty before the first
    call, which fills it (the parallel form over T positions), then continued by every later call (a chunk of a
    prompt, or one token). A block may update its state tensors in place.
    """

    def init_state(self, batch: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
                   ) -> LayerState:
        """The state of ``batch`` sequences that have seen nothing: what export writes as the empty state."""
        raise NotImplementedError(f"{type(self).__name__} must define init_state")


class SublayerBlock(RecurrentBlock):
    """A block made of residual sublayers: ``h = h + sublayer(h, ctx, state[name])`` for each, in order.

    ``sublayers`` are (name, sublayer) pairs; each sublayer is a module of the block under its name and keeps its
    state under the same name in the block's state (``{"attention": {...}, "ffn": {...}}``).
    """

    def __init__(self, sublayers: list[tuple[str, Sublayer]]):
        super().__init__()
        for name, sublayer in sublayers:
            self.add_module(name, sublayer)
        self.order = tuple(name for name, _ in sublayers)

    def sublayers(self) -> Iterator[tuple[str, Sublayer]]:
        """(name, sublayer) in order."""
        for name in self.order:
            yield name, cast(Sublayer, self._modules[name])

    def forward(self, h: Tensor, ctx: BlockContext, state: LayerState | None) -> tuple[Tensor, LayerState | None]:
        for name, sublayer in self.sublayers():
            h = h + sublayer(h, ctx, None if state is None else state.setdefault(name, {}))
        return h, state

    def init_state(self, batch: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
                   ) -> LayerState:
        return {name: sublayer.init_state(batch, device, dtype) for name, sublayer in self.sublayers()}


# ----------------------------------------------------------------------------------------------
# Remote code: loadable by path
# ----------------------------------------------------------------------------------------------


def remote_code_module(classes: dict[str, type]) -> str:
    """The text of ``attnfree_remote.py``: imports of the given classes from where they are defined."""
    lines = ['"""Written by attnfree: this checkpoint\'s classes, imported from the installed attnfree package',
             "(pip install attnfree). transformers loads them from here with trust_remote_code=True.", '"""', ""]
    for cls in dict.fromkeys(classes.values()):
        lines.append(f"from {cls.__module__} import {cls.__name__}  # noqa: F401")
    return "\n".join(lines) + "\n"


def auto_map(classes: dict[str, type]) -> dict[str, str]:
    """``{"AutoConfig": "attnfree_remote.XConfig", ...}`` for config.json."""
    module = REMOTE_CODE_FILE.removesuffix(".py")
    return {auto: f"{module}.{cls.__name__}" for auto, cls in classes.items()}


class RecurrentPreTrainedModel(PreTrainedModel):
    """Base of every attnfree model class: config checks at construction, initialisation, loadable checkpoints."""

    config_class: type[PreTrainedConfig]
    base_model_prefix = "model"
    supports_gradient_checkpointing = True

    def __init__(self, config: PreTrainedConfig, *args: Any, **kwargs: Any):
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, "
                            f"got a {type(config).__name__}")
        validate = getattr(config, "validate_fields", None)
        if validate is not None:  # again: a field may have been assigned after the config was built
            validate()
        super().__init__(config, *args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The one place where initialisation is dispatched: N(0, initializer_range) linear and embedding weights,
        zero biases and padding embedding, unit LayerNorms; every sublayer's own parameters by its
        ``reset_parameters``. A family extends it for modules of its own (super() first).

        Through ``transformers.initialization``, which leaves alone the tensors a checkpoint has just filled.
        """
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                init.zeros_(module.bias)
            # (the slice loses the loaded flag: check it here, as transformers' own models do)
            if (isinstance(module, nn.Embedding) and module.padding_idx is not None
                    and not getattr(module.weight, "_is_hf_initialized", False)):
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, Sublayer):
            module.reset_parameters()

    def auto_classes(self) -> dict[str, type]:
        """The classes transformers' Auto classes should build for this checkpoint."""
        classes: dict[str, type] = {"AutoConfig": type(self.config)}
        backbone = getattr(self, self.base_model_prefix, None)
        if isinstance(self, GenerationMixin):  # a causal LM: its backbone loads as AutoModel
            classes["AutoModelForCausalLM"] = type(self)
            if isinstance(backbone, PreTrainedModel):
                classes["AutoModel"] = type(backbone)
        else:
            classes["AutoModel"] = type(self)
        return classes

    def save_pretrained(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """``PreTrainedModel.save_pretrained``, plus ``auto_map`` and ``attnfree_remote.py`` (module docstring)."""
        classes = self.auto_classes()
        result = super().save_pretrained(save_directory, *args, **kwargs)
        folder = Path(save_directory)
        config_file = folder / "config.json"
        if config_file.is_file():  # (not written on processes other than the main one)
            config = json.loads(config_file.read_text())
            config["auto_map"] = auto_map(classes)
            config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            (folder / REMOTE_CODE_FILE).write_text(remote_code_module(classes))
        return result


# ----------------------------------------------------------------------------------------------
# The backbone: embeddings -> blocks -> final LayerNorm
# ----------------------------------------------------------------------------------------------


class RecurrentModel(RecurrentPreTrainedModel):
    """The shared backbone: token (+ learned position) embeddings, ``block_class`` blocks, a final LayerNorm.

    A family names its block (``block_class``) and, where it wants them, a LayerNorm on the embeddings
    (``embedding_norm``) and extra output fields (``output_class`` plus ``reports_to_outputs``). A family whose
    blocks report statistics over the whole sequence (a load-balancing loss) sets ``chunkable = False``: it always
    runs whole sequences, whatever ``sequence_chunk`` says.
    """

    block_class: ClassVar[type[RecurrentBlock]]
    embedding_norm: ClassVar[bool] = False
    chunkable: ClassVar[bool] = True
    output_class: ClassVar[type[BaseModelOutputWithPast]] = BaseModelOutputWithPast

    def __init__(self, config: RecurrentConfig):
        super().__init__(config)
        c = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.embed_positions = (nn.Embedding(c.n_positions, c.hidden_size)
                                if c.position_embedding_type == "learned" else None)
        self.embed_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps) if self.embedding_norm else None
        self.dropout = nn.Dropout(c.hidden_dropout_prob)
        self.layers = nn.ModuleList([self.make_block(c, i) for i in range(c.num_hidden_layers)])
        self.final_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def make_block(self, config: RecurrentConfig, index: int) -> RecurrentBlock:
        """Block ``index`` of the stack (the same block at every index unless a family's layers differ)."""
        return self.block_class(config)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embed_tokens = value  # type: ignore[assignment]

    # -- the cache ------------------------------------------------------------------------------------------

    def new_cache(self, batch: int, device: torch.device | None = None) -> RecurrentCache:
        """An unfilled cache for ``batch`` sequences (the blocks fill it on the first call)."""
        return RecurrentCache(len(self.layers), batch, device)

    def empty_cache(self, batch: int, device: torch.device | None = None,
                    dtype: torch.dtype = torch.float32) -> RecurrentCache:
        """A cache holding every block's empty state (``init_state``): the layout export writes."""
        cache = self.new_cache(batch, device)
        cache.layers = [layer.init_state(batch, device, dtype) for layer in self.layers]  # type: ignore[operator]
        return cache

    # -- forward --------------------------------------------------------------------------------------------

    def embed(self, input_ids: Tensor | None, inputs_embeds: Tensor | None, position_ids: Tensor) -> Tensor:
        """Token (+ learned position) embeddings, (LayerNorm,) dropout: [B, T] -> [B, T, C]."""
        h = embed_inputs(self.embed_tokens, self.embed_positions, input_ids, inputs_embeds, position_ids)
        return self.dropout(self.embed_norm(h) if self.embed_norm is not None else h)

    def run(self, input_ids: Tensor | None, inputs_embeds: Tensor | None, ctx: BlockContext,
            states: list[LayerState] | None, output_hidden_states: bool = False) -> tuple[Tensor, list[Tensor]]:
        """Embeddings, every block (reading and updating ``states[i]``), final LayerNorm -> (h [B, T, C], the
        hidden states before each block and after the last, if asked)."""
        h = self.embed(input_ids, inputs_embeds, ctx.positions)
        hidden: list[Tensor] = []
        for i, layer in enumerate(self.layers):
            if output_hidden_states:
                hidden.append(h)
            h, state = layer(h, ctx, states[i] if states is not None else None)
            if states is not None:
                states[i] = state
        h = self.final_norm(h)
        if output_hidden_states:
            hidden.append(h)
        return h, hidden

    def reports_to_outputs(self, reports: list[Any]) -> dict[str, Any]:
        """Extra output fields made of what the blocks reported (none here)."""
        return {}

    def prepare(self, input_ids: Tensor | None, attention_mask: Tensor | None, position_ids: Tensor | None,
                inputs_embeds: Tensor | None, cache: RecurrentCache | None, use_cache: bool | None) -> Inputs:
        """Check the inputs; the padding mask, the cache (a new one when caching without one) and positions."""
        return prepare_inputs(self, input_ids, attention_mask, position_ids, inputs_embeds, cache, use_cache)

    def mix(self, inputs: Inputs, output_hidden_states: bool) -> tuple[Tensor, tuple[Tensor, ...] | None, list[Any]]:
        """The token mixing: (h [B, T, C], the hidden states if asked, what the blocks reported).

        Sequences longer than ``config.sequence_chunk`` run piece by piece (``mix_in_chunks``)."""
        T, chunk = inputs.positions.shape[1], self.config.sequence_chunk
        if self.chunkable and 0 < chunk < T:
            return self.mix_in_chunks(inputs, output_hidden_states, chunk)
        ctx = BlockContext(inputs.mask, inputs.positions)
        states = inputs.cache.layers if inputs.cache is not None else None
        h, hidden = self.run(inputs.input_ids, inputs.inputs_embeds, ctx, states, output_hidden_states)
        return h, tuple(hidden) if output_hidden_states else None, ctx.reports

    def mix_in_chunks(self, inputs: Inputs, output_hidden_states: bool, chunk: int
                      ) -> tuple[Tensor, tuple[Tensor, ...] | None, list[Any]]:
        """``mix`` over positions [0, chunk), [chunk, 2 chunk), ...: each block continues from the state the
        previous piece left (the cache's states when caching, else states kept for this call), exactly as a
        prompt is prefilled in pieces; the pieces' outputs are concatenated along T."""
        states = inputs.cache.layers if inputs.cache is not None else [{} for _ in self.layers]
        pieces: list[Tensor] = []
        hidden: list[list[Tensor]] = []
        reports: list[Any] = []
        for start in range(0, inputs.positions.shape[1], chunk):
            part = slice(start, start + chunk)
            ctx = BlockContext(inputs.mask[:, part] if inputs.mask is not None else None, inputs.positions[:, part])
            ids = inputs.input_ids[:, part] if inputs.input_ids is not None else None
            embeds = inputs.inputs_embeds[:, part] if inputs.inputs_embeds is not None else None
            h, piece_hidden = self.run(ids, embeds, ctx, states, output_hidden_states)
            pieces.append(h)
            hidden.append(piece_hidden)
            reports += ctx.reports
        joined = tuple(torch.cat(layer, dim=1) for layer in zip(*hidden, strict=True)) if output_hidden_states else None
        return torch.cat(pieces, dim=1), joined, reports

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
    ) -> BaseModelOutputWithPast:
        # 1. shapes, mask, cache, positions
        check_forward_kwargs(self, kwargs)
        inputs = self.prepare(input_ids, attention_mask, position_ids, inputs_embeds,
                              resolve_cache(cache, past_key_values), use_cache)
        # 2. embeddings, blocks (each reads and updates its own state), final LayerNorm
        h, hidden, reports = self.mix(inputs, bool(output_hidden_states))
        # 3. count the tokens the cache has now seen; the cache field is named as the installed transformers'
        # generate() reads it (models.compat)
        if inputs.cache is not None:
            inputs.cache.advance(inputs.real)
        return self.output_class(last_hidden_state=h, **cache_kwargs(inputs.cache), hidden_states=hidden,
                                 **self.reports_to_outputs(reports))


# ----------------------------------------------------------------------------------------------
# The causal LM: backbone + tied head, loss, generation
# ----------------------------------------------------------------------------------------------


class RecurrentGenerationMixin:
    """Generation hooks for models whose cache is a ``RecurrentCache`` (not a growing KV cache)."""

    config: Any

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # we build our own RecurrentCache at prefill

    def prepare_inputs_for_generation(
        self,
        input_ids: Tensor,
        cache: RecurrentCache | None = None,
        attention_mask: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        use_cache: bool | None = None,
        past_key_values: RecurrentCache | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Prefill with the whole prompt, then feed only the newest token: its state carries the rest.

        ``generate`` passes the cache as ``cache`` (transformers >= 5.24) or ``past_key_values`` (before); the
        model's forward takes it under ``cache``.
        """
        cache = resolve_cache(cache, past_key_values)
        if cache is not None and cache.steps:
            return {"input_ids": input_ids[:, -1:], "cache": cache, "use_cache": True}
        # (a step returns one position's logits anyway)
        inputs: dict[str, Any] = {"attention_mask": attention_mask, "cache": cache,
                                  "use_cache": use_cache if use_cache is not None else True}
        if kwargs.get("logits_to_keep"):  # prefill: generate only needs the last position's logits
            inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        if inputs_embeds is not None and input_ids.shape[1] == 0:
            inputs["inputs_embeds"] = inputs_embeds
        else:
            inputs["input_ids"] = input_ids
        return inputs


_STANDARD_OUTPUTS = {"loss", "logits", "cache", "past_key_values", "hidden_states", "attentions"}


def _tracing() -> bool:
    """Inside torch.compile, an ONNX export or a jit trace (where the decoding head's cached copy must not enter
    the graph as a second constant copy of the weight)."""
    return torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()


def decode_head(head: nn.Linear, h: Tensor) -> Tensor:
    """``head(h)`` through a [C, V] contiguous copy of the head's [V, C] weight, made on first use and again whenever
    the weight changes (its storage, version counter or dtype); kept in the module's ``__dict__``, not as a
    parameter or buffer, so it is never saved. Why: on a CPU, F.linear at batch 1 reads a [V, C] weight several
    times slower than a matmul reads [C, V] (measured in docs/performance.md, decoding); at batch 16 they are level.
    Costs one more copy of the head's weight in memory while decoding."""
    w = head.weight
    key = (w.data_ptr(), w._version, w.dtype, tuple(w.shape))
    cached = head.__dict__.get("_decode_weight")
    if cached is None or cached[0] != key:
        cached = (key, w.detach().t().contiguous())
        head.__dict__["_decode_weight"] = cached
    out = h @ cached[1]
    return out + head.bias if head.bias is not None else out


# our prepare_inputs_for_generation takes fewer arguments than GenerationMixin's, hence the ignore
class RecurrentForCausalLM(RecurrentGenerationMixin, RecurrentPreTrainedModel, GenerationMixin):  # type: ignore[misc]
    """Backbone + tied LM head; the loss shifts labels inside, like GPT-2.

    A family names its backbone (``backbone_class``) and, where it wants them, a bias on the head (``head_bias``),
    a term added to the training loss (``extra_loss``) and extra output fields (``output_class``: every field of
    it that the backbone's output has is passed on).
    """

    backbone_class: ClassVar[type[RecurrentPreTrainedModel]]
    head_bias: ClassVar[bool] = False
    output_class: ClassVar[type[CausalLMOutputWithPast]] = CausalLMOutputWithPast
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: PreTrainedConfig):
        super().__init__(config)
        self.model = self.backbone_class(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=self.head_bias)
        # the output fields passed on from the backbone's output (read here: dataclass fields break torch.compile)
        self.extra_outputs = tuple(f.name for f in fields(self.output_class) if f.name not in _STANDARD_OUTPUTS)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()  # type: ignore[return-value]

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def compute_logits(self, h: Tensor) -> Tensor:
        """h [..., C] -> logits [..., V]. One position on a CPU without autograd (a decoding step) goes through
        ``decode_head``."""
        plain = isinstance(getattr(self.lm_head, "weight", None), Tensor)  # not a quantized head (weight())
        if plain and h.shape[-2] == 1 and h.device.type == "cpu" and not torch.is_grad_enabled() and not _tracing():
            return decode_head(self.lm_head, h)
        return self.lm_head(h)

    def extra_loss(self, out: Any) -> Tensor | None:
        """A term added to the training loss (e.g. load balancing); none here."""
        return None

    def lm_loss(self, logits: Tensor, labels: Any, attention_mask: Any, num_items_in_batch: Tensor | int | None
                ) -> Tensor:
        """Next-token cross-entropy of logits [B, T, V] against labels [B, T] (``causal_lm_loss``), with the
        config's label smoothing in training only."""
        smoothing = self.config.label_smoothing if self.training else 0.0  # never at evaluation
        return causal_lm_loss(logits, labels, attention_mask, smoothing, num_items_in_batch)

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
    ) -> CausalLMOutputWithPast:
        check_forward_kwargs(self, kwargs)
        out = self.model(input_ids, attention_mask, position_ids, inputs_embeds, resolve_cache(cache, past_key_values),
                         use_cache, output_hidden_states)
        h = out.last_hidden_state if not logits_to_keep else out.last_hidden_state[..., -logits_to_keep:, :]
        logits = self.compute_logits(h)  # [B, T, V]
        loss = None
        if labels is not None:
            loss = self.lm_loss(logits, labels, attention_mask, num_items_in_batch)
            extra = self.extra_loss(out) if self.training else None
            loss = loss + extra if extra is not None else loss
        extras = {name: getattr(out, name) for name in self.extra_outputs if hasattr(out, name)}
        return self.output_class(loss=loss, logits=logits, **cache_kwargs(output_cache(out)),
                                 hidden_states=out.hidden_states, **extras)
