"""Exact prefix-state caching: the recurrent state after a prompt prefix, kept for the requests that share it.

A recurrent model's state after any prefix is a few KiB, whatever the prefix's length, so the server can keep the
states of recent prompts, and of the points where prompts diverged, and start a request that shares a prefix with
an earlier one from that state: it prefills only its new tokens. Matching is token-exact and at any length (no
blocks of hundreds of tokens, as a KV-cache server needs); a prompt is never served entirely from the cache (its
last token is always run, which gives the logits of the first new token). Memory is bounded by a byte budget
with least-recently-used eviction.

The engine asks three things: ``lookup`` (the longest cached prefix of a prompt, and a copy of its state),
``branch_point`` (the longest prefix the prompt shares with any cached prompt: where its state is worth keeping),
and ``insert``.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from attnfree.inference.serve.backend import State


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two 1-D token arrays."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


class PrefixCache:
    """States of token prefixes, least recently used evicted first, within ``max_bytes`` (0 disables the cache)."""

    def __init__(self, max_bytes: int):
        if not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be an integer >= 0, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self._entries: collections.OrderedDict[tuple[int, ...], tuple[np.ndarray, State, int]] = (
            collections.OrderedDict())
        self._lock = threading.Lock()
        self.bytes = 0
        self.counters = {"lookups": 0, "hits": 0, "tokens_saved": 0, "inserts": 0, "evictions": 0}

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def lookup(self, tokens: Sequence[int]) -> tuple[int, State | None]:
        """(n, a copy of the state after tokens[:n]) for the longest cached prefix with n < len(tokens); (0, None)."""
        with self._lock:
            self.counters["lookups"] += 1
            if not self.enabled or len(tokens) < 2:
                return 0, None
            query = np.asarray(tokens, dtype=np.int64)
            best: tuple[int, ...] | None = None
            for key, (array, _, _) in self._entries.items():
                n = len(key)
                if n < len(query) and (best is None or n > len(best)) and common_prefix(array, query) == n:
                    best = key
            if best is None:
                return 0, None
            self._entries.move_to_end(best)
            self.counters["hits"] += 1
            self.counters["tokens_saved"] += len(best)
            return len(best), self._entries[best][1].select([0])  # a copy: decoding updates states in place

    def branch_point(self, tokens: Sequence[int]) -> int:
        """The longest prefix ``tokens`` shares with any cached prompt (at most len(tokens) - 1)."""
        with self._lock:
            if not self.enabled or len(tokens) < 2:
                return 0
            query = np.asarray(tokens, dtype=np.int64)
            longest = max((common_prefix(array, query) for array, _, _ in self._entries.values()), default=0)
            return min(longest, len(tokens) - 1)

    def insert(self, tokens: Sequence[int], state: State) -> None:
        """Keep (a copy of) the one-sequence ``state`` after ``tokens``; evict the least recently used to fit."""
        key = tuple(int(t) for t in tokens)
        with self._lock:
            if not self.enabled or not key or key in self._entries:
                return
            copy = state.select([0])
            size = copy.nbytes() + 8 * len(key)
            if size > self.max_bytes:
                return
            while self.bytes + size > self.max_bytes and self._entries:
                _, (_, _, freed) = self._entries.popitem(last=False)
                self.bytes -= freed
                self.counters["evictions"] += 1
            self._entries[key] = (np.asarray(key, dtype=np.int64), copy, size)
            self.bytes += size
            self.counters["inserts"] += 1

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"prefix_cache_entries": len(self._entries), "prefix_cache_bytes": self.bytes,
                    "prefix_cache_max_bytes": self.max_bytes,
                    **{f"prefix_cache_{k}": v for k, v in self.counters.items()}}
