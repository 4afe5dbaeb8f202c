"""The serving stack: cache batching helpers, the continuous-batching engine, and the HTTP server talked to
with a real client (httpx) over loopback: streaming, OpenAI completions, concurrency, bad requests,
disconnects and the stream limit."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from attnfree.data import ByteTokenizer
from attnfree.inference.decoding import stream_generate
from attnfree.inference.sampling import Sampling
from attnfree.inference.serve.engine import Engine, GenerationRequest, IncrementalDecoder, StopText
from attnfree.models.registry import ModelSize, build_model

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from attnfree.inference.serve.app import create_app, serve_in_thread  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TOK = ByteTokenizer()
PROMPTS = ["", "a", "Hello", "héllo wörld", "ROMEO:", "0123456789" * 3, "€uro", "\n\n"]


def tiny(name: str = "fastformer", n_positions: int = 1024) -> torch.nn.Module:
    """A random tiny model in float64, so batching cannot flip a greedy argmax by rounding; learned positions, so the
    server's context limit is there to test.

    Leviathan's lags follow n_positions: at 64 its rings hold 36 keys, so the tests' streams wrap them.
    """
    torch.manual_seed(0)
    size = ModelSize(32, 2, 2, n_positions=n_positions)
    return build_model(name, size, TOK, {"position_embedding_type": "learned"}).double().eval()


def reference(model: torch.nn.Module, prompt: str, max_tokens: int, eos: bool = True) -> list[int]:
    """Greedy ids from ``stream_generate``, one prompt alone (an empty prompt starts from BOS)."""
    ids = torch.tensor([TOK.encode(prompt) or [TOK.bos_token_id]])
    tokens = [int(t) for t in stream_generate(model, ids, max_tokens, Sampling(greedy=True),
                                              eos_token_id=TOK.eos_token_id if eos else None)]
    return tokens[:tokens.index(TOK.eos_token_id) + 1] if eos and TOK.eos_token_id in tokens else tokens


def sse_events(response: Any) -> Iterator[Any]:
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            yield payload if payload == "[DONE]" else json.loads(payload)


# ----------------------------------------------------------------------------------------------
# Text helpers
# ----------------------------------------------------------------------------------------------


def test_incremental_decoder_never_splits_a_character() -> None:
    text = "héllo € 😀 ok ✓"
    decoder = IncrementalDecoder(TOK)
    deltas = [decoder.push(b) for b in TOK.encode(text)] + [decoder.flush()]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
    # an incomplete character at the very end comes out (replaced) at flush, not lost
    decoder = IncrementalDecoder(TOK)
    held = [decoder.push(b) for b in TOK.encode("ok€")[:-1]]
    assert "".join(held) == "ok" and decoder.flush() == "\ufffd"
    # a long stream keeps only the decode window, not every token it produced
    decoder, long_text = IncrementalDecoder(TOK), "naïve café " * 300
    assert "".join(decoder.push(b) for b in TOK.encode(long_text)) + decoder.flush() == long_text
    assert len(decoder.ids) <= 4


@pytest.mark.parametrize(("deltas", "stops", "expected", "stopped"), [
    (["Hel", "lo\nWor", "ld"], ["\n"], "Hello", True),
    (["ab", "c", "END", "x"], ["END"], "abc", True),
    (["ab", "E", "N", "x"], ["END"], "abENx", False),  # a partial match is held back, then released
    (["one", "two"], [], "onetwo", False),
], ids=["newline", "word", "partial", "none"])
def test_stop_text(deltas: list[str], stops: list[str], expected: str, stopped: bool) -> None:
    stop, out, hit = StopText(stops), "", False
    for d in deltas:
        text, hit = stop.feed(d)
        out += text
        if hit:
            break
    assert (out + ("" if hit else stop.flush()), hit) == (expected, stopped)


# ----------------------------------------------------------------------------------------------
# The engine alone: streams joining a running batch give the tokens they give alone
# ----------------------------------------------------------------------------------------------


async def tokens_of(stream: Any) -> list[int]:
    return [e.token async for e in stream.events() if e.kind == "token"]


@pytest.mark.parametrize("name", ["fastformer", "leviathan"])
def test_engine_streams_joining_late_match_each_alone(name: str) -> None:
    """Greedy streams give stream_generate's tokens; seeded sampled streams (sensitive to any change in the
    probabilities) give the tokens they give alone, though each joined a batch already under way."""
    model = tiny(name, n_positions=64)
    engine = Engine(model, TOK, max_streams=4, max_tokens=64)
    prompts, lengths = ["abc", "The quick brown", "z", "héllo"], [40, 25, 30, 12]
    requests = [GenerationRequest(tuple(TOK.encode(p)), n, Sampling(greedy=True) if i % 2 else Sampling(1.0),
                                  seed=i, stop_at_eos=False)
                for i, (p, n) in enumerate(zip(prompts, lengths, strict=True))]

    async def run(late: bool) -> list[list[int]]:
        engine.start()
        try:
            if not late:
                return [await tokens_of(engine.submit(r)) for r in requests]
            streams = []
            for request in requests:  # each joins after the batch made 3 more tokens
                start = engine.counters["tokens"]
                streams.append(engine.submit(request))
                while engine.counters["tokens"] < start + 3:
                    await asyncio.sleep(0.001)
            return [await tokens_of(s) for s in streams]
        finally:
            engine.stop()

    joined = asyncio.run(run(late=True))
    assert engine.counters["peak_active"] > 1, "the streams never shared a batch"
    assert joined == asyncio.run(run(late=False))
    assert joined[1::2] == [reference(model, prompts[i], lengths[i], eos=False) for i in (1, 3)]
    assert engine.stats()["active_streams"] == 0


def test_engine_prefills_prompts_of_any_lengths_together_with_the_same_results() -> None:
    model = tiny("leviathan", n_positions=64)
    engine = Engine(model, TOK, max_streams=8, max_tokens=32)
    prompts = ["abcd", "wxyz", "1234", "ab", "cd"]

    async def run() -> list[list[int]]:
        engine.start()
        try:
            with engine._cond:  # (re-entrant) the worker takes none of them before all five wait
                streams = [engine.submit(GenerationRequest(tuple(TOK.encode(p)), 20, stop_at_eos=False))
                           for p in prompts]
            return [await tokens_of(s) for s in streams]
        finally:
            engine.stop()

    assert asyncio.run(run()) == [reference(model, p, 20, eos=False) for p in prompts]
    assert engine.counters["prefills"] == 1  # one left-padded forward for prompts of two lengths


# ----------------------------------------------------------------------------------------------
# The HTTP server
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny()


@pytest.fixture(scope="module")
def url(model: torch.nn.Module) -> Iterator[str]:
    with serve_in_thread(create_app(model, TOK, "tiny-fastformer", max_streams=8, max_tokens=1000)) as base:
        yield base


def wait_idle(url: str, timeout: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        stats = httpx.get(f"{url}/stats").json()
        if stats["active_streams"] == 0 and stats["queued_streams"] == 0 or time.monotonic() > deadline:
            return stats
        time.sleep(0.01)


def test_page_info_health_models(url: str, model: torch.nn.Module) -> None:
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'id="generate"' in page.text and "<script" in page.text and "http" not in page.text.split("<script")[1]
    info = httpx.get(f"{url}/info").json()
    assert info["name"] == "tiny-fastformer" and info["parameters"] == sum(p.numel() for p in model.parameters())
    assert info["context_limit"] == 1024 and info["state_bytes_per_stream"] > 0
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == "tiny-fastformer"


def test_generate_streams_tokens_as_they_come(url: str, model: torch.nn.Module) -> None:
    body = {"prompt": "Hello", "max_tokens": 400, "greedy": True, "ignore_eos": True}
    with httpx.stream("POST", f"{url}/generate", json=body, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
        first = next(events)
        # the first token reached us while the stream is still being generated
        assert httpx.get(f"{url}/stats").json()["active_streams"] == 1
        rest = list(events)
    tokens = [first["token"]] + [e["token"] for e in rest if "token" in e]
    assert tokens == reference(model, "Hello", 400, eos=False)
    done = rest[-1]
    assert done["done"] and done["finish_reason"] == "length" and done["stats"]["completion_tokens"] == 400
    assert first["text"] + "".join(e.get("text", "") for e in rest) == TOK.decode(tokens)
    # stream=false returns the same thing as one JSON object
    whole = httpx.post(f"{url}/generate", json={**body, "stream": False}, timeout=30).json()
    assert whole["tokens"] == tokens and whole["text"] == TOK.decode(tokens)


def test_completions_stream_and_not(url: str, model: torch.nn.Module) -> None:
    body = {"model": "tiny-fastformer", "prompt": "ROMEO:", "max_tokens": 20, "temperature": 0}
    plain = httpx.post(f"{url}/v1/completions", json=body, timeout=30).json()
    expected = reference(model, "ROMEO:", 20)
    assert plain["object"] == "text_completion" and plain["choices"][0]["text"] == TOK.decode(expected)
    assert plain["choices"][0]["finish_reason"] == ("stop" if len(expected) < 20 else "length")
    assert plain["usage"] == {"prompt_tokens": 6, "completion_tokens": len(expected), "total_tokens": 6 + len(expected)}
    stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{url}/v1/completions", json=stream_body, timeout=30) as response:
        chunks = list(sse_events(response))
    assert chunks[-1] == "[DONE]"
    assert chunks[-2]["usage"] == plain["usage"] and chunks[-2]["choices"] == []
    assert chunks[-3]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert "".join(c["choices"][0]["text"] for c in chunks[:-2]) == plain["choices"][0]["text"]
    assert all(c["id"] == chunks[0]["id"] and c["object"] == "text_completion" for c in chunks[:-1])


def test_stop_string_cuts_the_completion(url: str, model: torch.nn.Module) -> None:
    full = TOK.decode(reference(model, "abc", 30, eos=False))
    stop = full[5:7]
    out = httpx.post(f"{url}/v1/completions", json={"prompt": "abc", "max_tokens": 30, "temperature": 0,
                                                    "stop": [stop]}).json()
    assert out["choices"][0]["text"] == full[:full.index(stop)] and out["choices"][0]["finish_reason"] == "stop"


def test_concurrent_streams_match_sequential(url: str, model: torch.nn.Module) -> None:
    async def one(client: Any, prompt: str) -> list[int]:
        body = {"prompt": prompt, "max_tokens": 60, "greedy": True}
        async with client.stream("POST", f"{url}/generate", json=body) as response:
            return [json.loads(line[6:]).get("token") async for line in response.aiter_lines()
                    if line.startswith("data: ") and '"token"' in line]

    async def all_at_once() -> list[list[int]]:
        async with httpx.AsyncClient(timeout=60) as client:
            return list(await asyncio.gather(*(one(client, p) for p in PROMPTS)))

    before = httpx.get(f"{url}/stats").json()["peak_active"]
    results = asyncio.run(all_at_once())
    assert results == [reference(model, p, 60) for p in PROMPTS]
    assert max(before, httpx.get(f"{url}/stats").json()["peak_active"]) >= 4, "the streams never shared a batch"
    assert wait_idle(url)["active_streams"] == 0


def test_seeded_sampling_does_not_depend_on_the_batch(url: str) -> None:
    body = {"prompt": "seed", "max_tokens": 40, "temperature": 1.3, "top_k": 50, "top_p": 0.9, "seed": 1234,
            "ignore_eos": True, "stream": False}

    async def many() -> list[list[int]]:
        async with httpx.AsyncClient(timeout=60) as client:
            replies = await asyncio.gather(*(client.post(f"{url}/generate", json=body) for _ in range(4)))
            return [r.json()["tokens"] for r in replies]

    alone = httpx.post(f"{url}/generate", json=body, timeout=30).json()
    assert alone["stats"]["seed"] == 1234
    assert all(tokens == alone["tokens"] for tokens in asyncio.run(many()))


@pytest.mark.parametrize(("path", "body", "status", "param"), [
    ("/generate", {"prompt": "x", "max_tokens": -1}, 422, "max_tokens"),
    ("/generate", {"prompt": "x", "max_tokens": 1001}, 422, "max_tokens"),
    ("/generate", {"prompt": "x", "temperature": 0}, 422, "temperature"),
    ("/generate", {"prompt": "x", "top_p": 1.5}, 422, "top_p"),
    ("/generate", {"prompt": "x", "top_k": -3}, 422, "top_k"),
    ("/generate", {"prompt": "x" * 1025}, 400, "prompt"),
    ("/generate", {"prompt": "x" * 1000, "max_tokens": 100}, 400, "max_tokens"),
    ("/generate", {"prompt": "x", "max_token": 5}, 422, "max_token"),
    ("/generate", {"prompt": 5}, 422, "prompt"),
    ("/v1/completions", {"prompt": "x", "temperature": -0.5}, 422, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": 2.5}, 422, "temperature"),
    ("/v1/completions", {"prompt": "x", "n": 2}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "logprobs": 3}, 400, "logprobs"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 422, "prompt"),
    ("/v1/completions", {"prompt": [1, 999]}, 422, "prompt"),
    ("/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 422, "stop"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 422, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 3.5}, 422, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "stop": ""}, 422, "stop"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4o"}, 404, "model"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_requests_name_the_field(url: str, path: str, body: dict[str, Any], status: int, param: str) -> None:
    """422: the body breaks the schema (which states the server's limits); 400: a limit no schema can state (a text
    prompt's length in tokens, the context) or an OpenAI option this server does not implement."""
    reply = httpx.post(f"{url}{path}", json=body)
    error = reply.json()["error"]
    assert reply.status_code == status, error
    assert error["param"] == param and param in error["message"]


def test_bad_json_is_a_400(url: str) -> None:
    reply = httpx.post(f"{url}/v1/completions", content=b'{"prompt": ', headers={"content-type": "application/json"})
    assert reply.status_code == 400 and "not valid JSON" in reply.json()["error"]["message"]


def test_client_disconnect_frees_the_stream(url: str) -> None:
    before = httpx.get(f"{url}/stats").json()
    body = {"prompt": "bye", "max_tokens": 1000, "greedy": True, "ignore_eos": True}
    with httpx.stream("POST", f"{url}/generate", json=body) as response:
        events = sse_events(response)  # (held: dropping the generator would close the connection already)
        assert "token" in next(events)
        assert httpx.get(f"{url}/stats").json()["active_streams"] == 1
    stats = wait_idle(url)  # leaving the block closed the connection mid-stream
    assert stats["active_streams"] == 0 and stats["state_bytes_total"] == 0
    assert stats["cancelled"] == before["cancelled"] + 1
    assert stats["tokens"] - before["tokens"] < 1000, "the stream ran to its end instead of being cancelled"


def test_stream_limit_answers_429(model: torch.nn.Module) -> None:
    with serve_in_thread(create_app(model, TOK, max_streams=1, max_tokens=1000)) as base:
        body = {"prompt": "hold", "max_tokens": 1000, "greedy": True, "ignore_eos": True}
        with httpx.stream("POST", f"{base}/generate", json=body) as response:
            events = sse_events(response)
            assert "token" in next(events)
            refused = httpx.post(f"{base}/generate", json={"prompt": "x", "max_tokens": 2})
            assert refused.status_code == 429 and "busy" in refused.json()["error"]["message"]
        wait_idle(base)
        assert httpx.post(f"{base}/generate", json={"prompt": "x", "max_tokens": 2, "stream": False}).status_code == 200
        assert httpx.get(f"{base}/stats").json()["rejected_full"] == 1


@pytest.mark.slow
def test_load_benchmark_quick(tmp_path: Any) -> None:
    """``python -m benchmarks.serve_load --quick`` as a user runs it (the server in-process, to stay fast)."""
    out = tmp_path / "load.json"
    cmd = [sys.executable, "-m", "benchmarks.serve_load", "--quick", "--in-process", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "|---|" in done.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [(r["streams"], r["length"]) for r in rows] == [(1, 8), (4, 8), (1, 32), (4, 32)]
    assert all(r["tokens"] == r["streams"] * r["length"] and r["tokens_per_s_total"] > 0 for r in rows)
    # the recurrent state is per stream: 4 streams hold 4 states whatever their length
    by_point = {(r["streams"], r["length"]): r["state_kib"] for r in rows}
    assert by_point[(4, 8)] == by_point[(4, 32)] == 4 * by_point[(1, 8)]
    assert out.with_suffix(".png").stat().st_size > 0
    # shared header: with the cache each stream prefills only its suffix, without it the whole prompt
    header = {(r["streams"], r["prefix_cache"]): r for r in json.loads(out.read_text())["shared_header"]}
    for n in (1, 4):
        on, off = header[(n, "on")], header[(n, "off")]
        assert on["cache_hits"] == n and off["cache_hits"] == 0
        assert off["prefilled_tokens"] == n * off["prompt_tokens"] and on["prefilled_tokens"] <= n * 16
    # a long prompt arriving: measured for each chunk size, with gaps during and outside its prefill
    long = json.loads(out.read_text())["long_prompt"]
    assert [r["prefill_chunk"] for r in long] == [32, 512] and all(r["itl_ms_max_during"] > 0 for r in long)


def test_cli_serve_checks_its_arguments(tmp_path: Path, capsys: Any) -> None:
    from attnfree.cli import build_parser, main

    ns = build_parser().parse_args(["serve", "ckpt", "--port", "9000", "--max-streams", "8"])
    assert (ns.target, ns.port, ns.max_streams) == ("ckpt", 9000, 8) and not hasattr(ns, "host")  # given flags only
    assert main(["serve", str(tmp_path)]) == 2
    assert "no model checkpoint" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--port", "70000"]) == 2
    assert "port must be in [1, 65535]" in capsys.readouterr().err


def test_every_server_setting_is_a_flag_and_reaches_the_engine() -> None:
    """ServeSettings is declared once: each field is a serve flag with its help, and the engine takes it whole."""
    import dataclasses

    from attnfree.cli import build_parser
    from attnfree.inference.serve.settings import ServeSettings

    parser = build_parser("serve")
    serve_parser = next(a for a in parser._actions if a.dest == "command").choices["serve"]  # type: ignore[union-attr]
    flags = {a.dest: a for a in serve_parser._actions}
    for f in dataclasses.fields(ServeSettings):
        assert f.name in flags and f.metadata["help"] in (flags[f.name].help or ""), f.name
    ns = parser.parse_args(["serve", "x", "--max-buffered", "7", "--max-prompt-tokens", "33", "--prefix-cache-mib",
                            "0.5", "--quantized"])
    settings = ServeSettings(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(ServeSettings)
                                if hasattr(ns, f.name)})
    engine = Engine(tiny(), TOK, settings)
    assert (engine.max_buffered, engine.max_prompt_tokens, engine.prefix_cache.max_bytes) == (7, 33, 2**19)
    for bad in ({"max_buffered": 0}, {"max_prompt_tokens": 0}, {"prefix_cache_mib": -1}, {"api_key": ""}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ServeSettings(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown server setting"):
        Engine(tiny(), TOK, max_stream=3)
