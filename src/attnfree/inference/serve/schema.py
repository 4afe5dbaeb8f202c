"""What the server's OpenAPI document states: request bodies (strict, with the server's own limits), responses,
the errors, and the server-sent events of each streaming endpoint.

The request bodies are generic classes (``GenerateBody``, ``CompletionBody``, ``ChatBody``); ``request_bodies``
derives one server's classes from them with its limits in the schema (the model's name, the max_tokens bound, the
token-id range), so that what the document calls valid is served and what it calls invalid is refused: schemathesis
checks both (tests/inference/test_api.py).
"""

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, create_model

# ----------------------------------------------------------------------------------------------
# Request bodies
# ----------------------------------------------------------------------------------------------


STRICT = ConfigDict(extra="forbid", strict=True)  # no coercion: a wrong type is an error naming the field


def _whole_number(value: Any) -> Any:
    """An integer field takes a JSON integer, or a number with no fractional part (3.0: JSON Schema's "integer"
    includes it); never 3.5, "3" or true."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {type(value).__name__} {value!r}")
    return value


def _integer(ge: int, le: int | None = None, lt: int | None = None) -> Any:
    """An integer type with bounds that takes whole floats (the bounds come before the converter: the order that
    puts them in the JSON schema)."""
    return Annotated[int, Field(ge=ge, le=le, lt=lt), BeforeValidator(_whole_number)]


Int = Annotated[int, BeforeValidator(_whole_number)]
Count = Annotated[int, Field(ge=1), BeforeValidator(_whole_number)]  # max_tokens (bounded per server, below)
NonNegative = Annotated[int, Field(ge=0), BeforeValidator(_whole_number)]


def _lone_surrogates(value: Any) -> Any:
    """JSON may carry a lone surrogate (``"\\ud800"``), which no UTF-8 text holds: it becomes U+FFFD, as a UTF-8
    decoder would make of it, so that prompts and stop strings are always encodable text."""
    return LONE_SURROGATE.sub("\ufffd", value) if isinstance(value, str) else value


LONE_SURROGATE = re.compile("[\ud800-\udfff]")
Text = Annotated[str, BeforeValidator(_lone_surrogates)]
Stop = Annotated[str, Field(min_length=1), BeforeValidator(_lone_surrogates)]


def only(neutral: Any, schema: dict[str, Any]) -> Any:
    """An OpenAI field this server accepts at its neutral value only: the schema says so; the app answers 400
    naming the field for any other value of the right type."""
    return Field(neutral, json_schema_extra=schema)


class GenerateBody(BaseModel):
    """``POST /generate``: temperature > 0 samples; ``greedy`` picks the most likely token."""

    model_config = STRICT
    prompt: Text = ""
    max_tokens: Count = 64  # the default and the upper bound follow the server's max_tokens
    temperature: float = Field(1.0, gt=0)
    top_k: NonNegative = 0  # 0 = off
    top_p: float = Field(1.0, gt=0, le=1)  # 1 = off
    greedy: bool = False
    seed: Int | None = None  # any integer (the engine takes it modulo 2**64)
    stop: list[Stop] = Field(default_factory=list, max_length=4)
    ignore_eos: bool = False  # generate exactly max_tokens (benchmarks)
    stream: bool = True


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False


class OpenAIOptions(BaseModel):
    """What OpenAI's completions and chat completions share: sampling, stopping, streaming, and the options this
    server accepts at their neutral value only."""

    model_config = STRICT
    model: str = ""  # the served model's name (the default and the only value: the schema lists it)
    temperature: float = Field(1.0, ge=0, le=2)  # 0: greedy
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: NonNegative = 0  # ours (OpenAI has none): 0 = off
    stop: Stop | Annotated[list[Stop], Field(max_length=4)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: Int | None = None  # any integer (the engine takes it modulo 2**64)
    user: str | None = None
    n: Int = only(1, {"minimum": 1, "maximum": 1})
    presence_penalty: float = only(0.0, {"const": 0})
    frequency_penalty: float = only(0.0, {"const": 0})
    logit_bias: dict[str, float] | None = only(None, {"anyOf": [{"type": "object", "maxProperties": 0},
                                                                 {"type": "null"}]})


class CompletionBody(OpenAIOptions):
    """``POST /v1/completions``, OpenAI's legacy completions: a text, a list with one text, or token ids."""

    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=1)] | list[Int] = ""
    max_tokens: Count = 16
    echo: bool = only(False, {"const": False})
    logprobs: Int | None = only(None, {"anyOf": [{"type": "null"}]})
    best_of: Int | None = only(None, {"anyOf": [{"type": "integer", "const": 1}, {"type": "null"}]})
    suffix: str | None = only(None, {"anyOf": [{"type": "null"}]})


