"""The one interface every sublayer shares (token mixers, convolution, feed-forward blocks, mixture of experts).

A sublayer maps the residual stream to a branch that its block adds back, ``h = h + sublayer(h, ctx, state)``:

- ``forward(x [B, T, C], ctx, state) -> y [B, T, C]`` for training, prefill and the one-token step alike;
  ``ctx`` (``BlockContext``) holds what every sublayer of one forward reads: the padding mask, the positions, and
  ``reports`` where a sublayer leaves statistics (the mixture of experts' routing) instead of returning them;
  ``state`` is this sublayer's own dict (None when nothing is cached): empty before the first call, which fills it,
  then continued by every later call. ``stateful`` is the one helper that picks the step or the parallel form and
  writes the new state back.
- ``init_state(batch, device, dtype) -> dict``: the state of a sequence that has seen nothing (empty when the
  sublayer keeps none); what an export writes as the empty state.
- ``reset_parameters()``: its own initial values (the shell calls it for every sublayer; linear, embedding and
  LayerNorm weights are the shell's). Written with ``transformers.initialization``, which leaves alone the tensors a
  checkpoint has just filled.

Shapes: B batch, T time, C width.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor, nn


@dataclass
class BlockContext:
    """What every sublayer of one forward reads besides its input and its state.

    mask: [B, T] bool, True = real token; None when nothing is padded (the faster mask-free paths).
    positions: [B, T] long, the real-token index of each position (left padding starts at 0).
    reports: what sublayers report beside their output, collected for the model's output (e.g. routing statistics).
    """

    mask: Tensor | None
    positions: Tensor
    reports: list[Any] = field(default_factory=list)

    @property
    def last_mask(self) -> Tensor | None:
        """The mask of the last position, [B] (a one-token step's), or None."""
        return None if self.mask is None else self.mask[:, -1]


SublayerState = dict[str, Any]


class Sublayer(nn.Module):
    """Base of every sublayer: ``forward(x, ctx, state) -> y``, ``init_state``, ``reset_parameters``."""

    def forward(self, x: Tensor, ctx: BlockContext, state: SublayerState | None = None) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define forward(x, ctx, state)")

    def init_state(self, batch: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
                   ) -> SublayerState:
        """Nothing seen: empty for a sublayer that keeps no state."""
        return {}

    def reset_parameters(self) -> None:
        """Initial values of this sublayer's own parameters (none here)."""


# ----------------------------------------------------------------------------------------------
# One state dispatch: step on one token with a state, else the parallel form; write the state back
# ----------------------------------------------------------------------------------------------

S = TypeVar("S")
PATHS = ("auto", "parallel", "step", "sparse", "dense")
_forced = ["auto"]


@contextlib.contextmanager
def use_path(path: str) -> Iterator[None]:
    """For tests: force the path sublayers take. "parallel" or "step" for stateful sublayers (``stateful``), "sparse"
    or "dense" for the mixture of experts; "auto" lets each choose. Restored on exit."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    previous, _forced[0] = _forced[0], path
    try:
        yield
    finally:
        _forced[0] = previous


def forced_path() -> str:
    """The path ``use_path`` forces now ("auto" when none)."""
    return _forced[0]


def stateful(state: SublayerState | None, key: str, T: int, step: Callable[[S], tuple[Tensor, S]],
             parallel: Callable[[S | None, bool], tuple[Tensor, S | None]]) -> Tensor:
    """Run a stateful op and keep its state under ``state[key]``.

    One position with a state there: ``step(previous)`` (the recurrent form, O(1) in the context); otherwise
    ``parallel(previous or None, keep)``, continuing from the previous state if any and returning the final state
    when ``keep`` (caching). ``use_path`` forces either (a forced step still needs one position and a state).
    """
    previous = state.get(key) if state is not None else None
    path = forced_path()
    new: S | None
    if path == "step" or (path == "auto" and previous is not None and T == 1):
        if previous is None or T != 1:
            raise ValueError(f"the step path needs one position and a state under {key!r}, got T={T}, "
                             f"state={previous is not None}")
        y, new = step(previous)
    else:
        y, new = parallel(previous, state is not None)
    if state is not None:
        state[key] = new
    return y
