"""A generation engine for many concurrent streams in one process: continuous batching, chunked prefill that
shares the machine with decoding, exact prefix-state caching, and back-pressure for slow readers.

One background thread loops:

    1. drop streams that finished or were cancelled (their state rows leave the batch); pause streams whose
       reader is ``max_buffered`` events behind (their state leaves the batch, kept aside) and resume those that
       caught up, so a slow reader never holds the others back and never makes the server buffer without bound
    2. admit waiting requests into free slots: each prompt starts from the state of its longest prefix in the
       prefix cache (``prefix_cache.py``), and its prefill is planned to stop where it diverges from a cached
       prompt, so that the state at that point is cached too (a shared header is then prefilled once)
    3. one prefill chunk: of the prompts being prefilled, a group of at most ``prefill_chunk`` tokens each: new
       prompts of any lengths together (left-padded: the models give a padded row exactly its own values), or
       continuations of one chunk length together; a prompt whose prefill is done gets its first token and joins
       the decoding batch. One chunk per iteration: a long prompt never stalls running streams for longer
    4. one batched step for every running stream, each row sampled with its own settings and random generator
       (``inference.sampling``); streams that finished leave the batch at once

A stream's state is the model's recurrent state: constant size, whatever the prompt or output length, so memory
grows with the number of streams, never with their lengths. Results do not depend on the company a stream keeps
(each row of a recurrent step reads only its own state) nor on the prefix cache (a state taken from the cache is the
state its prefix would have produced); the tests check both token by token.

Events go from the worker thread to the asyncio server through ``loop.call_soon_threadsafe``: the model never runs
on the event loop. The model runs through a ``Backend`` (``backend.py``): a torch model or an ONNX export; this
module imports neither torch nor onnxruntime.
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

from attnfree.inference.detokenize import IncrementalDecoder
from attnfree.inference.sampling_options import Sampling
from attnfree.inference.serve.backend import Backend, Tokenizer
from attnfree.inference.serve.prefix_cache import PrefixCache
from attnfree.inference.serve.settings import ServeSettings, resolve


class RequestError(ValueError):
    """A request the engine cannot serve; ``field`` names the offending request field."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class EngineFull(RuntimeError):
    """Every stream slot and queue place is taken (HTTP 429)."""


# ----------------------------------------------------------------------------------------------
# Text: stop strings (incremental detokenisation is ``inference.detokenize.IncrementalDecoder``)
# ----------------------------------------------------------------------------------------------


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
    generator: Any = None  # the backend's random generator of this stream
    last_token: int = -1  # the token to feed at the next step
    generated: int = 0
    state_bytes: int = 0
    finish_reason: str | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    created: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    stop: StopText = field(default_factory=lambda: StopText(()))
    sent: int = 0  # events the worker sent
    delivered: int = 0  # events the reader took: sent - delivered is what waits for a slow reader
    cache: Any = None  # this stream's own state while it is prefilled or paused
    prompt_pos: int = 0  # prompt tokens in that state
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache
    snapshots: list[int] = field(default_factory=list)  # prompt lengths whose state goes into the prefix cache

    def cancel(self) -> None:
        """The client went away: the worker drops this stream (and frees its state) at its next iteration."""
        self.cancelled.set()

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.cancelled.is_set()

    async def next_event(self) -> Event:
        """The next event (counted as delivered: the engine paces the stream by what its reader took)."""
        event = await self.queue.get()
        self.delivered += 1
        return event

    async def events(self) -> AsyncIterator[Event]:
        """Events until (and including) the final "done" or "error" event."""
        while True:
            event = await self.next_event()
            yield event
            if event.kind != "token":
                return

    @property
    def backlog(self) -> int:
        return self.sent - self.delivered

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
            "cached_prompt_tokens": self.cached_tokens,
        }


# ----------------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------------


def as_backend(model: Any, threads: int | None = None) -> Backend:
    """``model`` itself when it is a Backend, else a torch model in a ``TorchBackend`` with ``threads`` (torch
    imported only then)."""
    if isinstance(model, Backend):
        return model
    from attnfree.inference.serve.torch_backend import TorchBackend

    return TorchBackend(model, threads)


