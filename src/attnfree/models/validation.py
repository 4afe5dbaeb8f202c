"""Config validation helpers: each check raises ValueError naming the field and the bad value."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def check_positive(config: Any, *fields: str) -> None:
    for f in fields:
        v = getattr(config, f)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{type(config).__name__}.{f} must be a positive integer, got {v!r}")


def check_non_negative(config: Any, *fields: str) -> None:
    """Integers >= 0 (0 usually meaning "off")."""
    for f in fields:
        v = getattr(config, f)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{type(config).__name__}.{f} must be an integer >= 0, got {v!r}")


def check_positive_float(config: Any, *fields: str) -> None:
    """Real values > 0 (initializer range, LayerNorm epsilon, capacity factor)."""
    for f in fields:
        v = getattr(config, f)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"{type(config).__name__}.{f} must be > 0, got {v!r}")


def check_probability(config: Any, *fields: str) -> None:
    """Values in [0, 1) (dropout, label smoothing)."""
    for f in fields:
        v = getattr(config, f)
        if not isinstance(v, (int, float)) or not 0.0 <= float(v) < 1.0:
            raise ValueError(f"{type(config).__name__}.{f} must be in [0, 1), got {v!r}")


def check_divisible(config: Any, field: str, by: str) -> None:
    v, d = getattr(config, field), getattr(config, by)
    if v % d:
        raise ValueError(f"{type(config).__name__}.{field}={v} must be divisible by {by}={d}")


def check_choice(config: Any, field: str, choices: Iterable[str]) -> None:
    v, options = getattr(config, field), tuple(choices)
    if v not in options:
        raise ValueError(f"{type(config).__name__}.{field} must be one of {options}, got {v!r}")


def check_token_ids(config: Any, *fields: str) -> None:
    for f in fields:
        v = getattr(config, f)
        if v is not None and not 0 <= v < config.vocab_size:
            raise ValueError(f"{type(config).__name__}.{f}={v} is outside the vocabulary [0, {config.vocab_size})")
