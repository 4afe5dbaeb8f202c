"""Lag sets, input checks and the decoding state shared by the three correlation forms.

The state is a set of ring buffers indexed by absolute position: in row b, position p lives in slot p % capacity.
Each capacity counts one slot for the token being consumed, so a decode step writes the new token into
its slot first and then reads everything it needs from the buffers (no torch.cat per token).

Every row keeps its own count ``seen`` (a [B] tensor), so rows of different lengths batch together as they are
(continuous batching concatenates states along the batch, nothing else), and every slot index is a tensor: the
same step runs eagerly (writes in place) and inside an exported graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class LagSet:
    """What every form of the correlation takes besides the tensors: the lags and the segment length J.

    lags: L lags, sorted, distinct, starting at 0 (``make_lags``); a 1-D integer tensor is accepted and kept as a
    tuple of ints (plain ints: torch.compile reads them without a graph break, and they hold values on the meta
    device). segment: J >= 1, consecutive query/key positions summed into one score. Checked at construction.
    """

    lags: tuple[int, ...]
    segment: int = 4

    def __post_init__(self) -> None:
        object.__setattr__(self, "lags", tuple(check_lags(self.lags)))
        check_segment(self.segment)

    @property
    def max_lag(self) -> int:
        return self.lags[-1]


@dataclass
class CorrelationState:
    """Ring buffers of the past that future steps still need; slot of position p is p % capacity.

    q:     [B, J, H, D]          queries at positions seen-J .. seen-1 (the next step needs the last J-1)
    k:     [B, max(L)+J, H, D]   keys at positions seen-max(L)-J .. seen-1
    v:     [B, max(L)+1, H, D]   values at positions seen-max(L)-1 .. seen-1
    valid: [B, max(L)+J] bool    mask of the positions held in ``k`` (a superset of those in q and v);
                                 positions before the start of the sequence are False
    seen:  [B] long              positions consumed so far in each row, i.e. the position of its next token

    Buffers hold the raw inputs (in the input dtype); ``valid`` says which of them count.
    """

    q: Tensor
    k: Tensor
    v: Tensor
    valid: Tensor
    seen: Tensor

    def clone(self) -> CorrelationState:
        """A copy whose buffers can be updated in place without touching this one."""
        return CorrelationState(self.q.clone(), self.k.clone(), self.v.clone(), self.valid.clone(), self.seen.clone())


def softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scores and lag weights: float64 stays float64, everything else is normalised in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_lags(dense: int = 32, max_positions: int = 1024) -> Tensor:
    """Lag set: dense lags 0..dense-1 plus dilated lags dense * 2**m, all strictly below max_positions.

    make_lags(32, 1024) -> [0, 1, ..., 31, 32, 64, 128, 256, 512]   (37 lags)
    """
    if dense < 1:
        raise ValueError(f"dense must be >= 1, got {dense}")
    if max_positions < 1:
        raise ValueError(f"max_positions must be >= 1, got {max_positions}")
    lags = list(range(min(dense, max_positions)))
    step = dense
    while step < max_positions:
        lags.append(step)
        step *= 2
    return torch.tensor(sorted(set(lags)), dtype=torch.long)


def check_lags(lags: Tensor | Sequence[int]) -> list[int]:
    """Validate a lag set (1-D integer tensor, starts at 0, strictly increasing); return it as a list.

    A tuple of ints is accepted too: layers pass one under torch.compile, where reading a tensor's values
    would break the graph.
    """
    if isinstance(lags, Tensor):
        values = _tensor_lags(lags)
    elif isinstance(lags, (tuple, list)) and lags and all(isinstance(x, int) and not isinstance(x, bool)
                                                           for x in lags):
        values = list(lags)
    else:
        raise ValueError(f"lags must be a non-empty 1-D tensor or a sequence of ints, got {lags!r}")
    if min(values) < 0:
        raise ValueError(f"lags must be non-negative, got {values}")
    if values[0] != 0:
        raise ValueError(f"lags must start at 0, got {values[0]}")
    if any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(f"lags must be sorted and distinct, got {values}")
    return values


def _tensor_lags(lags: Tensor) -> list[int]:
    if lags.dim() != 1 or lags.numel() == 0:
        raise ValueError("lags must be a non-empty 1-D tensor")
    if lags.dtype.is_floating_point or lags.dtype.is_complex or lags.dtype == torch.bool:
        raise ValueError(f"lags must be an integer tensor, got {lags.dtype}")
    return [int(x) for x in lags.tolist()]


def check_segment(segment: int) -> None:
    """The segment length J is a positive integer."""
    if isinstance(segment, bool) or not isinstance(segment, int) or segment < 1:
        raise ValueError(f"segment must be an integer >= 1, got {segment!r}")


def capacities(max_lag: int, segment: int) -> tuple[int, int, int]:
    """Ring sizes (queries, keys and validity, values) for the largest lag and the segment length J."""
    return segment, max_lag + segment, max_lag + 1


def init_correlation_state(batch: int, heads: int, head_dim: int, spec: LagSet, dtype: torch.dtype = torch.float32,
                           device: torch.device | str | None = None) -> CorrelationState:
    """An empty state (nothing seen yet): zero buffers, every position invalid, seen = 0 in every row."""
    cq, ck, cv = capacities(spec.max_lag, spec.segment)
    return CorrelationState(
        q=torch.zeros(batch, cq, heads, head_dim, dtype=dtype, device=device),
        k=torch.zeros(batch, ck, heads, head_dim, dtype=dtype, device=device),
        v=torch.zeros(batch, cv, heads, head_dim, dtype=dtype, device=device),
        valid=torch.zeros(batch, ck, dtype=torch.bool, device=device),
        seen=torch.zeros(batch, dtype=torch.long, device=device),
    )


def check_state(
    state: CorrelationState, batch: int, heads: int, head_dim: int, max_lag: int, segment: int
) -> None:
    """The state's buffers match the batch, heads, head size, lag set and segment length."""
    cq, ck, cv = capacities(max_lag, segment)
    expected = {
        "q": (batch, cq, heads, head_dim),
        "k": (batch, ck, heads, head_dim),
        "v": (batch, cv, heads, head_dim),
        "valid": (batch, ck),
        "seen": (batch,),
    }
    for name, shape in expected.items():
        got = tuple(getattr(state, name).shape)
        if got != shape:
            raise ValueError(f"state.{name} must be {shape} for these inputs, lags and segment, got {got}")


