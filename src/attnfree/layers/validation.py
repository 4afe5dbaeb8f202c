"""Argument checks shared by the layers (the configs check the same fields with the config's name in front)."""

from __future__ import annotations

from collections.abc import Iterable


def check_mode(name: str, value: object, choices: Iterable[str]) -> None:
    """Raise ValueError naming ``name``, the allowed values and the bad one, unless ``value`` is one of ``choices``."""
    options = tuple(choices)
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")


def check_heads(hidden_size: int, n_heads: int) -> None:
    """The width splits into whole heads: ValueError otherwise."""
    if n_heads < 1 or hidden_size % n_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by n_heads {n_heads}")
