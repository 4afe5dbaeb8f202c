"""Every option of ``attnfree serve`` and of the engine, declared once (``ServeSettings``).

Each field's ``metadata["help"]`` is its documentation and its ``--help`` text (``attnfree serve`` makes one flag per
field, as ``attnfree train`` does from ``TrainSettings``); ``Engine``, ``create_app`` and ``serve`` take a
``ServeSettings`` (or overrides of its fields by name) and nothing else, so a default is written only here.
Invalid values raise ValueError naming the field. Imports nothing heavy: the torch-free server reads it too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _doc(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class ServeSettings:
    """The server's options: where it listens, who may use it, and every limit of the engine."""

    # where and as what
    host: str = field(default="127.0.0.1", metadata=_doc("address to bind (127.0.0.1: loopback only)"))
    port: int = field(default=8000, metadata=_doc("port to bind, in [1, 65535]"))
    name: str | None = field(default=None, metadata=_doc(
        "model name shown by /info and /v1/models (None: the folder name)"))
    api_key: str | None = field(default=None, metadata=_doc(
        "require 'Authorization: Bearer KEY' on every endpoint but /health and the page (None: $ATTNFREE_API_KEY, "
        "else open)"))
    log_level: str = field(default="info", metadata=_doc("uvicorn log level"))
    # how the model runs
    threads: int | None = field(default=None, metadata=_doc(
        "CPU threads of the model (torch's or onnxruntime's; None: the library's choice)"))
    quantized: bool = field(default=False, metadata=_doc(
        "serve an export's int8 graphs (exported with --quantize int8); only for an export folder"))
    # the engine's limits
    max_streams: int = field(default=64, metadata=_doc(
        "streams held at once (prefilling, decoding or paused; each holds one constant-size state)"))
    max_queue: int = field(default=0, metadata=_doc(
        "requests that may wait for a stream (0: answer 429 when every stream is busy)"))
    max_tokens: int = field(default=1024, metadata=_doc("most new tokens one request may ask for"))
    max_prompt_tokens: int | None = field(default=None, metadata=_doc(
        "longest prompt in tokens (None: the model's position limit, if any)"))
    prefill_chunk: int = field(default=512, metadata=_doc(
        "prompt tokens per stream per prefill call: a long prompt delays running streams by at most one chunk"))
    max_buffered: int = field(default=64, metadata=_doc(
        "events a reader may be behind before its stream pauses (its state kept aside) until it catches up"))
    prefix_cache_mib: float = field(default=64.0, metadata=_doc(
        "memory for the states of recent prompt prefixes, reused by requests that share them (0: off)"))

    def __post_init__(self) -> None:
        for name, low in (("max_streams", 1), ("max_queue", 0), ("max_tokens", 1), ("prefill_chunk", 1),
                          ("max_buffered", 1), ("port", 1)):
            _check_int(name, getattr(self, name), low)
        if self.port > 65535:
            raise ValueError(f"port must be in [1, 65535], got {self.port}")
        for name in ("max_prompt_tokens", "threads"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        if isinstance(self.prefix_cache_mib, bool) or not isinstance(self.prefix_cache_mib, (int, float)) or not (
                self.prefix_cache_mib >= 0):
            raise ValueError(f"prefix_cache_mib must be a number >= 0, got {self.prefix_cache_mib!r}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must be non-empty (or None for no key)")
        if not isinstance(self.quantized, bool):
            raise ValueError(f"quantized must be a bool, got {self.quantized!r}")

    @property
    def prefix_cache_bytes(self) -> int:
        return int(self.prefix_cache_mib * 2**20)

    def replace(self, **changes: Any) -> ServeSettings:
        """A copy with some fields changed (ValueError naming an unknown one)."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown server setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        return dataclasses.replace(self, **changes)


def _check_int(name: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def resolve(settings: ServeSettings | None, overrides: dict[str, Any]) -> ServeSettings:
    """``settings`` (default: ServeSettings()) with ``overrides`` applied by field name."""
    return (settings or ServeSettings()).replace(**overrides)
