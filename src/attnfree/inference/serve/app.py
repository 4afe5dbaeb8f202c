"""The HTTP face of the engine: a strict, OpenAI-compatible API with streaming, chat, and a page.

Endpoints: ``GET /`` (the page), ``GET /info``, ``GET /health``, ``GET /stats``, ``GET /v1/models``,
``GET /v1/models/{id}``, ``POST /generate`` (our streaming format: server-sent events, or JSON with ``stream:
false``), ``POST /v1/completions`` and ``POST /v1/chat/completions`` (OpenAI's, streaming or not).

Strict: request bodies are validated without coercion (``"stream": 0`` or ``"max_tokens": "3"`` is a 422 naming the
field, never a silent conversion) and unknown fields are rejected, so a misspelt ``max_token`` never passes
silently; OpenAI fields we do not implement (``n`` > 1, ``echo``, ``logprobs``, ...) are accepted only at their
neutral value, otherwise 400 naming the field; a ``model`` other than the served one is a 404 ``model_not_found``.
Every error, 404 and 405 included, is OpenAI's error object ``{"error": {"message", "type", "param", "code"}}``,
and the OpenAPI document lists every response (the SSE content type, 400, 401, 404, 422, 429).

Chat: a base model has no chat format. Messages are rendered with the tokenizer's chat template when the checkpoint
has one, else with ``PLAIN_CHAT_TEMPLATE`` (``/info`` says which). Access: with an API key, every endpoint but
``/health`` and the page itself requires ``Authorization: Bearer KEY`` (401 otherwise); keys are compared in
constant time and never logged.

The model runs through a backend (``backend.py``): a torch model, or an ONNX export (``serve`` detects it from
its manifest); this module imports no torch, so serving an export never loads it.
"""

import asyncio
import gc
import hmac
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, cast

from fastapi import FastAPI, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from attnfree.inference.sampling_options import Sampling
from attnfree.inference.serve.backend import Tokenizer as TextTokenizer
from attnfree.inference.serve.engine import Engine, EngineFull, Event, GenerationRequest, RequestError, Stream
from attnfree.inference.serve.schema import (
    CHAT_EVENTS,
    COMPLETION_EVENTS,
    DONE,
    ERRORS,
    GENERATE_EVENTS,
    Bodies,
    ChatBody,
    ChatMessage,
    ChatResponse,
    CompletionBody,
    CompletionResponse,
    GenerateBody,
    GenerateResponse,
    Limits,
    ModelCard,
    ModelList,
    OpenAIOptions,
    request_bodies,
    responses,
)
from attnfree.inference.serve.settings import LOOPBACK, ServeSettings, resolve

# ----------------------------------------------------------------------------------------------
# Requests
# ----------------------------------------------------------------------------------------------


def _takes(endpoint: Callable[..., Any], body: type[BaseModel]) -> Callable[..., Any]:
    """``endpoint`` with its ``body`` parameter annotated as ``body`` (the subclass with this server's limits),
    which is what FastAPI validates and documents."""
    endpoint.__annotations__ = {**endpoint.__annotations__, "body": body}
    return endpoint


PLAIN_CHAT_TEMPLATE = "one line per message, '<role>: <content>', then 'assistant:'"


class HTTPError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code


def _error(status: int, message: str, param: str | None, kind: str = "invalid_request_error",
           code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status)


def _unsupported(body: OpenAIOptions) -> None:
    """400 for OpenAI features this server does not implement (a value other than the neutral one the schema
    lists), naming the field."""
    neutral: dict[str, Any] = {"n": 1, "presence_penalty": 0.0, "frequency_penalty": 0.0}
    if isinstance(body, CompletionBody):
        neutral |= {"echo": False, "logprobs": None, "suffix": None}
        if body.best_of not in (None, 1):
            raise HTTPError(400, f"best_of={body.best_of!r} is not supported (only 1)", "best_of")
    if isinstance(body, ChatBody):
        neutral |= {"logprobs": False, "top_logprobs": None}
    for name, value in neutral.items():
        if getattr(body, name) != value:
            raise HTTPError(400, f"{name}={getattr(body, name)!r} is not supported (only {value!r})", name)
    if body.logit_bias:
        raise HTTPError(400, "logit_bias is not supported", "logit_bias")


