"""Recurrent state for ``generate()``: one small, fixed-size state per layer, whatever the context length.

Unlike a KV cache, nothing here grows with the number of tokens seen: a Fastformer layer keeps two
additive-pooling states ([B, H, D] + [B, H] + [B, H] each) and, with convolution, the last K-1 inputs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor


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
        self.layers = [_map_tensors(d, lambda t: t.index_select(0, beam_idx.to(t.device))) for d in self.layers]
        self.seen_tokens = self.seen_tokens.index_select(0, beam_idx.to(self.seen_tokens.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Expand each sequence's state to ``repeats`` copies (num_return_sequences / beams after prefill)."""
        self.layers = [_map_tensors(d, lambda t: t.repeat_interleave(repeats, dim=0)) for d in self.layers]
        self.seen_tokens = self.seen_tokens.repeat_interleave(repeats, dim=0)

    def nbytes(self) -> int:
        """Bytes held by all states: constant in the number of tokens generated."""
        total = [0]

        def add(t: Tensor) -> Tensor:
            total[0] += t.numel() * t.element_size()
            return t

        _map_tensors(self.layers, add)
        return total[0] + self.seen_tokens.numel() * self.seen_tokens.element_size()
