"""The seam between the serving engine and what runs the model: a ``Backend`` of a few calls.

The engine schedules, streams, stops, caches prefixes and batches; a backend only computes. Its calls:

- ``prefill(rows, start)``: token rows -> (last-position logits [B, V], the state after them). Fresh rows (start
  None) may differ in length: they are left-padded (the models give a padded row exactly its own values). Rows that
  continue a state ``start`` all have the same length.
- ``step(tokens, state)``: one token per row -> (logits [B, V], new state).
- the state's tree operations: ``state.select(rows)`` (a copy of some rows), ``state.nbytes()``, and
  ``backend.concat(states)`` (rows of several states, in order);
- sampling: ``generator(seed)`` (one per stream, so a stream's draws never depend on its company) and
  ``sample(logits, samplings, generators)``;
- ``info()`` for /info, ``context_limit``, ``state_bytes()`` (one stream's state, constant), ``worker()`` (the context
  the engine's thread runs in).

Two backends: ``torch_backend.TorchBackend`` (an attnfree model; its states are ``RecurrentCache``s) and
``onnx_backend.OnnxBackend`` (an ``attnfree export`` folder run by onnxruntime; its states are numpy arrays in the
manifest's order; it never imports torch). This module imports neither. Glossary: B batch, V vocabulary.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Protocol

from attnfree.inference.sampling_options import Sampling


class State(Protocol):
    """A batch of recurrent states, batch first."""

    def select(self, rows: Sequence[int]) -> Any: ...

    def nbytes(self) -> int: ...


class Tokenizer(Protocol):
    """What the server needs of a tokenizer (``attnfree.data.TextTokenizer`` has it; so does an export's)."""

    name: str
    vocab_size: int
    pad_token_id: int
    bos_token_id: int
    eos_token_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class Backend(ABC):
    """Runs one model for the engine (see the module docstring)."""

    kind: str  # "torch" | "onnx"
    context_limit: int | None  # the model's position limit (learned positions), None without one

    @abstractmethod
    def prefill(self, rows: Sequence[Sequence[int]], start: Any | None) -> tuple[Any, Any]:
        """Token rows (left-padded here when fresh; equal lengths when continuing ``start``) -> (logits [B, V],
        state)."""

    @abstractmethod
    def step(self, tokens: Sequence[int], state: Any) -> tuple[Any, Any]:
        """tokens [B] and their state -> (logits [B, V], the new state)."""

    @abstractmethod
    def concat(self, states: Sequence[Any]) -> Any:
        """The rows of ``states``, in order, as one state."""

    @abstractmethod
    def generator(self, seed: int) -> Any:
        """A random generator of one stream."""

    @abstractmethod
    def sample(self, logits: Any, samplings: Sequence[Sampling], generators: Sequence[Any]) -> list[int]:
        """logits [B, V] -> the next token of each row, row b as samplings[b] says, with generators[b]."""

    @abstractmethod
    def info(self) -> dict[str, Any]:
        """model_type, parameters, dtype and backend, for /info."""

    def state_bytes(self, bos_token_id: int) -> int:
        """Bytes of one stream's state (the same after any number of tokens)."""
        return int(self.prefill([[bos_token_id]], None)[1].nbytes())

    def worker(self) -> contextlib.AbstractContextManager[Any]:
        """The context the engine's worker thread runs in."""
        return contextlib.nullcontext()
