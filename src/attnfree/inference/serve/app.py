"""The HTTP face of the engine: a FastAPI app with a streaming endpoint, OpenAI-style completions and a page.

Endpoints: ``GET /`` (the page), ``GET /info``, ``GET /v1/models``, ``GET /health``, ``GET /stats``,
``POST /generate`` (server-sent events, or JSON with ``stream: false``), ``POST /v1/completions``.

Validation: unknown fields are rejected (422 naming the field), so a misspelt ``max_token`` never passes
silently; OpenAI fields we do not implement (``n`` > 1, ``echo``, ``logprobs``, ...) are accepted only at
their neutral value, otherwise 400 naming the field. Every error body is ``{"error": {"message", "type",
"param"}}``, as OpenAI's. An empty prompt starts from BOS.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from attnfree.data import TextTokenizer
from attnfree.inference.sampling import Sampling
from attnfree.inference.serve.engine import Engine, EngineFull, Event, GenerationRequest, RequestError, Stream

# ----------------------------------------------------------------------------------------------
# Request bodies
# ----------------------------------------------------------------------------------------------


class GenerateBody(BaseModel):
    """``POST /generate``: temperature > 0 samples; ``greedy`` picks the most likely token."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = ""
    max_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_k: int = Field(0, ge=0)  # 0 = off
    top_p: float = Field(1.0, gt=0, le=1)  # 1 = off
    greedy: bool = False
    seed: int | None = None
    stop: list[str] = Field(default_factory=list, max_length=4)
    ignore_eos: bool = False  # generate exactly max_tokens (benchmarks)
    stream: bool = True


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class CompletionBody(BaseModel):
    """``POST /v1/completions``, OpenAI's legacy completions: temperature 0 means greedy; top_k is ours."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | list[str] | list[int] = ""
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    n: int = 1
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    user: str | None = None
    # accepted at their neutral values only (400 otherwise)
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None


class HTTPError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def _error(status: int, message: str, param: str | None, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                        status_code=status)


def _unsupported(body: CompletionBody) -> None:
    """400 for OpenAI features this server does not implement, naming the field."""
    neutral = {"n": 1, "echo": False, "logprobs": None, "suffix": None, "presence_penalty": 0.0,
               "frequency_penalty": 0.0}
    for name, value in neutral.items():
        if getattr(body, name) != value:
            raise HTTPError(400, f"{name}={getattr(body, name)!r} is not supported (only {value!r})", name)
    if body.best_of not in (None, 1):
        raise HTTPError(400, f"best_of={body.best_of!r} is not supported (only 1)", "best_of")
    if body.logit_bias:
        raise HTTPError(400, "logit_bias is not supported", "logit_bias")


# ----------------------------------------------------------------------------------------------
# From bodies to engine requests
# ----------------------------------------------------------------------------------------------


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    items = [stop] if isinstance(stop, str) else list(stop or [])
    if len(items) > 4:
        raise HTTPError(400, f"stop takes at most 4 strings, got {len(items)}", "stop")
    if any(not s for s in items):
        raise HTTPError(400, "stop strings must be non-empty", "stop")
    return tuple(items)


def _prompt_ids(prompt: str | list[str] | list[int], tokenizer: TextTokenizer) -> list[int]:
    """Text (or one text in a list, or token ids) -> ids; an empty prompt starts from BOS."""
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        if len(prompt) != 1:
            raise HTTPError(400, f"prompt: batched prompts are not supported ({len(prompt)} given); send one "
                            "prompt per request", "prompt")
        prompt = str(prompt[0])
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
    return ids or [tokenizer.bos_token_id]


def _generate_request(body: GenerateBody, tokenizer: TextTokenizer) -> GenerationRequest:
    sampling = Sampling(greedy=True) if body.greedy else Sampling(body.temperature, body.top_k, body.top_p)
    return GenerationRequest(tuple(_prompt_ids(body.prompt, tokenizer)), body.max_tokens, sampling, body.seed,
                             _stops(body.stop), stop_at_eos=not body.ignore_eos)


def _completion_request(body: CompletionBody, tokenizer: TextTokenizer) -> GenerationRequest:
    _unsupported(body)
    greedy = body.temperature == 0
    sampling = Sampling(greedy=True) if greedy else Sampling(body.temperature, body.top_k, body.top_p)
    return GenerationRequest(tuple(_prompt_ids(body.prompt, tokenizer)), body.max_tokens, sampling, body.seed,
                             _stops(body.stop))


# ----------------------------------------------------------------------------------------------
# Streams to responses
# ----------------------------------------------------------------------------------------------


def _sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def _stream_sse(stream: Stream, render: Callable[[Event], list[str]]) -> AsyncIterator[str]:
    """SSE lines for each event; when the client goes away, the server cancels this generator and the
    ``finally`` frees the stream's slot."""
    try:
        async for event in stream.events():
            for line in render(event):
                yield line
    finally:
        stream.cancel()  # a no-op once the stream has finished


