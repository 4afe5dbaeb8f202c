"""A generation engine for many concurrent streams in one process, with continuous batching.

Each request is prefilled (the whole prompt in one parallel forward; waiting prompts of equal length
share that forward), then joins the set of active streams. One background thread runs the loop

    1. drop streams that were cancelled (their state rows leave the batch)
    2. admit waiting requests: prefill them, sample their first tokens, concatenate their states to the batch
    3. one batched step: feed every active stream's last token [B, 1] with the batched RecurrentCache,
       then sample each row with that stream's own sampling parameters and random generator
       (``attnfree.inference.sampling``); streams that just finished leave the batch at once

A stream's state is the model's recurrent state: constant size, whatever the prompt or output length, so
memory grows with the number of streams, never with their lengths. Results do not depend on the batch a
stream shares (each row of a recurrent step only reads its own state), which the tests check token by token.

Events go from the worker thread to the asyncio server through ``loop.call_soon_threadsafe``: the model
never runs on the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import random
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from attnfree.data import TextTokenizer
from attnfree.inference.sampling import Sampling, sample_rows
from attnfree.models.cache import RecurrentCache
from attnfree.models.compat import output_cache
from attnfree.models.registry import max_positions


class RequestError(ValueError):
    """A request the engine cannot serve; ``field`` names the offending request field."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class EngineFull(RuntimeError):
    """Every stream slot and queue place is taken (HTTP 429)."""


# ----------------------------------------------------------------------------------------------
# Text: incremental detokenisation and stop strings
# ----------------------------------------------------------------------------------------------


class IncrementalDecoder:
    """Turns token ids into text deltas without splitting a UTF-8 character, at O(window) cost per token.

    Decodes ``ids[prefix:]`` and ``ids[prefix:read]`` (the window since the last emission) and emits the
    difference; text ending in U+FFFD (an incomplete character) is held back until a later token completes
    it, or until ``flush``. The concatenated deltas equal ``tokenizer.decode(ids)``. Only the window's ids are
    kept, so a long stream holds no growing token list here.
    """

    def __init__(self, tokenizer: TextTokenizer):
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


class StopText:
    """Cuts the output at the first stop string; holds back a tail that could still become one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.pending = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was found). After a stop, nothing more is emitted."""
        text = self.pending + delta
        hits = [text.find(s) for s in self.stops if s in text]
        if hits:
            self.pending = ""
            return text[:min(hits)], True
        hold = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.pending = text[len(text) - hold:] if hold else ""
        return text[:len(text) - hold], False

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text


# ----------------------------------------------------------------------------------------------
# Requests, events and streams
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate: prompt ids [T] (T >= 1), up to max_tokens new tokens, sampled as ``sampling`` says."""

    prompt_ids: tuple[int, ...]
    max_tokens: int
    sampling: Sampling = Sampling(greedy=True)
    seed: int | None = None  # None: a random seed (reported in the final stats so the run can be repeated)
    stop: tuple[str, ...] = ()
    stop_at_eos: bool = True


@dataclass
class Event:
    """One message to the client: a token (with its text delta, maybe empty) or the end of the stream."""

    kind: str  # "token" | "done" | "error"
    token: int | None = None
    text: str = ""
    finish_reason: str | None = None  # "length" | "stop" (eos or a stop string) | "error"
    stats: dict[str, Any] | None = None


@dataclass
class Stream:
    """One request's progress. The worker thread writes it; the server reads events from ``queue``."""

    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    decoder: IncrementalDecoder
    queue: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    seed: int = 0
    generator: torch.Generator | None = None
    last_token: int = -1  # the token to feed at the next step
    generated: int = 0
    state_bytes: int = 0
    finish_reason: str | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    created: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    stop: StopText = field(default_factory=lambda: StopText(()))

    def cancel(self) -> None:
        """The client went away: the worker drops this stream (and frees its state) at its next iteration."""
        self.cancelled.set()

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.cancelled.is_set()

    async def events(self) -> AsyncIterator[Event]:
        """Events until (and including) the final "done" or "error" event."""
        while True:
            event = await self.queue.get()
            yield event
            if event.kind != "token":
                return

    def stats(self) -> dict[str, Any]:
        now = time.perf_counter()
        first = self.first_token_at or now
        decode_s = now - first
        return {
            "prompt_tokens": len(self.request.prompt_ids),
            "completion_tokens": self.generated,
            "time_to_first_token_s": round(first - self.created, 6),
            "total_s": round(now - self.created, 6),
            "tokens_per_s": round((self.generated - 1) / decode_s, 3) if self.generated > 1 and decode_s > 0 else None,
            "seed": self.seed,
            "state_bytes": self.state_bytes,
        }


# ----------------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------------


