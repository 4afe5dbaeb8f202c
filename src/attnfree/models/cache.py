"""Recurrent state for ``generate()``, serving and export: one small, fixed-size state per layer.

Unlike a KV cache, nothing here grows with the number of tokens seen. ``layers[i]`` is the state of block i: a dict
of named states, each a tensor or a tree of tensors (NamedTuple, dataclass, dict, list) whose first axis is the
batch, one entry per sublayer, e.g. ``{"attention": {"query": AdditiveState, "key": AdditiveState},
"conv": {"inputs": Tensor}}``. That is the whole contract: because every leaf is batch-first, selecting, reordering,
repeating and concatenating streams, and flattening the state into named tensors for an exported graph, are the
same few tree operations for every family.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor


def tree_map(obj: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """Apply fn to every tensor inside nested tuples / NamedTuples / dicts / lists / dataclass instances."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: tree_map(getattr(obj, f.name), fn) for f in dataclasses.fields(obj) if f.init}
        return dataclasses.replace(obj, **changes)
    if isinstance(obj, dict):  # in key order: the order a state was filled in must not matter
        return {k: tree_map(obj[k], fn) for k in sorted(obj)}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # NamedTuple
        return type(obj)(*(tree_map(v, fn) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(tree_map(v, fn) for v in obj)
    return obj


def tree_leaves(obj: Any, prefix: str = "") -> Iterator[tuple[str, Tensor]]:
    """(dotted name, tensor) for every tensor in ``obj``, in a fixed order (fields, sorted keys, indices)."""
    join = (lambda key: f"{prefix}.{key}") if prefix else (lambda key: str(key))
    if isinstance(obj, Tensor):
        yield prefix, obj
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            if f.init:
                yield from tree_leaves(getattr(obj, f.name), join(f.name))
    elif isinstance(obj, tuple) and hasattr(obj, "_fields"):
        for name, value in zip(obj._fields, obj, strict=True):
            yield from tree_leaves(value, join(name))
    elif isinstance(obj, dict):  # in key order, as tree_map
        for key in sorted(obj):
            yield from tree_leaves(obj[key], join(key))
    elif isinstance(obj, (tuple, list)):
        for i, value in enumerate(obj):
            yield from tree_leaves(value, join(i))


def tree_replace(template: Any, tensors: Iterator[Tensor]) -> Any:
    """``template`` with its tensors replaced, in ``tree_leaves`` order, by the next ones of ``tensors``."""
    return tree_map(template, lambda _: next(tensors))


def tree_concat(items: list[Any]) -> Any:
    """Same-structured states concatenated along the batch (axis 0); other values must agree."""
    first = items[0]
    if isinstance(first, Tensor):
        return torch.cat(items, dim=0)
    if dataclasses.is_dataclass(first) and not isinstance(first, type):
        values = {f.name: tree_concat([getattr(s, f.name) for s in items])
                  for f in dataclasses.fields(first) if f.init}
        return dataclasses.replace(first, **values)
    if isinstance(first, dict):
        if any(d.keys() != first.keys() for d in items):
            raise ValueError(f"cannot concatenate states with different keys: {[sorted(d) for d in items]}")
        return {k: tree_concat([d[k] for d in items]) for k in first}
    if isinstance(first, (tuple, list)):
        parts = [tree_concat([s[j] for s in items]) for j in range(len(first))]
        return type(first)(*parts) if hasattr(first, "_fields") else type(first)(parts)
    if any(s != first for s in items):
        raise ValueError(f"cannot concatenate states whose non-tensor values differ: {items}")
    return first


POSITIONS = "positions"  # the flat name of ``seen_tokens``


class RecurrentCache:
    """Per-layer recurrent states plus the number of real (non-padding) tokens seen per sequence.

    ``layers[i]``: the state of block i (see the module docstring); ``seen_tokens``: [B] long, used to continue
    position ids after a left-padded prompt; ``steps``: forward calls that updated the cache (0 = not prefilled).
    """

    is_compileable = False

    def __init__(self, num_layers: int, batch_size: int, device: torch.device | str | None = None):
        self.layers: list[dict[str, Any]] = [{} for _ in range(num_layers)]
        self.seen_tokens = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.steps = 0

    @property
    def batch_size(self) -> int:
        return int(self.seen_tokens.shape[0])

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Longest number of real tokens seen by any sequence (for HF utilities that ask)."""
        return int(self.seen_tokens.max().item()) if self.steps else 0

    def advance(self, mask: Tensor) -> None:
        """Record a forward over T new positions; mask: [B, T] (1 = real token)."""
        self.seen_tokens += mask.long().sum(-1)
        self.steps += 1

    def _with(self, layers: list[dict[str, Any]], seen_tokens: Tensor, steps: int) -> RecurrentCache:
        out = RecurrentCache(0, 0, seen_tokens.device)
        out.layers, out.seen_tokens, out.steps = layers, seen_tokens, steps
        return out

    # -- batch rows: serving joins and drops streams, beam search reorders them -----------------------------

    def select(self, rows: Sequence[int] | Tensor) -> RecurrentCache:
        """A new cache holding only the given batch rows, in that order (the states are copied)."""
        index = torch.as_tensor(rows, dtype=torch.long, device=self.seen_tokens.device)
        layers = [tree_map(d, lambda t: t.index_select(0, index.to(t.device))) for d in self.layers]
        return self._with(layers, self.seen_tokens.index_select(0, index), self.steps)

    def reorder_cache(self, beam_idx: Tensor) -> None:
        """Beam search: keep the states of the chosen beams, in place of the old batch order."""
        chosen = self.select(beam_idx)
        self.layers, self.seen_tokens = chosen.layers, chosen.seen_tokens

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Expand each sequence's state to ``repeats`` copies (num_return_sequences / beams after prefill)."""
        self.layers = [tree_map(d, lambda t: t.repeat_interleave(repeats, dim=0)) for d in self.layers]
        self.seen_tokens = self.seen_tokens.repeat_interleave(repeats, dim=0)

    @staticmethod
    def concat(caches: Sequence[RecurrentCache]) -> RecurrentCache:
        """One cache whose batch rows are those of ``caches`` in order: continuous batching joins streams that were
        prefilled apart (with different numbers of tokens seen) into one decoding batch."""
        if not caches:
            raise ValueError("concat needs at least one cache")
        depth = {len(c.layers) for c in caches}
        if len(depth) != 1:
            raise ValueError(f"cannot concatenate caches with different numbers of layers: {sorted(depth)}")
        if any(c.steps == 0 for c in caches):
            raise ValueError("cannot concatenate a cache that was never prefilled (steps == 0)")
        layers = [tree_concat([c.layers[i] for c in caches]) for i in range(depth.pop())]
        return caches[0]._with(layers, torch.cat([c.seen_tokens for c in caches]), max(c.steps for c in caches))

    # -- flat, named tensors: the state an exported graph takes and returns ---------------------------------

    def flatten(self) -> list[tuple[str, Tensor]]:
        """Every state tensor with its name (``layers.<i>.<sublayer>.<key>.<field>``), then ``positions``."""
        named = [leaf for i, d in enumerate(self.layers) for leaf in tree_leaves(d, f"layers.{i}")]
        return [*named, (POSITIONS, self.seen_tokens)]

    def with_tensors(self, tensors: Sequence[Tensor]) -> RecurrentCache:
        """A cache of this structure holding ``tensors`` (in ``flatten`` order) instead, counted as prefilled."""
        expected = len(self.flatten())
        if len(tensors) != expected:
            raise ValueError(f"this cache holds {expected} tensors, got {len(tensors)}")
        it = iter(tensors)
        layers = [tree_replace(d, it) for d in self.layers]
        return self._with(layers, next(it), max(self.steps, 1))

    def nbytes(self) -> int:
        """Bytes held by all states: constant in the number of tokens generated."""
        return sum(t.numel() * t.element_size() for _, t in self.flatten())