async def _collect(stream: Stream, request: Request) -> list[Event]:
    """All events of a non-streaming request; polls for a client that left (then cancels the stream)."""
    events: list[Event] = []
    try:
        while not events or events[-1].kind == "token":
            try:
                events.append(await asyncio.wait_for(stream.queue.get(), timeout=0.5))
            except asyncio.TimeoutError:  # (not the builtin TimeoutError before Python 3.11)
                if await request.is_disconnected():
                    break
    finally:
        stream.cancel()
    return events


def _sse_response(lines: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(lines, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _final_error(events: list[Event]) -> HTTPError | None:
    last = events[-1] if events else None
    if last is None or last.kind == "error":
        return HTTPError(500, last.text if last else "the client disconnected", None, "server_error")
    return None


# ----------------------------------------------------------------------------------------------
# The app
# ----------------------------------------------------------------------------------------------


def model_info(model: torch.nn.Module, tokenizer: TextTokenizer, engine: Engine, name: str) -> dict[str, Any]:
    """What /info reports: name, family, size, state per stream, limits."""
    config = getattr(model, "config", None)
    return {
        "name": name,
        "model_type": getattr(config, "model_type", type(model).__name__),
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "state_bytes_per_stream": engine.state_bytes_per_stream,
        "context_limit": engine.context_limit,
        "max_prompt_tokens": engine.max_prompt_tokens,
        "max_tokens": engine.max_tokens,
        "max_streams": engine.max_streams,
        "tokenizer": tokenizer.name,
        "vocab_size": tokenizer.vocab_size,
    }


def memory_mib() -> dict[str, float]:
    """This process's resident memory now and at its peak (Linux /proc), in MiB."""
    out: dict[str, float] = {}
    try:
        with open("/proc/self/status") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out["rss_mib" if key == "VmRSS" else "peak_rss_mib"] = round(int(value.split()[0]) / 1024, 2)
    except OSError:
        pass
    return out


def create_app(model: torch.nn.Module, tokenizer: TextTokenizer, model_name: str | None = None,
               max_streams: int = 64, max_queue: int = 0, max_tokens: int = 1024,
               max_prompt_tokens: int | None = None) -> FastAPI:
    """A FastAPI app serving ``model`` (a recurrent attnfree model) through one continuous-batching Engine.

    The engine's worker thread starts with the app (lifespan) and stops with it.
    """
    engine = Engine(model, tokenizer, max_streams, max_queue, max_tokens, max_prompt_tokens)
    name = str(model_name or getattr(getattr(model, "config", None), "model_type", "attnfree"))
    info = model_info(model, tokenizer, engine, name)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="attnfree", lifespan=lifespan)
    app.state.engine = engine
    _add_error_handlers(app)
    _add_routes(app, engine, tokenizer, info)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return _error(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}", None)
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = loc[0] if loc else None
        messages = "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}"
                             for e in errors)
        return _error(422, messages, param)

    @app.exception_handler(HTTPError)
    async def http_error(request: Request, exc: HTTPError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.param, exc.kind)


def _submit(engine: Engine, request: GenerationRequest) -> Stream:
    try:
        return engine.submit(request)
    except RequestError as error:
        raise HTTPError(400, str(error), error.field) from None
    except EngineFull as error:
        raise HTTPError(429, str(error), None, "rate_limit_error") from None


