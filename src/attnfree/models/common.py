"""Functions the shell (``models.base``) is made of: input checks, position ids, the loss, the cache arguments."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from attnfree.models.cache import RecurrentCache


def check_input_ids(input_ids: Tensor, vocab_size: int) -> None:
    """Raise ValueError for empty input or token ids outside [0, vocab_size)."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
    if input_ids.numel() == 0:
        raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}): give at least one token")
    if torch.compiler.is_compiling():  # reading values would break the graph; inductor bounds-checks the lookup
        return
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab_size})")


def padding_mask(attention_mask: Tensor | None) -> Tensor | None:
    """[B, T] bool (True = real token), or None when nothing is padded (the mask-free path is faster).

    Under torch.compile the all-ones test would read tensor data (a graph break), so a given mask is kept:
    masking with an all-True mask gives exactly the mask-free values, so the result is the same either way.
    """
    if attention_mask is None:
        return None
    if not torch.compiler.is_compiling() and bool(attention_mask.all()):
        return None
    return attention_mask.bool()


def position_ids_from_mask(mask: Tensor | None, B: int, T: int, cache: RecurrentCache | None, device) -> Tensor:
    """Positions counting real tokens only, so a left-padded prompt starts at 0. [B, T] long."""
    if mask is None:
        pos = torch.arange(T, device=device).expand(B, T)
    else:
        pos = (mask.long().cumsum(-1) - 1).clamp_min(0)
    if cache is not None and cache.steps:
        pos = pos + cache.seen_tokens.to(device).unsqueeze(-1)
    return pos


def check_positions(position_ids: Tensor, n_positions: int) -> None:
    """Raise ValueError for a position beyond the learned table (skipped while torch.compile traces)."""
    if torch.compiler.is_compiling():
        return
    top = int(position_ids.max())
    if top >= n_positions:
        raise ValueError(
            f"position {top} is beyond the model's n_positions={n_positions} (learned position embeddings): "
            f"shorten the input, or use position_embedding_type='none' for unbounded decoding"
        )


def embed_inputs(
    embed_tokens: torch.nn.Embedding,
    embed_positions: torch.nn.Embedding | None,
    input_ids: Tensor | None,
    inputs_embeds: Tensor | None,
    position_ids: Tensor,
) -> Tensor:
    """Token embeddings (checked ids) plus learned position embeddings (checked positions): [B, T, C]."""
    if inputs_embeds is None:
        assert input_ids is not None
        check_input_ids(input_ids, embed_tokens.num_embeddings)
        inputs_embeds = embed_tokens(input_ids)
    if embed_positions is not None:
        check_positions(position_ids, embed_positions.num_embeddings)
        inputs_embeds = inputs_embeds + embed_positions(position_ids)
    return inputs_embeds


def causal_lm_loss(
    logits: Tensor,
    labels: Tensor,
    attention_mask: Tensor | None,
    label_smoothing: float,
    num_items_in_batch: Tensor | int | None = None,
) -> Tensor:
    """Next-token cross-entropy: logits [B, T, V] at t predict labels [B, T] at t+1.

    Labels equal to -100 and positions where attention_mask is 0 are ignored (a masked copy; the
    caller's tensor is untouched). With ``num_items_in_batch`` (from transformers.Trainer under gradient
    accumulation) the summed loss is divided by that count instead of this batch's.

    The labels are shifted (padded with -100 at the end), not the logits: slicing [B, T, V] logits would copy
    them in forward and zero-fill plus copy their gradient in backward, the largest tensors of a training step.
    """
    if attention_mask is not None:
        labels = labels.masked_fill(attention_mask == 0, -100)
    shift_logits = logits.float().reshape(-1, logits.shape[-1])  # [B*T, V] (a view for float32 logits)
    shift_labels = F.pad(labels[:, 1:], (0, 1), value=-100).reshape(-1).to(logits.device)  # [B*T]
    if num_items_in_batch is None:
        return F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, label_smoothing=label_smoothing)
    total = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, label_smoothing=label_smoothing,
                            reduction="sum")
    if isinstance(num_items_in_batch, Tensor):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


# Keyword arguments that transformers' callers (generate, pipelines, evaluation harnesses) may pass to a forward and
# that change nothing for a recurrent model. Any other unknown keyword is a TypeError: silently dropping one is how a
# renamed cache argument once made every decoding step re-read the whole prefix.
IGNORED_FORWARD_KWARGS = frozenset({"return_dict", "cache_position", "output_attentions"})


def check_forward_kwargs(model: Any, kwargs: dict[str, Any]) -> None:
    """Reject what a forward would otherwise drop: unknown keywords, and a request for attention weights."""
    unknown = sorted(set(kwargs) - IGNORED_FORWARD_KWARGS)
    if unknown:
        raise TypeError(f"{type(model).__name__}.forward() got unexpected keyword argument(s) {', '.join(unknown)}")
    if kwargs.get("output_attentions"):
        raise ValueError(f"{type(model).__name__} has no attention weights to output (output_attentions=True)")


def resolve_cache(cache: Any, past_key_values: Any) -> RecurrentCache | None:
    """The recurrent cache given as ``cache=`` (transformers >= 5.24) or ``past_key_values=`` (its older name).

    Both at once, or anything that is not a ``RecurrentCache``, is an error rather than a cache silently ignored.
    """
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("give the recurrent cache once, as cache= or as past_key_values= (its older name), not both")
    given = cache if cache is not None else past_key_values
    if given is not None and not isinstance(given, RecurrentCache):
        raise TypeError(f"the cache must be the RecurrentCache a previous call returned (use_cache=True), "
                        f"got {type(given).__name__}")
    return given
