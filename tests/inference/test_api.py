"""The OpenAI-compatible API as real clients see it: the official ``openai`` client, strict validation, OpenAI's error
object everywhere, chat, the documented schema (fuzzed with schemathesis), and access control.

Every server test runs on both backends: the torch model, and its ONNX export (exported once into the module's tmp
folder, served by onnxruntime). Expected texts come from the torch model's own greedy decoding, so on the ONNX
backend they also check that both servers give the same greedy text, token by token."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from attnfree.data import ByteTokenizer
from attnfree.inference.decoding import stream_generate
from attnfree.inference.sampling import Sampling

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from attnfree.inference.serve.app import PLAIN_CHAT_TEMPLATE, create_app, serve_in_thread  # noqa: E402

TOK = ByteTokenizer()
NAME = "tiny-fastformer"
KEY = "sk-test-0123456789"


@pytest.fixture(scope="module")
def model(tiny_model: torch.nn.Module) -> torch.nn.Module:
    return tiny_model


@pytest.fixture(scope="module", params=["torch", "onnx"])
def served(request: Any, model: torch.nn.Module) -> tuple[Any, Any]:
    """(what create_app serves, its tokenizer): the torch model, or an OnnxBackend of the same model's export (and
    the export's own tokenizer, as ``attnfree serve EXPORT_DIR`` loads it)."""
    if request.param == "torch":
        return model, TOK
    from attnfree.inference.serve.onnx_backend import OnnxBackend

    backend = OnnxBackend(request.getfixturevalue("tiny_export")[1])
    return backend, backend.tokenizer


@pytest.fixture(scope="module")
def url(served: tuple[Any, Any]) -> Iterator[str]:
    with serve_in_thread(create_app(*served, NAME, max_streams=8, max_tokens=200)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url: str) -> Any:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)


def greedy(model: torch.nn.Module, prompt_ids: list[int], n: int) -> str:
    tokens = [int(t) for t in stream_generate(model, torch.tensor([prompt_ids]), n, Sampling(greedy=True),
                                              eos_token_id=TOK.eos_token_id)]
    return TOK.decode(tokens)


# ----------------------------------------------------------------------------------------------
# The official client
# ----------------------------------------------------------------------------------------------


def test_completions_through_the_openai_client(client: Any, model: torch.nn.Module) -> None:
    done = client.completions.create(model=NAME, prompt="ROMEO:", max_tokens=12, temperature=0)
    assert done.choices[0].text == greedy(model, TOK.encode("ROMEO:"), 12) and done.usage.prompt_tokens == 6
    chunks = list(client.completions.create(model=NAME, prompt="ROMEO:", max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == done.choices[0].text
    assert chunks[-1].usage.completion_tokens == done.usage.completion_tokens


def test_chat_through_the_openai_client_streaming_and_not(client: Any, model: torch.nn.Module) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is Juliet?"}]
    done = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0)
    rendered = "system: Be brief.\nuser: Who is Juliet?\nassistant:"  # the plain template (no chat template here)
    assert done.choices[0].message.role == "assistant"
    assert done.choices[0].message.content == greedy(model, TOK.encode(rendered), 10)
    assert done.usage.prompt_tokens == len(TOK.encode(rendered))
    deltas = list(client.chat.completions.create(model=NAME, messages=messages, max_completion_tokens=10,
                                                 temperature=0, stream=True))
    assert deltas[0].choices[0].delta.role == "assistant" and deltas[-1].choices[0].finish_reason in ("stop", "length")
    assert "".join(d.choices[0].delta.content or "" for d in deltas) == done.choices[0].message.content
    both = client.chat.completions.create(model=NAME, messages=messages, max_tokens=50, max_completion_tokens=3,
                                          temperature=0)  # max_completion_tokens is the newer name: it wins
    assert both.usage.completion_tokens == 3 and done.choices[0].message.content.startswith(
        both.choices[0].message.content)


def test_models_list_and_retrieve(client: Any, url: str) -> None:
    assert [m.id for m in client.models.list()] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError) as error:
        client.models.retrieve("gpt-4o")
    assert error.value.body["code"] == "model_not_found"
    info = httpx.get(f"{url}/info").json()
    assert info["chat_template"] == f"plain: {PLAIN_CHAT_TEMPLATE}" and info["api_key_required"] is False


def test_errors_reach_the_client_in_openai_shape(client: Any) -> None:
    with pytest.raises(openai.NotFoundError) as unknown:
        client.completions.create(model="gpt-4o", prompt="x", max_tokens=2)
    assert unknown.value.body["code"] == "model_not_found" and unknown.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as unsupported:
        client.completions.create(model=NAME, prompt="x", max_tokens=2, n=2)
    assert unsupported.value.body["param"] == "n"
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model=NAME, messages=[], max_tokens=2)


