"""Argument checks shared by the layers (the configs check the same fields with the config's name in front)."""

from __future__ import annotations

from collections.abc import Iterable


def check_mode(name: str, value: object, choices: Iterable[str]) -> None:
    """Raise ValueError naming ``name``, the allowed values and the bad one, unless ``value`` is one of ``choices``."""
    options = tuple(choices)
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