class TextPart(BaseModel):
    model_config = STRICT
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = STRICT
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatBody(OpenAIOptions):
    """``POST /v1/chat/completions``, OpenAI's chat completions (text only). ``max_completion_tokens`` is the
    newer name of ``max_tokens``; given both, it wins."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Count | None = None
    max_completion_tokens: Count | None = None
    logprobs: bool = only(False, {"const": False})
    top_logprobs: Int | None = only(None, {"anyOf": [{"type": "null"}]})


@dataclass(frozen=True)
class Limits:
    """What one server takes, for its request schema: the model's name, the vocabulary, the engine's limits."""

    model: str
    vocab_size: int
    max_tokens: int
    max_prompt_tokens: int | None


class Bodies(NamedTuple):
    generate: type[GenerateBody]
    completion: type[CompletionBody]
    chat: type[ChatBody]


def request_bodies(limits: Limits) -> Bodies:
    """The request bodies of one server: the generic ones with its limits in the schema (the model name, the
    max_tokens bound and defaults, the token-id range, the longest token-id prompt), so that what the OpenAPI
    document calls valid is served. (Two limits no schema can state: a text prompt's length in tokens, and, for a
    model with learned positions, prompt + max_tokens within its context; those are 400s naming the field.)"""
    M = limits.max_tokens
    model = (str, Field(limits.model, json_schema_extra={"enum": [limits.model]}))
    token = _integer(ge=0, lt=limits.vocab_size)
    ids = Annotated[list[token], Field(max_length=limits.max_prompt_tokens)]  # type: ignore[valid-type]
    prompt = Text | Annotated[list[Text], Field(min_length=1, max_length=1)] | ids

    bounded = _integer(ge=1, le=M)

    def tokens(default: int) -> Any:  # the default, capped at the server's bound
        return (bounded, min(default, M))

    optional_tokens = (bounded | None, None)
    return Bodies(
        create_model("GenerateBody", __base__=GenerateBody, max_tokens=tokens(64)),
        create_model("CompletionBody", __base__=CompletionBody, model=model, max_tokens=tokens(16),
                     prompt=(prompt, "")),
        create_model("ChatBody", __base__=ChatBody, model=model, max_tokens=optional_tokens,
                     max_completion_tokens=optional_tokens))



# ----------------------------------------------------------------------------------------------
# Responses and errors
# ----------------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error object: every error this server answers has this body."""

    error: ErrorDetail


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": why} for status, why in (
        (400, "a request this server cannot serve (the error names the field)"),
        (401, "missing or incorrect API key (when the server has one)"),
        (404, "unknown model"),
        (422, "the body does not match the schema (wrong type, unknown field; no coercion)"),
        (429, "every stream and queue place is busy: retry later"),
        (500, "the generation failed"))}


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "attnfree"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: None = None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str | None


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class GenerateResponse(BaseModel):
    text: str
    tokens: list[int]
    finish_reason: str | None
    stats: dict[str, Any] | None


# ----------------------------------------------------------------------------------------------
# Server-sent events: one schema per event (the event's ``data`` holds JSON of the documented shape)
# ----------------------------------------------------------------------------------------------


class TokenEvent(BaseModel):
    """``/generate`` streams one per token (``text`` may be empty: a byte that ends a character later)."""

    token: int
    text: str


class DoneEvent(BaseModel):
    """``/generate``'s last event."""

    done: Literal[True]
    finish_reason: str | None
    stats: dict[str, Any] | None


class StreamError(BaseModel):
    """An error after the stream has started (the status is already 200)."""

    error: dict[str, Any]


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta
    logprobs: None = None
    finish_reason: str | None


class CompletionChunk(BaseModel):
    """``/v1/completions`` streams these: one per token, the last with finish_reason, then (if asked) usage."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatChunk(BaseModel):
    """``/v1/chat/completions`` streams these: the role first, the content, finish_reason, then (if asked) usage."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


DONE = "[DONE]"  # OpenAI's streams end with this line, which is not JSON


def _inline(schema: Any, defs: dict[str, Any]) -> Any:
    """A JSON schema with its local ``$ref``s to ``defs`` replaced by their targets (an event's content schema is
    read on its own, where no ``$defs`` can be reached)."""
    if isinstance(schema, dict):
        if "$ref" in schema:
            return _inline(defs[schema["$ref"].rsplit("/", 1)[-1]], defs)
        return {k: _inline(v, defs) for k, v in schema.items() if k != "$defs"}
    if isinstance(schema, list):
        return [_inline(v, defs) for v in schema]
    return schema


def event_schema(payload: Any, done_marker: bool) -> dict[str, Any]:
    """The schema of one server-sent event whose ``data`` is JSON matching ``payload`` (a type), or, with
    ``done_marker``, the literal ``[DONE]``."""
    schema = TypeAdapter(payload).json_schema()
    content = {"type": "string", "contentMediaType": "application/json",
               "contentSchema": _inline(schema, schema.get("$defs", {}))}
    data = {"if": {"const": DONE}, "else": content} if done_marker else content
    return {"type": "object", "required": ["data"], "properties": {"data": data}}


GENERATE_EVENTS = event_schema(TokenEvent | DoneEvent | StreamError, done_marker=False)
COMPLETION_EVENTS = event_schema(CompletionChunk | StreamError, done_marker=True)
CHAT_EVENTS = event_schema(ChatChunk | StreamError, done_marker=True)


def responses(model: type[BaseModel], events: dict[str, Any]) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI responses of a streaming endpoint: JSON ``model``, or with ``stream: true`` server-sent events
    (each matching ``events``), and every error."""
    ok = {"description": "the result; server-sent events with stream: true", "model": model,
          "content": {"text/event-stream": {"schema": events}}}
    return {200: ok, **ERRORS}
