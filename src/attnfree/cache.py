"""Recurrent state for ``generate()``: one small, fixed-size state per layer, whatever the context length.

Unlike a KV cache, nothing here grows with the number of tokens seen: a Fastformer layer keeps two
additive-pooling states ([B, H, D] + [B, H] + [B, H] each) and, with convolution, the last K-1 inputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from attnfree.ops.correlation.state import CorrelationState


def _align_rings(state: CorrelationState, seen: int) -> CorrelationState:
    """The same state relabelled so that its next position is ``seen``: every ring [B, capacity, ...] rolls by
    (seen - state.seen) along dim 1, since the slot of position p is p % capacity. Slots never written stay
    invalid, so a sequence that started later still sees nothing before its start."""
    shift = seen - state.seen

    def roll(t: Tensor) -> Tensor:
        return torch.roll(t, shifts=shift % t.shape[1], dims=1)

    return CorrelationState(roll(state.q), roll(state.k), roll(state.v), roll(state.valid), seen)


def _concat_states(items: list[Any]) -> Any:
    """Concatenate same-structured states along the batch dim 0 (tensors, NamedTuples, dataclasses, dicts)."""
    first = items[0]
    if isinstance(first, Tensor):
        return torch.cat(items, dim=0)
    if isinstance(first, CorrelationState):  # rings of different streams must agree on the slot of a position
        seen = max(s.seen for s in items)
        items = [_align_rings(s, seen) for s in items]
    if dataclasses.is_dataclass(first) and not isinstance(first, type):
        values = {f.name: _concat_states([getattr(s, f.name) for s in items])
                  for f in dataclasses.fields(first) if f.init}
        return dataclasses.replace(first, **values)
    if isinstance(first, dict):
        if any(d.keys() != first.keys() for d in items):
            raise ValueError(f"cannot concatenate states with different keys: {[sorted(d) for d in items]}")
        return {k: _concat_states([d[k] for d in items]) for k in first}
    if isinstance(first, (tuple, list)):
        parts = [_concat_states([s[j] for s in items]) for j in range(len(first))]
        return type(first)(*parts) if hasattr(first, "_fields") else type(first)(parts)
    if any(s != first for s in items):  # e.g. an int counter: it has to be shared by every row
        raise ValueError(f"cannot concatenate states whose non-tensor values differ: {items}")
    return first


def _map_tensors(obj: Any, fn) -> Any:
    """Apply fn to every tensor inside nested tuples / NamedTuples / dicts / lists / dataclass instances."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):  # e.g. CorrelationState
        changes = {f.name: _map_tensors(getattr(obj, f.name), fn) for f in dataclasses.fields(obj) if f.init}
        return dataclasses.replace(obj, **changes)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # NamedTuple
        return type(obj)(*(_map_tensors(v, fn) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


class RecurrentCache:
    """Per-layer recurrent states plus the number of real (non-padding) tokens seen per sequence.

    ``layers[i]`` is a dict of named states owned by layer i (e.g. ``{"query": AdditiveState, ...}``);
    ``seen_tokens``: [B] long, used to continue position ids after a left-padded prompt.
    """

    is_compileable = False

    def __init__(self, num_layers: int, batch_size: int, device: torch.device | None = None):
        self.layers: list[dict[str, Any]] = [{} for _ in range(num_layers)]
        self.seen_tokens = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.steps = 0  # forward calls that updated this cache (0 = not prefilled yet)

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

    def reorder_cache(self, beam_idx: Tensor) -> None:
        """Beam search: keep the states of the chosen beams, in place of the old batch order."""
        chosen = self.select(beam_idx)
        self.layers, self.seen_tokens = chosen.layers, chosen.seen_tokens

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Expand each sequence's state to ``repeats`` copies (num_return_sequences / beams after prefill)."""
        self.layers = [_map_tensors(d, lambda t: t.repeat_interleave(repeats, dim=0)) for d in self.layers]
        self.seen_tokens = self.seen_tokens.repeat_interleave(repeats, dim=0)

    def select(self, rows: Sequence[int] | Tensor) -> RecurrentCache:
        """A new cache holding only the given batch rows, in that order (the states are copied)."""
        index = torch.as_tensor(rows, dtype=torch.long, device=self.seen_tokens.device)
        out = RecurrentCache(len(self.layers), 0, self.seen_tokens.device)
        out.layers = [_map_tensors(d, lambda t: t.index_select(0, index.to(t.device))) for d in self.layers]
        out.seen_tokens = self.seen_tokens.index_select(0, index)
        out.steps = self.steps
        return out

    @staticmethod
    def concat(caches: Sequence[RecurrentCache]) -> RecurrentCache:
        """One cache whose batch rows are those of ``caches`` in order: continuous batching joins streams
        that were prefilled apart (with different numbers of tokens seen) into one decoding batch.

        Ring buffers indexed by absolute position (Leviathan's CorrelationState, with a scalar ``seen``) are
        first rolled to a common ``seen``: each row keeps its own history and its own ``seen_tokens``."""
        if not caches:
            raise ValueError("concat needs at least one cache")
        depth = {len(c.layers) for c in caches}
        if len(depth) != 1:
            raise ValueError(f"cannot concatenate caches with different numbers of layers: {sorted(depth)}")
        if any(c.steps == 0 for c in caches):
            raise ValueError("cannot concatenate a cache that was never prefilled (steps == 0)")
        out = RecurrentCache(len(caches[0].layers), 0, caches[0].seen_tokens.device)
        out.layers = [_concat_states([c.layers[i] for c in caches]) for i in range(len(out.layers))]
        out.seen_tokens = torch.cat([c.seen_tokens for c in caches])
        out.steps = max(c.steps for c in caches)
        return out

    def nbytes(self) -> int:
        """Bytes held by all states: constant in the number of tokens generated."""
        total = [0]

        def add(t: Tensor) -> Tensor:
            total[0] += t.numel() * t.element_size()
            return t

        _map_tensors(self.layers, add)
        return total[0] + self.seen_tokens.numel() * self.seen_tokens.element_size()
