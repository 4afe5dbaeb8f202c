"""Incremental detokenisation (``IncrementalDecoder``): text deltas from token ids, never a split UTF-8 character.

Imports no torch: the decoding loop (``inference.decoding``) and the server (``inference.serve``, which serves an
ONNX export without torch) share it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Decodes(Protocol):
    def decode(self, ids: Sequence[int]) -> str: ...


class IncrementalDecoder:
    """Turns token ids into text deltas without splitting a UTF-8 character, at O(window) cost per token.

    Decodes ``ids[prefix:]`` and ``ids[prefix:read]`` (the window since the last emission) and emits the
    difference; text ending in U+FFFD (an incomplete character) is held back until a later token completes
    it, or until ``flush``. The concatenated deltas equal ``tokenizer.decode(ids)``. Only the window's ids are
    kept, so a long stream holds no growing token list here.
    """

    def __init__(self, tokenizer: Decodes):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the decode window
        self.read = 0  # ids before this one have been emitted

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        after = self.tokenizer.decode(self.ids[self.prefix:])
        if after.endswith("\ufffd") or len(after) <= len(before):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        del self.ids[:self.prefix]  # ids before the window are never decoded again: O(window) memory too
        self.prefix, self.read = 0, self.read - self.prefix
        return after[len(before):]

    def flush(self) -> str:
        """Whatever is held back (e.g. an incomplete character at the end), once no token will follow."""
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        after = self.tokenizer.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):]