class Engine:
    """Serves many generation streams from one model with continuous batching (see the module docstring).

    max_streams: streams decoded at once (each holds one constant-size state); max_queue: requests that may
    wait for a slot (beyond both, ``submit`` raises EngineFull); max_tokens: the most new tokens one request
    may ask for; max_prompt_tokens: the longest prompt (default: the model's position limit, if any).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: TextTokenizer, max_streams: int = 64, max_queue: int = 0,
                 max_tokens: int = 1024, max_prompt_tokens: int | None = None):
        for name, value, low in (("max_streams", max_streams, 1), ("max_queue", max_queue, 0),
                                 ("max_tokens", max_tokens, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.device = next(model.parameters()).device
        self.max_streams, self.max_queue, self.max_tokens = max_streams, max_queue, max_tokens
        self.context_limit = max_positions(model)  # type: ignore[arg-type]
        self.max_prompt_tokens = max_prompt_tokens or self.context_limit
        self.state_bytes_per_stream = self._probe_state_bytes()
        self._cond = threading.Condition()
        self._pending: collections.deque[Stream] = collections.deque()
        self._active: list[Stream] = []
        self._cache: RecurrentCache | None = None  # batch row i belongs to self._active[i]
        self._thread: threading.Thread | None = None
        self._running = False
        self.counters = {"requests": 0, "rejected_full": 0, "completed": 0, "cancelled": 0, "errors": 0,
                         "tokens": 0, "steps": 0, "prefills": 0, "peak_active": 0, "peak_state_bytes": 0}

    @torch.inference_mode()
    def _probe_state_bytes(self) -> int:
        """Bytes of one stream's recurrent state (the same after any number of tokens)."""
        ids = torch.tensor([[self.tokenizer.bos_token_id]], device=self.device)
        cache = output_cache(self.model(input_ids=ids, use_cache=True, logits_to_keep=1))
        if not isinstance(cache, RecurrentCache):
            raise TypeError(f"the engine serves models with a RecurrentCache, got {type(cache).__name__}")
        return cache.nbytes()

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._running = True
        self._thread = threading.Thread(target=self._run, name="attnfree-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._running = False
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    # -- requests ---------------------------------------------------------------------------------

    def validate(self, request: GenerationRequest) -> None:
        """Raise RequestError naming the field when the request cannot be served."""
        n = len(request.prompt_ids)
        if n == 0:
            raise RequestError("prompt", "the prompt has no tokens (an empty text prompt starts from BOS)")
        if not 1 <= request.max_tokens <= self.max_tokens:
            raise RequestError("max_tokens", f"max_tokens must be in [1, {self.max_tokens}], got {request.max_tokens}")
        if self.max_prompt_tokens is not None and n > self.max_prompt_tokens:
            raise RequestError("prompt", f"the prompt has {n} tokens; this server takes at most "
                               f"{self.max_prompt_tokens}")
        if self.context_limit is not None and n + request.max_tokens > self.context_limit:
            raise RequestError("max_tokens", f"prompt ({n} tokens) + max_tokens ({request.max_tokens}) exceeds the "
                               f"model's context of {self.context_limit} positions")
        vocab = self.tokenizer.vocab_size
        if any(not 0 <= t < vocab for t in request.prompt_ids):
            raise RequestError("prompt", f"prompt token ids must be in [0, {vocab})")

    def submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None = None) -> Stream:
        """Queue a request; its events arrive on ``stream.queue`` (in ``loop``, the caller's by default)."""
        self.validate(request)
        loop = loop or asyncio.get_running_loop()
        seed = request.seed if request.seed is not None else random.SystemRandom().randrange(2**63)
        stream = Stream(request, loop, IncrementalDecoder(self.tokenizer), seed=seed, stop=StopText(request.stop),
                        generator=torch.Generator(self.device).manual_seed(seed))
        with self._cond:
            if not self._running:
                raise RuntimeError("the engine is not running (call start())")
            if len(self._active) + len(self._pending) >= self.max_streams + self.max_queue:
                self.counters["rejected_full"] += 1
                raise EngineFull(f"all {self.max_streams} streams are busy"
                                 + (f" and {self.max_queue} requests wait" if self.max_queue else "")
                                 + "; retry later")
            self.counters["requests"] += 1
            self._pending.append(stream)
            self._cond.notify_all()
        return stream

    def stats(self) -> dict[str, Any]:
        with self._cond:
            active, pending = len(self._active), len(self._pending)
            total = self._cache.nbytes() if self._cache is not None else 0
            return {"active_streams": active, "queued_streams": pending, "max_streams": self.max_streams,
                    "state_bytes_per_stream": self.state_bytes_per_stream, "state_bytes_total": total,
                    **self.counters}

    # -- the worker loop --------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while self._running and not self._active and not self._pending:
                        self._cond.wait(timeout=1.0)
                    if not self._running:
                        break
                try:
                    self._iteration()
                except Exception as error:  # a bug must not leave every client waiting forever
                    self._fail_all(error)
        for stream in self._active + list(self._pending):  # shutting down: tell whoever still listens
            self._send(stream, Event("error", text="the server is shutting down", finish_reason="error"))

    def _iteration(self) -> None:
        # 1. finished or cancelled streams leave the batch
        self._drop_finished()
        # 2. admit waiting requests into free slots (prefill each, first token)
        joined = self._admit()
        if joined:
            with self._cond:
                caches = [c for _, c in joined] if self._cache is None else [self._cache, *(c for _, c in joined)]
                self._cache = RecurrentCache.concat(caches)
                self._active.extend(s for group, _ in joined for s in group)
                self._note_peaks()
            self._drop_finished()  # max_tokens=1, or eos right away
        # 3. one batched step for every active stream; streams it finished leave at once
        if self._active:
            self._step()
            self._drop_finished()

    def _note_peaks(self) -> None:
        c = self.counters
        c["peak_active"] = max(c["peak_active"], len(self._active))
        c["peak_state_bytes"] = max(c["peak_state_bytes"], self._cache.nbytes() if self._cache is not None else 0)

    def _drop_finished(self) -> None:
        with self._cond:
            for s in [s for s in self._pending if s.cancelled.is_set()]:
                self._pending.remove(s)
                self.counters["cancelled"] += 1
            keep = [i for i, s in enumerate(self._active) if not s.finished]
            if len(keep) == len(self._active):
                return
            for s in self._active:
                if s.cancelled.is_set() and s.finish_reason is None:
                    self.counters["cancelled"] += 1
            self._active = [self._active[i] for i in keep]
            assert self._cache is not None
            self._cache = self._cache.select(keep) if keep else None

    def _admit(self) -> list[tuple[list[Stream], RecurrentCache]]:
        """Take waiting requests into free slots: prefill those of one prompt length together, first tokens."""
        with self._cond:
            room = self.max_streams - len(self._active)
            taken = [self._pending.popleft() for _ in range(min(room, len(self._pending)))]
        by_length: dict[int, list[Stream]] = {}
        for stream in taken:
            by_length.setdefault(len(stream.request.prompt_ids), []).append(stream)
        joined = []
        for group in by_length.values():
            try:
                cache, logits = self._prefill(group)  # logits: [G, V]
            except Exception as error:  # a bad request must not stop the others
                for stream in group:
                    self._fail(stream, error)
                continue
            tokens = sample_rows(logits, [s.request.sampling for s in group], [s.generator for s in group])
            for stream, token in zip(group, tokens, strict=True):
                stream.state_bytes = cache.nbytes() // len(group)
                self._emit(stream, token)
            joined.append((group, cache))
        return joined

    def _prefill(self, group: list[Stream]) -> tuple[RecurrentCache, Tensor]:
        """Prompts of one length in one parallel forward: their state (batch G) and last-position logits [G, V]."""
        ids = torch.tensor([s.request.prompt_ids for s in group], device=self.device)  # [G, T]
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
        self.counters["prefills"] += 1
        return output_cache(out), out.logits[:, -1]

    def _step(self) -> None:
        """Feed every active stream's last token at once ([B, 1]) and sample each row with its own settings."""
        ids = torch.tensor([[s.last_token] for s in self._active], device=self.device)  # [B, 1]
        try:
            out = self.model(input_ids=ids, cache=self._cache, use_cache=True)
        except Exception as error:
            for stream in self._active:
                self._fail(stream, error)
            self._drop_finished()
            return
        self.counters["steps"] += 1
        tokens = sample_rows(out.logits[:, -1], [s.request.sampling for s in self._active],  # logits: [B, V]
                             [s.generator for s in self._active])
        for stream, token in zip(self._active, tokens, strict=True):
            if not stream.finished:
                self._emit(stream, token)

    # -- events -----------------------------------------------------------------------------------

    def _emit(self, stream: Stream, token: int) -> None:
        """Record a sampled token, send its text delta, and end the stream when it is done."""
        request = stream.request
        stream.last_token, stream.generated = token, stream.generated + 1
        stream.first_token_at = stream.first_token_at or time.perf_counter()
        self.counters["tokens"] += 1
        is_eos = request.stop_at_eos and token == self.tokenizer.eos_token_id
        text, stopped = stream.stop.feed("" if is_eos else stream.decoder.push(token))
        if is_eos or stopped:
            stream.finish_reason = "stop"
        elif stream.generated >= request.max_tokens:
            stream.finish_reason = "length"
        if stream.finish_reason is not None and not stopped:
            text += stream.stop.feed(stream.decoder.flush())[0] + stream.stop.flush()
        self._send(stream, Event("token", token=token, text=text))
        if stream.finish_reason is not None:
            self.counters["completed"] += 1
            self._send(stream, Event("done", finish_reason=stream.finish_reason, stats=stream.stats()))

    def _fail_all(self, error: Exception) -> None:
        with self._cond:
            streams, self._active, self._cache = self._active + list(self._pending), [], None
            self._pending.clear()
        for stream in streams:
            self._fail(stream, error)

    def _fail(self, stream: Stream, error: Exception) -> None:
        stream.finish_reason = "error"
        self.counters["errors"] += 1
        self._send(stream, Event("error", text=f"{type(error).__name__}: {error}", finish_reason="error"))

    @staticmethod
    def _send(stream: Stream, event: Event) -> None:
        try:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, event)
        except RuntimeError:  # the client's event loop is closed: nobody is listening any more
            stream.cancel()