def test_a_stream_closed_by_the_client_is_cancelled(client: Any, url: str) -> None:
    stream = client.completions.create(model=NAME, prompt="go", max_tokens=190, temperature=0.9, stream=True)
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 10
    while httpx.get(f"{url}/stats").json()["active_streams"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert httpx.get(f"{url}/stats").json()["active_streams"] == 0


# ----------------------------------------------------------------------------------------------
# Strict validation, errors and the schema
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, param", [({"stream": 0}, "stream"), ({"stream": "no"}, "stream"),
                                           ({"max_tokens": "3"}, "max_tokens"), ({"max_tokens": 3.5}, "max_tokens"),
                                           ({"greedy": 1}, "greedy"), ({"max_token": 3}, "max_token"),
                                           ({"seed": True}, "seed"), ({"top_k": "2"}, "top_k")])
def test_no_type_coercion(url: str, change: dict[str, Any], param: str) -> None:
    answer = httpx.post(f"{url}/generate", json={"prompt": "a", "max_tokens": 2, **change})
    assert answer.status_code == 422 and answer.json()["error"]["param"] == param


def test_whole_numbers_are_integers_and_odd_text_is_served(url: str) -> None:
    """JSON Schema's integer includes 3.0; a lone surrogate (valid JSON, not UTF-8) is read as U+FFFD; any integer
    seed works (modulo 2**64), the same seed giving the same text."""
    body = json.dumps({"prompt": "a\ud800b", "max_tokens": 3.0, "seed": -(2**70), "stop": ["\ud800"],
                       "stream": False})  # ASCII JSON: the surrogate travels as the escape \\ud800
    first, second = (httpx.post(f"{url}/generate", content=body, headers={"content-type": "application/json"})
                     for _ in range(2))
    assert first.status_code == 200 and len(first.json()["tokens"]) <= 3
    assert first.json()["stats"]["prompt_tokens"] == len("a\ufffdb".encode())  # one U+FFFD: 5 bytes
    assert first.json()["text"] == second.json()["text"]


def test_route_and_method_errors_are_openai_error_objects(url: str) -> None:
    for response, status, code in ((httpx.get(f"{url}/v1/nothing"), 404, "not_found"),
                                   (httpx.get(f"{url}/v1/completions"), 405, "method_not_allowed")):
        assert response.status_code == status
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        assert response.json()["error"]["code"] == code


def test_the_openapi_document_lists_every_response(url: str) -> None:
    doc = httpx.get(f"{url}/openapi.json").json()
    for path in ("/generate", "/v1/completions", "/v1/chat/completions"):
        responses = doc["paths"][path]["post"]["responses"]
        assert {"200", "400", "401", "404", "422", "429"} <= set(responses), path
        assert {"application/json", "text/event-stream"} <= set(responses["200"]["content"]), path
        assert responses["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert "/v1/models/{model_id}" in doc["paths"]


def fuzz(base: str, examples: int, *headers: str) -> str:
    """Run the schemathesis CLI against a served app: every check, valid and invalid data, every phase (examples,
    boundary values, random fuzzing, stateful sequences), a fixed seed; returns its summary, asserting no finding."""
    cli = [sys.executable, "-m", "schemathesis.cli", "run", f"{base}/openapi.json", "--checks", "all", "--mode", "all",
           "--max-examples", str(examples), "--seed", "1", "--no-color", *[a for h in headers for a in ("-H", h)]]
    with tempfile.TemporaryDirectory() as scratch:  # where the CLI keeps its cache (.schemathesis/)
        done = subprocess.run(cli, capture_output=True, text=True, timeout=600, cwd=scratch)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    return done.stdout


def test_schemathesis_finds_nothing(served: tuple[Any, Any]) -> None:
    """The OpenAPI document describes the API exactly: schemathesis (its CLI, as a user runs it) finds no server
    error, serves what the schema calls valid, refuses what it calls invalid, and every status, content type, body
    and server-sent event is as documented. A position-free model: with learned positions, prompt + max_tokens must
    also fit the context, a limit no JSON schema can state (a 400 naming the field)."""
    pytest.importorskip("schemathesis")
    with serve_in_thread(create_app(*served, NAME, max_streams=4, max_queue=64, max_tokens=4)) as base:
        summary = fuzz(base, 30)
    generated = re.search(r"(\d+) generated, (\d+) passed", summary)
    assert generated and int(generated[1]) == int(generated[2]) >= 500, summary[-3000:]


def test_schemathesis_with_an_api_key(served: tuple[Any, Any]) -> None:
    """With a key, the document declares the bearer scheme, and schemathesis checks that every operation refuses
    a request without it (its ignored_auth check) while serving the ones that carry it."""
    pytest.importorskip("schemathesis")
    app = create_app(*served, NAME, max_streams=4, max_queue=64, max_tokens=4, api_key=KEY)
    with serve_in_thread(app) as base:
        fuzz(base, 5, f"Authorization: Bearer {KEY}")
        document = httpx.get(f"{base}/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert document["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
    assert document["paths"]["/v1/completions"]["post"]["security"] == [{"apiKey": []}]
    assert document["paths"]["/health"]["get"]["security"] == []


# ----------------------------------------------------------------------------------------------
# Access control
# ----------------------------------------------------------------------------------------------


def test_an_api_key_guards_every_endpoint_but_health_and_the_page(served: tuple[Any, Any]) -> None:
    with serve_in_thread(create_app(*served, NAME, max_tokens=8, api_key=KEY)) as base:
        assert httpx.get(f"{base}/health").status_code == 200 and httpx.get(f"{base}/").status_code == 200
        for path in ("/info", "/stats", "/v1/models"):
            missing = httpx.get(f"{base}{path}")
            assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
        wrong = httpx.get(f"{base}/v1/models", headers={"Authorization": "Bearer sk-wrong"})
        assert wrong.status_code == 401
        assert httpx.get(f"{base}/info", headers={"Authorization": f"Bearer {KEY}"}).json()["api_key_required"]
        good = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)
        assert good.completions.create(model=NAME, prompt="a", max_tokens=3, temperature=0).choices[0].text is not None
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="sk-wrong", max_retries=0).models.list()