class Engine:
    """Serves many generation streams from one model (see the module docstring).

    model: a ``Backend`` (or a torch model, served by the torch backend); the limits are ``settings``'
    (``ServeSettings``: max_streams, max_queue, max_tokens, max_prompt_tokens, prefill_chunk, max_buffered,
    prefix_cache_mib), given whole or as overrides of its fields by name.
    """

    def __init__(self, model: Any, tokenizer: Tokenizer, settings: ServeSettings | None = None, **overrides: Any):
        self.settings = s = resolve(settings, overrides)
        self.backend, self.tokenizer = as_backend(model, s.threads), tokenizer
        self.max_streams, self.max_queue, self.max_tokens = s.max_streams, s.max_queue, s.max_tokens
        self.prefill_chunk, self.max_buffered = s.prefill_chunk, s.max_buffered
        self.context_limit = self.backend.context_limit
        self.max_prompt_tokens = s.max_prompt_tokens or self.context_limit
        self.prefix_cache = PrefixCache(s.prefix_cache_bytes)
        self.state_bytes_per_stream = self.backend.state_bytes(tokenizer.bos_token_id)
        self._cond = threading.RLock()
        self._wake = threading.Condition(self._cond)
        self._pending: collections.deque[Stream] = collections.deque()  # waiting for a slot
        self._prefilling: list[Stream] = []  # admitted, prompt not yet all in their state
        self._running: list[Stream] = []  # decoding: batch row i of self._cache belongs to self._running[i]
        self._paused: list[Stream] = []  # reader behind: state aside in stream.cache
        self._cache: Any = None  # the decoding batch's state
        self._thread: threading.Thread | None = None
        self._alive = False
        self.counters = {"requests": 0, "rejected_full": 0, "completed": 0, "cancelled": 0, "errors": 0,
                         "tokens": 0, "steps": 0, "prefills": 0, "prefill_tokens": 0, "pauses": 0,
                         "peak_active": 0, "peak_state_bytes": 0}

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._alive = True
        self._thread = threading.Thread(target=self._run, name="attnfree-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._alive = False
            self._wake.notify_all()
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
                        generator=self.backend.generator(seed))
        with self._wake:
            if not self._alive:
                raise RuntimeError("the engine is not running (call start())")
            if self._held() + len(self._pending) >= self.max_streams + self.max_queue:
                self.counters["rejected_full"] += 1
                raise EngineFull(f"all {self.max_streams} streams are busy"
                                 + (f" and {self.max_queue} requests wait" if self.max_queue else "")
                                 + "; retry later")
            self.counters["requests"] += 1
            self._pending.append(stream)
            self._wake.notify_all()
        return stream

    def _held(self) -> int:
        return len(self._prefilling) + len(self._running) + len(self._paused)

    def _all_streams(self) -> list[Stream]:
        return list(self._pending) + self._prefilling + self._running + self._paused

    def stats(self) -> dict[str, Any]:
        with self._cond:
            total = (self._cache.nbytes() if self._cache is not None else 0) + sum(
                s.cache.nbytes() for s in self._prefilling + self._paused if s.cache is not None)
            return {"active_streams": self._held(), "queued_streams": len(self._pending),
                    "prefilling_streams": len(self._prefilling), "decoding_streams": len(self._running),
                    "paused_streams": len(self._paused), "max_streams": self.max_streams,
                    "state_bytes_per_stream": self.state_bytes_per_stream, "state_bytes_total": total,
                    **self.counters, **self.prefix_cache.stats()}

    # -- the worker loop --------------------------------------------------------------------------

    def _run(self) -> None:
        with self.backend.worker():
            while True:
                with self._wake:
                    while self._alive and not self._work():
                        self._wake.wait(timeout=0.05)
                    if not self._alive:
                        break
                try:
                    self._iteration()
                except Exception as error:  # a bug must not leave every client waiting forever
                    self._fail_all(error)
        for stream in self._all_streams():  # shutting down: tell whoever still listens
            self._send(stream, Event("error", text="the server is shutting down", finish_reason="error"))

    def _work(self) -> bool:
        """Anything to do now (paused streams only count once their reader caught up)."""
        resumable = any(s.finished or s.backlog < self.max_buffered // 2 for s in self._paused)
        return bool(self._pending or self._prefilling or self._running or resumable)

    def _iteration(self) -> None:
        self._drop_finished()  # 1.
        self._pace()
        self._admit()  # 2.
        self._prefill_step()  # 3.
        self._drop_finished()
        if self._running:  # 4.
            self._step()
            self._drop_finished()

    def _drop_finished(self) -> None:
        with self._cond:
            for group in (self._pending, self._prefilling, self._paused):
                for s in [s for s in group if s.finished]:
                    group.remove(s)
                    self._count_end(s)
            keep = [i for i, s in enumerate(self._running) if not s.finished]
            if len(keep) == len(self._running):
                return
            for s in self._running:
                if s.finished:
                    self._count_end(s)
            self._running = [self._running[i] for i in keep]
            assert self._cache is not None
            self._cache = self._cache.select(keep) if keep else None

    def _count_end(self, stream: Stream) -> None:
        if stream.cancelled.is_set() and stream.finish_reason is None:
            self.counters["cancelled"] += 1
        stream.cache = None

    def _pace(self) -> None:
        """Back-pressure: a running stream whose reader is max_buffered events behind leaves the batch (its state
        kept aside); it rejoins once the reader is within half of that."""
        with self._cond:
            behind = [i for i, s in enumerate(self._running) if s.backlog >= self.max_buffered]
            if behind and self._cache is not None:
                for i in behind:
                    self._running[i].cache = self._cache.select([i])
                    self._paused.append(self._running[i])
                    self.counters["pauses"] += 1
                paused = set(behind)
                keep = [i for i in range(len(self._running)) if i not in paused]
                self._running = [self._running[i] for i in keep]
                self._cache = self._cache.select(keep) if keep else None
            ready = [s for s in self._paused if s.backlog < self.max_buffered // 2]
            for s in ready:
                self._paused.remove(s)
                self._join(s)

    def _join(self, stream: Stream) -> None:
        """Put a stream whose state is in ``stream.cache`` into the decoding batch."""
        assert stream.cache is not None
        self._cache = stream.cache if self._cache is None else self.backend.concat([self._cache, stream.cache])
        stream.cache = None
        self._running.append(stream)
        c = self.counters
        c["peak_active"] = max(c["peak_active"], self._held())
        c["peak_state_bytes"] = max(c["peak_state_bytes"], self._cache.nbytes())

    def _admit(self) -> None:
        """Waiting requests into free slots, each starting from its longest prefix in the prefix cache."""
        with self._cond:
            room = self.max_streams - self._held()
            taken = [self._pending.popleft() for _ in range(min(room, len(self._pending)))]
        for stream in taken:
            prompt = stream.request.prompt_ids
            stream.prompt_pos, stream.cache = self.prefix_cache.lookup(prompt)
            stream.cached_tokens = stream.prompt_pos
            branch = self.prefix_cache.branch_point(prompt)  # where it leaves a cached prompt: worth a state
            stream.snapshots = sorted({p for p in (branch, len(prompt)) if p > stream.prompt_pos})
            with self._cond:
                self._prefilling.append(stream)

    # -- prefill: one chunk per iteration ---------------------------------------------------------

    def _chunk(self, stream: Stream) -> int:
        """The prompt tokens of ``stream``'s next prefill chunk: up to prefill_chunk, stopping at a snapshot."""
        stop = next(p for p in stream.snapshots if p > stream.prompt_pos)
        return min(self.prefill_chunk, stop - stream.prompt_pos)

    def _prefill_step(self) -> None:
        """One group: the oldest waiting prompt and those that batch with it (fresh prompts of any length, left-
        padded; or continuations of the same chunk length)."""
        if not self._prefilling:
            return
        first = self._prefilling[0]
        if first.cache is None:
            group = [s for s in self._prefilling if s.cache is None]
        else:
            group = [s for s in self._prefilling if s.cache is not None and self._chunk(s) == self._chunk(first)]
        try:
            logits = self._prefill(group)  # [G, V]: each stream's last chunk position
        except Exception as error:  # a bad request must not stop the others
            for stream in group:
                self._fail(stream, error)
            return
        done = [(i, s) for i, s in enumerate(group) if s.prompt_pos == len(s.request.prompt_ids)]
        if not done:
            return
        tokens = self.backend.sample(logits[[i for i, _ in done]], [s.request.sampling for _, s in done],
                                     [s.generator for _, s in done])
        for (_, stream), token in zip(done, tokens, strict=True):
            with self._cond:
                self._prefilling.remove(stream)
            stream.state_bytes = stream.cache.nbytes() if stream.cache is not None else 0
            self._emit(stream, token)
            if stream.finished:  # max_tokens=1, or eos at once
                stream.cache = None
            else:
                with self._cond:
                    self._join(stream)

    def _prefill(self, group: list[Stream]) -> Any:
        """Run each stream's next chunk; update its state and prompt position; cache snapshot states. Returns the
        logits [G, V] of each stream's last chunk position."""
        lengths = [self._chunk(s) for s in group]
        rows = [s.request.prompt_ids[s.prompt_pos:s.prompt_pos + n] for s, n in zip(group, lengths, strict=True)]
        start = None if group[0].cache is None else self.backend.concat([s.cache for s in group])
        logits, cache = self.backend.prefill(rows, start)
        self.counters["prefills"] += 1
        self.counters["prefill_tokens"] += sum(lengths)
        for row, (s, n) in enumerate(zip(group, lengths, strict=True)):
            s.cache, s.prompt_pos = cache.select([row]), s.prompt_pos + n
            if s.prompt_pos in s.snapshots:
                self.prefix_cache.insert(s.request.prompt_ids[:s.prompt_pos], s.cache)
        return logits

    # -- decoding ---------------------------------------------------------------------------------

    def _step(self) -> None:
        """Feed every running stream's last token at once ([B, 1]) and sample each row with its own settings."""
        try:
            logits, self._cache = self.backend.step([s.last_token for s in self._running], self._cache)  # [B, V]
        except Exception as error:
            for stream in self._running:
                self._fail(stream, error)
            self._drop_finished()
            return
        self.counters["steps"] += 1
        tokens = self.backend.sample(logits, [s.request.sampling for s in self._running],
                                     [s.generator for s in self._running])
        for stream, token in zip(self._running, tokens, strict=True):
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
            streams = self._all_streams()
            self._pending.clear()
            self._prefilling, self._running, self._paused, self._cache = [], [], [], None
        for stream in streams:
            self._fail(stream, error)

    def _fail(self, stream: Stream, error: Exception) -> None:
        stream.finish_reason = "error"
        self.counters["errors"] += 1
        self._send(stream, Event("error", text=f"{type(error).__name__}: {error}", finish_reason="error"))

    @staticmethod
    def _send(stream: Stream, event: Event) -> None:
        stream.sent += 1
        try:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, event)
        except RuntimeError:  # the client's event loop is closed: nobody is listening any more
            stream.cancel()