# ----------------------------------------------------------------------------------------------
# From bodies to engine requests
# ----------------------------------------------------------------------------------------------


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    """The stop strings as a tuple (the schema has checked them: 4 at most, none empty)."""
    return (stop,) if isinstance(stop, str) else tuple(stop or ())


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


def _openai_request(body: OpenAIOptions, prompt_ids: list[int], max_tokens: int) -> GenerationRequest:
    _unsupported(body)
    greedy = body.temperature == 0
    sampling = Sampling(greedy=True) if greedy else Sampling(body.temperature, body.top_k, body.top_p)
    return GenerationRequest(tuple(prompt_ids), max_tokens, sampling, body.seed, _stops(body.stop))


def chat_prompt(messages: list[ChatMessage], tokenizer: TextTokenizer) -> list[int]:
    """The conversation as prompt ids: the tokenizer's chat template if it has one, else PLAIN_CHAT_TEMPLATE."""
    if chat_template(tokenizer) == "tokenizer":
        hf: Any = cast(Any, tokenizer).hf  # a PretrainedTokenizer: chat_template() said so
        rendered = hf.apply_chat_template([{"role": m.role, "content": m.text()} for m in messages],
                                          add_generation_prompt=True, tokenize=False)
        return tokenizer.encode(str(rendered))
    text = "".join(f"{m.role}: {m.text()}\n" for m in messages) + "assistant:"
    return tokenizer.encode(text)


def chat_template(tokenizer: TextTokenizer) -> str:
    """"tokenizer" when the tokenizer carries a chat template, else "plain"."""
    hf = getattr(tokenizer, "hf", None)
    return "tokenizer" if getattr(hf, "chat_template", None) else "plain"


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
                events.append(await asyncio.wait_for(stream.next_event(), timeout=0.5))
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