def test_the_prefix_cache_shows_in_stats_and_changes_nothing(url: str, model: torch.nn.Module) -> None:
    header = "You are a careful assistant. " * 8
    answers = []
    for question in ("Who?", "Why?", "Who?"):
        answer = httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": header + question,
                                                           "max_tokens": 6, "temperature": 0}).json()
        answers.append(answer["choices"][0]["text"])
    assert answers == [greedy(model, TOK.encode(header + q), 6) for q in ("Who?", "Why?", "Who?")]
    stats = httpx.get(f"{url}/stats").json()
    assert stats["prefix_cache_hits"] >= 1 and stats["prefix_cache_tokens_saved"] >= len(TOK.encode(header))
    json.dumps(stats)


def test_a_client_that_stops_reading_pauses_only_its_own_stream(served: tuple[Any, Any]) -> None:
    """Back-pressure end to end: a raw-socket client asks for a long stream and stops reading. Once the socket
    buffers are full (kept small here: 4 KiB each way, so this takes seconds, not minutes), the server stops
    pulling its events, the engine pauses that stream (its state set aside), and other clients are served as
    before; closing the socket frees the stream."""
    import socket
    import threading

    import uvicorn

    app = create_app(*served, NAME, max_tokens=100_000, max_buffered=16)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # accepted sockets inherit it (Linux)
    listener.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.01)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        slow = socket.socket()
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.connect(listener.getsockname())
        body = json.dumps({"prompt": "slow", "max_tokens": 100_000, "ignore_eos": True}).encode()
        slow.sendall(b"POST /generate HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        assert slow.recv(1024).startswith(b"HTTP/1.1 200")  # then it reads nothing more

        def stats() -> dict[str, Any]:
            return dict(httpx.get(f"{url}/stats").json())

        deadline = time.monotonic() + 60
        tokens = -1
        while True:  # paused, and still paused after the socket buffers took what they could (no new token)
            now = stats()
            if now["paused_streams"] == 1 and now["tokens"] == tokens:
                break
            assert time.monotonic() < deadline, now
            tokens = now["tokens"]
            time.sleep(0.5)
        fast = httpx.post(f"{url}/generate", json={"prompt": "fast", "max_tokens": 50, "ignore_eos": True,
                                                   "stream": False}, timeout=30).json()
        assert len(fast["tokens"]) == 50
        assert stats()["tokens"] == tokens + 50 and stats()["paused_streams"] == 1  # the paused stream made none
        slow.close()
        while stats()["active_streams"]:
            assert time.monotonic() < deadline, stats()
            time.sleep(0.1)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        listener.close()


def test_the_server_freezes_its_startup_objects_out_of_the_collector(model: torch.nn.Module) -> None:
    """A full garbage collection over torch's and the model's objects stalled every stream for ~0.5 s (the load
    test's time to first token); the server freezes them at start-up, so collections walk only new objects."""
    import gc

    gc.unfreeze()
    with serve_in_thread(create_app(model, TOK, NAME)):
        assert gc.get_freeze_count() > 10_000