def check_inputs(q: Tensor, k: Tensor, v: Tensor, spec: LagSet, mask: Tensor | None, state: CorrelationState | None
                 ) -> list[int]:
    """Shapes: q, k, v [B, T, H, D], mask [B, T] bool, state matching; returns the lags as a list."""
    if q.dim() != 4:
        raise ValueError(f"q must be [B, T, H, D], got shape {tuple(q.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        shapes = ", ".join(str(tuple(x.shape)) for x in (q, k, v))
        raise ValueError(f"q, k, v must have one shape, got {shapes}")
    if mask is not None and (mask.shape != q.shape[:2] or mask.dtype != torch.bool):
        expected = tuple(q.shape[:2])
        raise ValueError(f"mask must be bool [B, T] = {expected}, got {mask.dtype} {tuple(mask.shape)}")
    if not isinstance(spec, LagSet):
        raise TypeError(f"spec must be a LagSet (lags and segment), got {type(spec).__name__}")
    if state is not None:
        check_state(state, q.shape[0], q.shape[2], q.shape[3], spec.max_lag, spec.segment)
    return list(spec.lags)


def slots(seen: Tensor, offsets: Tensor, capacity: int) -> Tensor:
    """Ring slots of positions ``seen + offsets`` in each row: seen [B], offsets [N] -> [B, N] long."""
    return (seen.unsqueeze(1) + offsets.unsqueeze(0)) % capacity


def read_slots(ring: Tensor, index: Tensor) -> Tensor:
    """ring [B, C, ...] at the slots index [B, N] of each row -> [B, N, ...].

    Advanced indexing rather than ``gather``: its backward keeps only the ring's shape, so a later in-place write to
    the ring (the next decoding step) leaves the gradient of this read intact.
    """
    rows = torch.arange(ring.shape[0], device=ring.device).unsqueeze(1)  # [B, 1]
    return ring[rows, index]


def write_slot_(ring: Tensor, slot: Tensor, value: Tensor) -> None:
    """In place: ring [B, C, ...] takes value [B, ...] at slot [B] of each row."""
    rows = torch.arange(ring.shape[0], device=ring.device)
    ring[rows, slot] = value.to(ring.dtype)


def _ring_to_window(ring: Tensor, seen: Tensor, length: int) -> Tensor:
    """Ring [B, C, ...] holding positions seen-C .. seen-1 -> time order, left-padded with zeros to length."""
    C = ring.shape[1]
    window = read_slots(ring, slots(seen, torch.arange(C, device=ring.device), C))  # slot (seen - C + j) % C
    return torch.cat([window.new_zeros(window.shape[0], length - C, *window.shape[2:]), window], dim=1)


def _window_to_ring(window: Tensor, seen: Tensor, capacity: int) -> Tensor:
    """Time-ordered [B, T, ...] ending at position seen-1 -> ring [B, capacity, ...] (zeros before the start).

    Branch-free in T (the last ``capacity`` entries of the window with ``capacity`` zeros put in front), so one
    traced graph serves every prompt length. Slot s holds window position (s - seen) mod capacity.
    """
    padded = torch.cat([window.new_zeros(window.shape[0], capacity, *window.shape[2:]), window], dim=1)
    last = padded[:, padded.shape[1] - capacity:]  # positions seen-capacity .. seen-1
    return read_slots(last, slots(-seen, torch.arange(capacity, device=window.device), capacity))


def state_history(state: CorrelationState) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The state as a time-ordered prefix of max(L)+J positions (seen-max(L)-J .. seen-1 in each row).

    Returns q, k, v [B, max(L)+J, H, D] (q and v zero where the state no longer holds them: no output
    that follows the prefix reads them) and valid [B, max(L)+J] bool.
    """
    n = state.k.shape[1]
    return (
        _ring_to_window(state.q, state.seen, n),
        _ring_to_window(state.k, state.seen, n),
        _ring_to_window(state.v, state.seen, n),
        _ring_to_window(state.valid, state.seen, n),
    )


def state_from_sequence(
    q: Tensor, k: Tensor, v: Tensor, valid: Tensor | None, max_lag: int, segment: int, seen: Tensor
) -> CorrelationState:
    """The state after consuming a whole sequence q, k, v [B, T, H, D] (valid [B, T]) ending at seen-1 ([B])."""
    cq, ck, cv = capacities(max_lag, segment)
    if valid is None:
        valid = torch.ones(q.shape[:2], dtype=torch.bool, device=q.device)
    return CorrelationState(
        q=_window_to_ring(q, seen, cq),
        k=_window_to_ring(k, seen, ck),
        v=_window_to_ring(v, seen, cv),
        valid=_window_to_ring(valid, seen, ck),
        seen=seen,
    )


def seen_after(initial_state: CorrelationState | None, batch: int, T: int, device: torch.device) -> Tensor:
    """[B] positions consumed after T more: the initial state's count (0 without one) plus T."""
    start = initial_state.seen if initial_state is not None else torch.zeros(batch, dtype=torch.long, device=device)
    return start + T
def prepend_history(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, state: CorrelationState | None
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, int]:
    """Continue a sequence: the state's history (max(L)+J positions) followed by q, k, v [B, T, H, D].

    Returns q, k, v, valid (None when nothing is masked) of the extended sequence and the number of
    history positions in front (0 without a state). Outputs at the history positions are to be dropped.
    """
    if state is None:
        return q, k, v, mask, 0
    hq, hk, hv, hvalid = state_history(state)
    if mask is None:
        mask = torch.ones(q.shape[:2], dtype=torch.bool, device=q.device)
    cat = torch.cat
    return (
        cat([hq.to(q.dtype), q], 1),
        cat([hk.to(k.dtype), k], 1),
        cat([hv.to(v.dtype), v], 1),
        cat([hvalid, mask], 1),
        hk.shape[1],
    )