def _add_routes(app: FastAPI, engine: Engine, tokenizer: TextTokenizer, info: dict[str, Any]) -> None:
    page = resources.files("attnfree.inference.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return page

    @app.get("/info")
    async def get_info() -> dict[str, Any]:
        return info

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": info["name"]}

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        return {**engine.stats(), **memory_mib()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": info["name"], "object": "model", "created": 0,
                                            "owned_by": "attnfree"}]}

    @app.post("/generate", response_model=None)
    async def generate(body: GenerateBody, request: Request) -> StreamingResponse | dict[str, Any]:
        stream = _submit(engine, _generate_request(body, tokenizer))
        if body.stream:
            return _sse_response(_stream_sse(stream, _render_generate))
        events = await _collect(stream, request)
        if (failure := _final_error(events)) is not None:
            raise failure
        return {"text": "".join(e.text for e in events), "tokens": [e.token for e in events if e.kind == "token"],
                "finish_reason": events[-1].finish_reason, "stats": events[-1].stats}

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionBody, request: Request) -> StreamingResponse | dict[str, Any]:
        stream = _submit(engine, _completion_request(body, tokenizer))
        head = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": info["name"]}
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return _sse_response(_stream_sse(stream, _openai_renderer(head, usage)))
        events = await _collect(stream, request)
        if (failure := _final_error(events)) is not None:
            raise failure
        return {**head, "choices": [{"text": "".join(e.text for e in events), "index": 0, "logprobs": None,
                                     "finish_reason": events[-1].finish_reason}],
                "usage": _usage(events[-1])}


def _usage(done: Event) -> dict[str, int]:
    stats = done.stats or {}
    prompt, completion = int(stats.get("prompt_tokens", 0)), int(stats.get("completion_tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _render_generate(event: Event) -> list[str]:
    """Our SSE format: ``{"token", "text"}`` per token, then ``{"done": true, "finish_reason", "stats"}``."""
    if event.kind == "token":
        return [_sse({"token": event.token, "text": event.text})]
    if event.kind == "error":
        return [_sse({"error": {"message": event.text, "type": "server_error"}})]
    return [_sse({"done": True, "finish_reason": event.finish_reason, "stats": event.stats})]


def _openai_renderer(head: dict[str, Any], include_usage: bool) -> Callable[[Event], list[str]]:
    """OpenAI's streaming format: text_completion chunks, the last with finish_reason, then ``[DONE]``."""
    def chunk(text: str, finish: str | None) -> str:
        return _sse({**head, "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]})

    def render(event: Event) -> list[str]:
        if event.kind == "token":
            return [chunk(event.text, None)]
        if event.kind == "error":
            return [_sse({"error": {"message": event.text, "type": "server_error"}}), _sse("[DONE]")]
        lines = [chunk("", event.finish_reason)]
        if include_usage:
            lines.append(_sse({**head, "choices": [], "usage": _usage(event)}))
        return [*lines, _sse("[DONE]")]

    return render


def serve_checkpoint(checkpoint: str, host: str = "127.0.0.1", port: int = 8000, max_streams: int = 64,
                     max_queue: int = 0, max_tokens: int = 1024, threads: int | None = None, name: str | None = None,
                     log_level: str = "info") -> None:
    """``attnfree serve``: load a checkpoint and serve it with uvicorn until interrupted."""
    import uvicorn

    from attnfree.checkpoints import load_checkpoint

    if not 1 <= port <= 65535:
        raise ValueError(f"port must be in [1, 65535], got {port}")
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    model, tokenizer = load_checkpoint(checkpoint)
    app = create_app(model, tokenizer, name or Path(checkpoint).resolve().name, max_streams=max_streams,
                     max_queue=max_queue, max_tokens=max_tokens)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


@contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"
                    ) -> Iterator[str]:
    """Run ``app`` with uvicorn in a background thread (for tests and notebooks); yields its base URL.

    port 0 binds a free port: the socket is bound here, so there is no race for it.
    """
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