def model_info(tokenizer: TextTokenizer, engine: Engine, name: str) -> dict[str, Any]:
    """What /info reports: name, backend, family, size, state per stream, limits."""
    return {
        "name": name,
        **engine.backend.info(),
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


def create_app(model: Any, tokenizer: TextTokenizer, model_name: str | None = None,
               settings: ServeSettings | None = None, **overrides: Any) -> FastAPI:
    """A FastAPI app serving ``model`` (a ``Backend``, or a recurrent attnfree torch model) through one
    continuous-batching Engine, with ``settings`` (``ServeSettings``, or overrides of its fields by name).

    The engine's worker thread starts with the app (lifespan) and stops with it. With ``settings.api_key``, every
    endpoint but ``/health`` and the page requires ``Authorization: Bearer <api_key>``.
    """
    settings = resolve(settings, overrides)
    api_key = settings.api_key
    engine = Engine(model, tokenizer, settings)
    name = str(model_name or settings.name or engine.backend.info()["model_type"])
    info = model_info(tokenizer, engine, name)
    info |= {"chat_template": chat_template(tokenizer) if chat_template(tokenizer) == "tokenizer"
             else f"plain: {PLAIN_CHAT_TEMPLATE}", "api_key_required": api_key is not None}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        freeze_startup_objects()
        engine.start()
        try:
            yield
        finally:
            engine.stop()
            gc.unfreeze()  # collectable again at exit (extension modules report objects never collected)

    app = FastAPI(title="attnfree", lifespan=lifespan, version="1")
    app.state.engine = engine
    _add_error_handlers(app)
    if api_key is not None:
        _require_key(app, api_key)
    limits = Limits(name, tokenizer.vocab_size, engine.max_tokens, engine.max_prompt_tokens)
    _add_routes(app, engine, tokenizer, info, request_bodies(limits))
    return app


def freeze_startup_objects() -> None:
    """Move every object alive at start-up (torch's, transformers', the model's) out of the garbage collector's
    reach (``gc.freeze``). Without it, a full collection walks them all: ~0.5 s on a 2-core CPU, during which no
    stream gets a token (found as a 0.5 s time to first token in the load test: a collection triggered by the
    first streaming response's lazy imports)."""
    gc.collect()
    gc.freeze()


OPEN_PATHS = frozenset({"/", "/health"})  # reachable without the key: the page asks for it, and liveness


def _require_key(app: FastAPI, api_key: str) -> None:
    """401 in OpenAI's shape without ``Authorization: Bearer <key>`` (compared in constant time, never logged)."""
    expected = api_key.encode()

    @app.middleware("http")
    async def check(request: Request, call_next: Callable[[Request], Any]) -> Any:
        if request.url.path in OPEN_PATHS:
            return await call_next(request)
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            return _error(401, "missing API key: send the header 'Authorization: Bearer <key>'", None,
                          "invalid_request_error", "invalid_api_key")
        if not hmac.compare_digest(given.strip().encode(), expected):
            return _error(401, "incorrect API key provided", None, "invalid_request_error", "invalid_api_key")
        return await call_next(request)

    _document_key(app)


def _document_key(app: FastAPI) -> None:
    """The OpenAPI document states the key: a bearer scheme, required by every operation but the open ones."""
    plain = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = plain()
            schema.setdefault("components", {})["securitySchemes"] = {
                "apiKey": {"type": "http", "scheme": "bearer", "description": "attnfree serve --api-key"}}
            for path, operations in schema["paths"].items():
                for operation in operations.values():
                    operation["security"] = [] if path in OPEN_PATHS else [{"apiKey": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


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
        return _error(exc.status, exc.message, exc.param, exc.kind, exc.code)

    @app.exception_handler(StarletteHTTPException)
    async def starlette_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """404 (no such route), 405 (wrong method), ...: OpenAI's error object too."""
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = f"{request.method} {request.url.path}: {exc.detail}"
        response = _error(exc.status_code, message, None, "invalid_request_error", code)
        for key, value in (exc.headers or {}).items():
            response.headers[key] = value
        return response


def _submit(engine: Engine, request: GenerationRequest) -> Stream:
    try:
        return engine.submit(request)
    except RequestError as error:
        raise HTTPError(400, str(error), error.field) from None
    except EngineFull as error:
        raise HTTPError(429, str(error), None, "rate_limit_error", "rate_limit_exceeded") from None


def _check_model(requested: str | None, served: str) -> None:
    if requested is not None and requested != served:
        raise HTTPError(404, f"the model '{requested}' does not exist; this server serves '{served}'", "model",
                        "invalid_request_error", "model_not_found")


def _add_routes(app: FastAPI, engine: Engine, tokenizer: TextTokenizer, info: dict[str, Any], bodies: Bodies
                ) -> None:
    page = resources.files("attnfree.inference.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    card = {"id": info["name"], "object": "model", "created": 0, "owned_by": "attnfree"}

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return page

    @app.get("/info", responses=ERRORS)
    async def get_info() -> dict[str, Any]:
        return info

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": info["name"]}

    @app.get("/stats", responses=ERRORS)
    async def stats() -> dict[str, Any]:
        return {**engine.stats(), **memory_mib(), "torch_loaded": "torch" in sys.modules}

    @app.get("/v1/models", response_model=ModelList, responses=ERRORS)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id}", response_model=ModelCard, responses=ERRORS)
    async def model(model_id: Annotated[str, PathParam(json_schema_extra={"enum": [info["name"]]})]
                    ) -> dict[str, Any]:
        _check_model(model_id, info["name"])
        return card

    def post(path: str, endpoint: Callable[..., Any], response: type[BaseModel], events: dict[str, Any]) -> None:
        """A POST endpoint that answers JSON, or server-sent events when the body asks to stream."""
        app.post(path, response_model=None, responses=responses(response, events))(endpoint)

    async def generate(body: GenerateBody, request: Request) -> StreamingResponse | dict[str, Any]:
        stream = _submit(engine, _generate_request(body, tokenizer))
        if body.stream:
            return _sse_response(_stream_sse(stream, _render_generate))
        events = await _finished(stream, request)
        return {"text": "".join(e.text for e in events), "tokens": [e.token for e in events if e.kind == "token"],
                "finish_reason": events[-1].finish_reason, "stats": events[-1].stats}

    post("/generate", _takes(generate, bodies.generate), GenerateResponse, GENERATE_EVENTS)

    async def completions(body: CompletionBody, request: Request) -> StreamingResponse | dict[str, Any]:
        _check_model(body.model, info["name"])
        stream = _submit(engine, _openai_request(body, _prompt_ids(body.prompt, tokenizer), body.max_tokens))
        head = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": info["name"]}
        if body.stream:
            return _sse_response(_stream_sse(stream, _openai_renderer(head, _usage_asked(body), chat=False)))
        events = await _finished(stream, request)
        return {**head, "choices": [{"text": "".join(e.text for e in events), "index": 0, "logprobs": None,
                                     "finish_reason": events[-1].finish_reason}], "usage": _usage(events[-1])}

    post("/v1/completions", _takes(completions, bodies.completion), CompletionResponse, COMPLETION_EVENTS)

    async def chat(body: ChatBody, request: Request) -> StreamingResponse | dict[str, Any]:
        _check_model(body.model, info["name"])
        limit = body.max_completion_tokens or body.max_tokens or min(engine.max_tokens, 256)
        stream = _submit(engine, _openai_request(body, chat_prompt(body.messages, tokenizer), limit))
        head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": info["name"]}
        if body.stream:
            return _sse_response(_stream_sse(stream, _openai_renderer(head, _usage_asked(body), chat=True)))
        events = await _finished(stream, request)
        message = {"role": "assistant", "content": "".join(e.text for e in events)}
        return {**head, "object": "chat.completion", "usage": _usage(events[-1]),
                "choices": [{"index": 0, "message": message, "logprobs": None,
                             "finish_reason": events[-1].finish_reason}]}

    post("/v1/chat/completions", _takes(chat, bodies.chat), ChatResponse, CHAT_EVENTS)



async def _finished(stream: Stream, request: Request) -> list[Event]:
    """Every event of a non-streaming request, or the error it ended with."""
    events = await _collect(stream, request)
    if (failure := _final_error(events)) is not None:
        raise failure
    return events


def _usage_asked(body: OpenAIOptions) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


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


def _openai_renderer(head: dict[str, Any], include_usage: bool, chat: bool) -> Callable[[Event], list[str]]:
    """OpenAI's streaming formats: text_completion or chat.completion.chunk chunks (the chat's first delta carries
    the role), the last with finish_reason, an optional usage chunk, then ``[DONE]``."""
    started = [False]

    def choice(text: str, finish: str | None) -> dict[str, Any]:
        if not chat:
            return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
        delta: dict[str, Any] = {} if finish is not None else {"content": text}
        if not started[0]:
            delta, started[0] = {"role": "assistant", **delta}, True
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    def render(event: Event) -> list[str]:
        if event.kind == "token":
            return [_sse({**head, "choices": [choice(event.text, None)]})]
        if event.kind == "error":
            return [_sse({"error": {"message": event.text, "type": "server_error"}}), _sse(DONE)]
        lines = [_sse({**head, "choices": [choice("", event.finish_reason)]})]
        if include_usage:
            lines.append(_sse({**head, "choices": [], "usage": _usage(event)}))
        return [*lines, _sse(DONE)]

    return render


def load_for_serving(target: str | Path, settings: ServeSettings) -> tuple[Any, TextTokenizer]:
    """(backend, tokenizer) for a target folder: an ONNX export (it holds manifest.json; onnxruntime, no torch) or a
    run folder / checkpoint-N (torch)."""
    from attnfree.inference.serve.onnx_backend import is_export

    if is_export(target):
        from attnfree.inference.serve.onnx_backend import OnnxBackend

        backend = OnnxBackend(target, quantized=settings.quantized, threads=settings.threads)
        return backend, backend.tokenizer
    if settings.quantized:
        raise ValueError(f"quantized serves an export's int8 graphs; {target} is not an export (no manifest.json)")
    from attnfree.checkpoints import load_checkpoint
    from attnfree.inference.serve.torch_backend import TorchBackend

    model, tokenizer = load_checkpoint(target)
    return TorchBackend(model, threads=settings.threads), tokenizer


def serve(target: str | Path, settings: ServeSettings | None = None, **overrides: Any) -> None:
    """``attnfree serve``: load a checkpoint or an ONNX export and serve it with uvicorn until interrupted.

    The API key is ``settings.api_key``, else ``$ATTNFREE_API_KEY``; binding beyond loopback without one prints a
    warning."""
    import uvicorn

    settings = resolve(settings, overrides)
    if settings.api_key is None and os.environ.get(API_KEY_ENV):
        settings = settings.replace(api_key=os.environ[API_KEY_ENV])
    if settings.api_key is None and settings.host not in LOOPBACK:
        print(f"attnfree serve: warning: {settings.host} is reachable beyond this machine and no API key is set "
              f"(--api-key or ${API_KEY_ENV}): anyone who reaches it can use it", file=sys.stderr)
    backend, tokenizer = load_for_serving(target, settings)
    app = create_app(backend, tokenizer, settings.name or Path(target).resolve().name, settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level)


serve_checkpoint = serve  # the earlier name


API_KEY_ENV = "ATTNFREE_API_KEY"


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
