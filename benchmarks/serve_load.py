"""Load test of ``attnfree serve`` on loopback: concurrent streams, a shared prompt header, a long prompt arriving.

    python -m benchmarks.serve_load [--quick] [--scenarios plain,shared-header,long-prompt]
        [--out docs/results/serve/load.json] [--streams 1,8,64] [--lengths 64,512] [--model fastformer]
        [--hidden-size 256] [--layers 4] [--tokenizer gpt2] [--checkpoint RUN_DIR] [--threads 1]
        [--header-tokens 512] [--long-prompt-tokens 4096] [--fast-streams 8] [--chunks 512,4096]
        [--max-seconds-per-point 300] [--in-process] [--backends torch,onnx] [--export-dir DIR]

Three scenarios (``--scenarios``, all by default):

- plain: N streams of a fixed length from one short prompt (below);
- shared-header: N streams whose prompts share a ``--header-tokens`` header (a system prompt, a few-shot header)
  and differ after it, with the prefix cache on and off. Two requests with the header were served before (the
  header was in use), so with the cache on each new stream prefills only its own suffix. Reported: time to first
  token (p50, p99), total tokens/s, prompt tokens prefilled, cache hits;
- long-prompt: ``--fast-streams`` streams are decoding when one ``--long-prompt-tokens`` prompt arrives, with
  ``--chunks`` prefill chunk sizes (the largest: the whole prompt in one forward). Reported: the fast streams'
  inter-token gaps (p50, p99, max) while the long prompt is being prefilled and outside that window, and the
  long prompt's time to first token.

For each (streams, length) point a fresh server starts (a subprocess, so its peak memory is its own) with
a random registry model at the given size (or --checkpoint), and N clients POST /generate at once
(server-sent events, ``ignore_eos`` so every stream makes exactly `length` tokens, temperature 1 with
top-k 40). The client stamps each token event as it arrives. Reported per point:

- tokens_per_s_stream: median over streams of (tokens - 1) / (last - first token time)
- tokens_per_s_total: all tokens / wall time from the first request to the last event
- ttft_ms p50 / p99: time to the first token; itl_ms p50 / p99: gaps between a stream's tokens
- peak_rss_mib: the server's peak resident memory during the load (Linux VmHWM, reset after start-up and a
  warm-up request through /proc/PID/clear_refs, so loading the model does not count); idle_rss_mib: its
  resident memory just before the load; rss_growth_mib: the difference; state_kib: the peak total state

Memory should grow with the number of streams, not with their length: compare the two lengths.

``--backends torch,onnx`` serves the same model both ways, point by point: torch (the model in PyTorch) and onnx
(the model exported once with ``attnfree export``'s code into ``--export-dir``, served by ``attnfree serve
EXPORT_DIR`` in a process with ``ATTNFREE_NO_TORCH=1``, as on a device without torch). Each row then says its
``backend`` and adds ``startup_s`` (process start to the first answered request, a one-token /generate);
onnx rows add ``bare_step_tokens_per_s``, a bare loop over the exported step at batch 1 in this process (the floor
the server's one stream is measured against).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks.common import Row, ints, print_table, write_json

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["backend", "streams", "length", "tokens_per_s_stream", "tokens_per_s_total", "ttft_ms_p50", "ttft_ms_p99",
           "itl_ms_p50", "itl_ms_p99", "idle_rss_mib", "peak_rss_mib", "rss_growth_mib", "state_kib", "startup_s",
           "wall_s"]
HEADER_COLUMNS = ["streams", "prefix_cache", "prompt_tokens", "ttft_ms_p50", "ttft_ms_p99", "tokens_per_s_total",
                  "prefilled_tokens", "cache_hits", "wall_s"]
LONG_COLUMNS = ["prefill_chunk", "fast_streams", "long_prompt_tokens", "long_ttft_ms", "itl_ms_p50_during",
                "itl_ms_p99_during", "itl_ms_max_during", "itl_ms_p50_outside", "itl_ms_p99_outside"]
SCENARIOS = ("plain", "shared-header", "long-prompt")


# ----------------------------------------------------------------------------------------------
# The server (child process)
# ----------------------------------------------------------------------------------------------


def build_model_and_tokenizer(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """(model, tokenizer, name): a checkpoint, or a freshly initialised registry model (seed 0)."""
    import torch

    from attnfree.checkpoints import load_checkpoint
    from attnfree.data import load_tokenizer
    from attnfree.models.registry import ModelSize, build_model

    if args.checkpoint:
        model, tokenizer = load_checkpoint(args.checkpoint)
        return model, tokenizer, Path(args.checkpoint).name
    tokenizer = load_tokenizer(args.tokenizer)
    torch.manual_seed(0)
    size = ModelSize(args.hidden_size, args.heads, args.layers, n_positions=args.n_positions)
    model = build_model(args.model, size, tokenizer, {"position_embedding_type": args.positions}).eval()
    return model, tokenizer, f"{args.model} C={args.hidden_size} layers={args.layers} (random weights)"


def limits(args: argparse.Namespace) -> dict[str, Any]:
    """The server settings of every point (the same for both backends)."""
    longest = max([*ints(args.lengths), args.header_length, args.long_length])
    return {"max_streams": max(ints(args.streams)) + args.fast_streams + 2, "max_tokens": longest,
            "prefill_chunk": args.prefill_chunk, "prefix_cache_mib": args.prefix_cache_mib, "threads": args.threads}


def build_app(args: argparse.Namespace) -> Any:
    """The app the child serves (torch backend)."""
    from attnfree.inference.serve.app import create_app

    model, tokenizer, name = build_model_and_tokenizer(args)
    return create_app(model, tokenizer, name, **limits(args))


def export_once(args: argparse.Namespace) -> Path:
    """The model exported into --export-dir (kept: a later run with the same folder reuses it)."""
    from attnfree.inference.export import export_onnx

    folder = Path(args.export_dir)
    if not (folder / "manifest.json").is_file():
        model, tokenizer, _ = build_model_and_tokenizer(args)
        export_onnx(model, tokenizer, folder)
    return folder


def bare_step_rate(folder: Path, threads: int, steps: int = 200) -> float:
    """Tokens/s of a bare loop over the exported step at batch 1 (greedy), after a short prompt."""
    import numpy as np

    from attnfree.inference.runtime import OnnxLM

    lm = OnnxLM.load(folder, threads=threads)
    logits, state = lm.prefill([[lm.bos_token_id, 5, 6, 7]])
    for _ in range(10):  # warm-up
        logits, state = lm.step(logits.argmax(-1), state)
    start = time.perf_counter()
    for _ in range(steps):
        logits, state = lm.step(np.asarray(logits.argmax(-1)), state)
    return steps / (time.perf_counter() - start)


def serve_child(args: argparse.Namespace) -> None:
    import uvicorn

    uvicorn.run(build_app(args), host="127.0.0.1", port=args.port, log_level="warning")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_argv(args: argparse.Namespace, port: int) -> list[str]:
    if args.backend == "onnx":  # the deployment itself: attnfree serve EXPORT_DIR
        flags = [a for k, v in limits(args).items() for a in (f"--{k.replace('_', '-')}", str(v))]
        return [sys.executable, "-m", "attnfree.cli", "serve", args.export_dir, "--port", str(port),
                "--log-level", "warning", *flags]
    argv = [sys.executable, "-m", "benchmarks.serve_load", "--child", "--port", str(port), "--threads",
            str(args.threads), "--streams", args.streams, "--model", args.model, "--hidden-size",
            str(args.hidden_size), "--heads", str(args.heads), "--layers", str(args.layers), "--n-positions",
            str(args.n_positions), "--tokenizer", args.tokenizer, "--prefill-chunk", str(args.prefill_chunk),
            "--positions", args.positions, "--lengths", args.lengths, "--header-length", str(args.header_length),
            "--long-length", str(args.long_length),
            "--prefix-cache-mib", str(args.prefix_cache_mib), "--fast-streams", str(args.fast_streams)]
    return argv + (["--checkpoint", args.checkpoint] if args.checkpoint else [])


def reset_peak_rss(pid: int) -> None:
    """Start a new peak-RSS measurement for process pid (Linux: writing 5 to clear_refs resets VmHWM)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError as error:
        print(f"note: cannot reset the peak RSS of process {pid} ({error}); peak includes start-up")


@contextmanager
def server(args: argparse.Namespace) -> Iterator[tuple[str, int, float]]:
    """A fresh server for one point, its process id and its start-up time (to the first answered request): a
    subprocess (default) or a thread of this process (--in-process)."""
    import httpx

    if args.in_process:
        from attnfree.inference.serve.app import serve_in_thread

        start = time.perf_counter()
        with serve_in_thread(build_app(args)) as url:
            yield url, os.getpid(), first_answer(url, start)
        return
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    if args.backend == "onnx":
        env["ATTNFREE_NO_TORCH"] = "1"
    start = time.perf_counter()
    process = subprocess.Popen(child_argv(args, port), cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                httpx.get(f"{url}/health", timeout=1).raise_for_status()
                break
            except httpx.HTTPError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not start (exit code {process.poll()})") from None
                time.sleep(0.05)
        yield url, process.pid, first_answer(url, start)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def first_answer(url: str, start: float) -> float:
    """Seconds from ``start`` (the server process started) to a one-token /generate answered."""
    import httpx

    body = {"prompt": "Hi", "max_tokens": 1, "ignore_eos": True, "stream": False}
    httpx.post(f"{url}/generate", json=body, timeout=60).raise_for_status()
    return time.perf_counter() - start


# ----------------------------------------------------------------------------------------------
# The clients
# ----------------------------------------------------------------------------------------------


async def one_stream(url: str, body: dict[str, Any]) -> tuple[float, list[float]]:
    """POST /generate and stamp every token event as it arrives: (request start, [arrival times]).

    A plain asyncio connection (HTTP/1.1, chunked transfer) rather than httpx: on loopback here httpx's async
    client delivered the first event ~40 ms after the server sent it, which would be measured as server time.
    """
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    head = (f"POST /generate HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode()
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head + payload)
        status = (await reader.readline()).decode()
        headers = []
        while (line := await reader.readline()) not in (b"\r\n", b""):
            headers.append(line.decode().lower())
        if " 200 " not in status or "transfer-encoding: chunked\r\n" not in headers:
            raise RuntimeError(f"unexpected response: {status.strip()} {headers}")
        stamps, buffer = [], b""
        while size := int((await reader.readline()).strip() or b"0", 16):  # chunked: hex size, data, CRLF
            buffer += (await reader.readexactly(size + 2))[:-2]
            *events, buffer = buffer.split(b"\n\n")
            now = time.perf_counter()
            for event in events:
                if b'"error"' in event:
                    raise RuntimeError(event.decode())
                if b'"token"' in event:
                    stamps.append(now)
    finally:
        writer.close()
    return start, stamps


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] if ordered else float("nan")


async def load(url: str, pid: int, streams: int, length: int, prompt: str, timeout: float) -> Row:
    """N concurrent streams of `length` tokens each; client-side timings, server memory."""
    import httpx

    async with httpx.AsyncClient(timeout=timeout) as client:
        warm = {"prompt": prompt, "max_tokens": 4, "ignore_eos": True, "stream": False}
        (await client.post(f"{url}/generate", json=warm)).raise_for_status()
        reset_peak_rss(pid)
        idle = (await client.get(f"{url}/stats")).json()["rss_mib"]
        bodies = [{"prompt": prompt, "max_tokens": length, "temperature": 1.0, "top_k": 40, "seed": i,
                   "ignore_eos": True} for i in range(streams)]
        t0 = time.perf_counter()
        runs = await asyncio.wait_for(asyncio.gather(*(one_stream(url, b) for b in bodies)), timeout)
        wall = time.perf_counter() - t0
        stats = (await client.get(f"{url}/stats")).json()
    rates = [(len(s) - 1) / (s[-1] - s[0]) for _, s in runs if len(s) > 1 and s[-1] > s[0]]
    gaps = [(b - a) * 1e3 for _, s in runs for a, b in zip(s, s[1:])]
    ttft = [(s[0] - start) * 1e3 for start, s in runs if s]
    tokens = sum(len(s) for _, s in runs)
    if tokens != streams * length:
        raise RuntimeError(f"expected {streams * length} tokens, got {tokens}")
    return {"streams": streams, "length": length, "tokens": tokens,
            "tokens_per_s_stream": statistics.median(rates), "tokens_per_s_total": tokens / wall,
            "ttft_ms_p50": percentile(ttft, 50), "ttft_ms_p99": percentile(ttft, 99),
            "itl_ms_p50": percentile(gaps, 50), "itl_ms_p99": percentile(gaps, 99),
            "idle_rss_mib": idle, "peak_rss_mib": stats["peak_rss_mib"],
            "rss_growth_mib": stats["peak_rss_mib"] - idle, "state_kib": stats["peak_state_bytes"] / 1024,
            "state_bytes_per_stream": stats["state_bytes_per_stream"], "peak_active": stats["peak_active"],
            "wall_s": wall}


def run_point(args: argparse.Namespace, streams: int, length: int) -> Row:
    with server(args) as (url, pid, startup):
        info = json.loads(__import__("httpx").get(f"{url}/info").text)
        row = asyncio.run(load(url, pid, streams, length, args.prompt, args.max_seconds_per_point))
    return {"backend": args.backend, **row, "startup_s": startup, "model": info["name"],
            "parameters": info["parameters"]}


def header_prompts(tokenizer_name: str, header_tokens: int, n: int) -> list[str]:
    """n prompts that share a header of ``header_tokens`` tokens (the start of Shakespeare, cut at a token) and
    then differ (a request number)."""
    from attnfree.data import load_tokenizer
    from attnfree.data.fetch import packaged_text

    tokenizer = load_tokenizer(tokenizer_name)
    header = tokenizer.decode(tokenizer.encode(packaged_text("tinyshakespeare/input.txt")[:20 * header_tokens])
                              [:header_tokens])
    return [f"{header}\n\nRequest {i}: continue." for i in range(n)]


async def shared_header(url: str, streams: int, length: int, prompts: list[str], timeout: float) -> Row:
    """Two requests with the header first (served one after the other: the second leaves the header's state in the
    cache, where the two diverge), then ``streams`` concurrent streams with prompts[2:]."""
    import httpx

    async with httpx.AsyncClient(timeout=timeout) as client:
        for prompt in prompts[:2]:
            warm = {"prompt": prompt, "max_tokens": 1, "ignore_eos": True, "stream": False}
            (await client.post(f"{url}/generate", json=warm)).raise_for_status()
        before = (await client.get(f"{url}/stats")).json()
        bodies = [{"prompt": p, "max_tokens": length, "temperature": 1.0, "top_k": 40, "seed": i,
                   "ignore_eos": True} for i, p in enumerate(prompts[2:2 + streams])]
        t0 = time.perf_counter()
        runs = await asyncio.wait_for(asyncio.gather(*(one_stream(url, b) for b in bodies)), timeout)
        wall = time.perf_counter() - t0
        after = (await client.get(f"{url}/stats")).json()
    ttft = [(s[0] - start) * 1e3 for start, s in runs if s]
    return {"streams": streams, "length": length, "ttft_ms_p50": percentile(ttft, 50),
            "ttft_ms_p99": percentile(ttft, 99), "tokens_per_s_total": sum(len(s) for _, s in runs) / wall,
            "prefilled_tokens": after["prefill_tokens"] - before["prefill_tokens"],
            "cache_hits": after["prefix_cache_hits"] - before["prefix_cache_hits"], "wall_s": wall}


async def long_prompt_arrives(url: str, fast: int, length: int, long_prompt: str, timeout: float) -> Row:
    """``fast`` streams decode; once each has made a few tokens, one long prompt arrives (8 new tokens). The fast
    streams' gaps are split by whether they overlap the window from the long request to its first token."""
    bodies = [{"prompt": "The meaning of life is", "max_tokens": length, "temperature": 1.0, "top_k": 40,
               "seed": i, "ignore_eos": True} for i in range(fast)]
    import httpx

    tasks = [asyncio.create_task(one_stream(url, b)) for b in bodies]
    async with httpx.AsyncClient() as client:  # wait until the fast streams are decoding (16 tokens each)
        while (await client.get(f"{url}/stats")).json()["tokens"] < 16 * fast:
            await asyncio.sleep(0.01)
    sent = time.perf_counter()
    _, long_stamps = await asyncio.wait_for(
        one_stream(url, {"prompt": long_prompt, "max_tokens": 8, "ignore_eos": True, "greedy": True}), timeout)
    runs = await asyncio.wait_for(asyncio.gather(*tasks), timeout)
    first = long_stamps[0]
    during: list[float] = []
    outside: list[float] = []
    for _, stamps in runs:
        for a, b in zip(stamps, stamps[1:]):
            (during if b > sent and a < first else outside).append((b - a) * 1e3)
    if not during or not all(s[-1] > first for _, s in runs):
        raise RuntimeError("the fast streams ended before the long prompt's first token: use a larger --lengths")
    return {"fast_streams": fast, "long_ttft_ms": (first - sent) * 1e3,
            "itl_ms_p50_during": percentile(during, 50), "itl_ms_p99_during": percentile(during, 99),
            "itl_ms_max_during": max(during), "itl_ms_p50_outside": percentile(outside, 50),
            "itl_ms_p99_outside": percentile(outside, 99)}


def run_shared_header(args: argparse.Namespace) -> list[Row]:
    from attnfree.data import load_tokenizer

    streams = ints(args.streams)
    prompts = header_prompts(args.tokenizer, args.header_tokens, max(streams) + 2)
    tokens = len(load_tokenizer(args.tokenizer).encode(prompts[2]))
    rows = []
    for cache_mib in (64.0, 0.0):
        for n in streams:
            point = argparse.Namespace(**{**vars(args), "prefix_cache_mib": cache_mib})
            with server(point) as (url, _, _):
                row = asyncio.run(shared_header(url, n, args.header_length, prompts, args.max_seconds_per_point))
            rows.append({**row, "prefix_cache": "on" if cache_mib else "off", "prompt_tokens": tokens})
            print(f"shared header, {n} streams, cache {rows[-1]['prefix_cache']}: ttft p50 "
                  f"{row['ttft_ms_p50']:.1f} ms, {row['prefilled_tokens']} tokens prefilled", flush=True)
    return rows


def run_long_prompt(args: argparse.Namespace) -> list[Row]:
    from attnfree.data import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    long_prompt = header_prompts(args.tokenizer, args.long_prompt_tokens, 1)[0]
    rows = []
    for chunk in ints(args.chunks):
        point = argparse.Namespace(**{**vars(args), "prefill_chunk": chunk})
        with server(point) as (url, _, _):
            row = asyncio.run(long_prompt_arrives(url, args.fast_streams, args.long_length, long_prompt,
                                                  args.max_seconds_per_point))
        rows.append({"prefill_chunk": chunk, "long_prompt_tokens": len(tokenizer.encode(long_prompt)), **row})
        print(f"long prompt, chunk {chunk}: fast streams' gap p99 {row['itl_ms_p99_during']:.1f} ms while it "
              f"prefills ({row['itl_ms_p99_outside']:.1f} ms outside)", flush=True)
    return rows


# ----------------------------------------------------------------------------------------------
# Plot and main
# ----------------------------------------------------------------------------------------------


def plot(path: Path, rows: list[Row]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for backend, n in sorted({(r.get("backend", "torch"), r["length"]) for r in rows}):
        sub = sorted((r for r in rows if r["length"] == n and r.get("backend", "torch") == backend),
                     key=lambda r: r["streams"])
        length = f"{n}, {backend}"
        x = [r["streams"] for r in sub]
        axes[0].plot(x, [r["tokens_per_s_total"] for r in sub], marker="o", label=f"total, {length} tokens")
        axes[0].plot(x, [r["tokens_per_s_stream"] for r in sub], marker="s", ls="--", label=f"per stream, {length}")
        axes[1].plot(x, [r["itl_ms_p50"] for r in sub], marker="o", label=f"p50, {length} tokens")
        axes[1].plot(x, [r["itl_ms_p99"] for r in sub], marker="s", ls="--", label=f"p99, {length} tokens")
        axes[2].plot(x, [r["rss_growth_mib"] for r in sub], marker="o", label=f"RSS, {length} tokens per stream")
        axes[2].plot(x, [r["state_kib"] / 1024 for r in sub], marker="s", ls="--", label=f"state, {length} tokens")
    titles = ("tokens/s", "inter-token latency (ms)", "server memory growth under load (MiB)")
    for ax, title in zip(axes, titles, strict=True):
        ax.set(xscale="log", xlabel="concurrent streams", title=title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny model, byte tokenizer, 1 and 4 streams of 8/32 tokens")
    p.add_argument("--out", default="docs/results/serve/load.json", help="JSON output (a PNG beside it)")
    p.add_argument("--streams", default="1,8,64", help="concurrent streams per point (default: 1,8,64)")
    p.add_argument("--lengths", default="64,512", help="tokens per stream (default: 64,512)")
    p.add_argument("--model", default="fastformer", help="registry model spec (default: fastformer)")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--positions", default="none", choices=("none", "learned"),
                   help="the model's position embedding (default: none, no length limit)")
    p.add_argument("--n-positions", type=int, default=1024, help="with --positions learned: the longest sequence")
    p.add_argument("--tokenizer", default="gpt2", help="byte, gpt2 (default, from the data bundle), ...")
    p.add_argument("--checkpoint", default=None, help="serve this checkpoint instead of a random model")
    p.add_argument("--prompt", default="The meaning of life is", help="every stream's prompt")
    p.add_argument("--threads", type=int, default=1, help="the server's torch threads (default: 1)")
    p.add_argument("--max-seconds-per-point", type=float, default=300.0)
    p.add_argument("--in-process", action="store_true", help="serve from a thread of this process (tests)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"any of {', '.join(SCENARIOS)} (default: all)")
    p.add_argument("--header-tokens", type=int, default=512, help="shared-header: the header's length in tokens")
    p.add_argument("--header-length", type=int, default=64, help="shared-header: tokens each stream makes")
    p.add_argument("--long-prompt-tokens", type=int, default=4096, help="long-prompt: the long prompt's tokens")
    p.add_argument("--long-length", type=int, default=1024, help="long-prompt: tokens each fast stream makes")
    p.add_argument("--fast-streams", type=int, default=8, help="long-prompt: streams decoding when it arrives")
    p.add_argument("--chunks", default="512,4096", help="long-prompt: prefill chunk sizes to compare")
    p.add_argument("--prefill-chunk", type=int, default=512, help="the server's prefill chunk (plain, shared-header)")
    p.add_argument("--prefix-cache-mib", type=float, default=64.0, help="the server's prefix cache (plain)")
    p.add_argument("--backends", default="torch", help="torch, onnx, or both side by side: 'torch,onnx' (plain "
                   "scenario; the others run on torch)")
    p.add_argument("--export-dir", default="/tmp/attnfree-serve-load-export", help="where the onnx backend's export "
                   "is written (reused when it holds one)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--backend", default="torch", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.streams, args.lengths = "1,4", "8,32"
        args.hidden_size, args.heads, args.layers, args.n_positions, args.tokenizer = 32, 2, 2, 128, "byte"
        args.header_tokens, args.header_length, args.long_prompt_tokens, args.long_length = 64, 8, 512, 2000
        args.fast_streams, args.chunks = 2, "32,512"
    unknown = set(args.scenarios.split(",")) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenarios {sorted(unknown)}; choose from {', '.join(SCENARIOS)}")
    return args


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse(argv)
    if args.child:
        serve_child(args)
        return []
    scenarios = args.scenarios.split(",")
    rows: list[Row] = []
    payload: dict[str, Any] = {"settings": {k: v for k, v in vars(args).items() if k not in ("child", "port")}}
    if "plain" in scenarios:
        backends = args.backends.split(",")
        if "onnx" in backends:
            bare = bare_step_rate(export_once(args), args.threads)
            payload["bare_step_tokens_per_s"] = bare
            print(f"bare loop over the exported step, batch 1: {bare:.1f} tokens/s", flush=True)
        for length in ints(args.lengths):
            for streams in ints(args.streams):
                for backend in backends:
                    rows.append(run_point(argparse.Namespace(**{**vars(args), "backend": backend}), streams, length))
                    print(f"{backend} streams={streams} length={length}: {rows[-1]['tokens_per_s_total']:.1f} "
                          f"tokens/s total, ttft p50 {rows[-1]['ttft_ms_p50']:.1f} ms, idle RSS "
                          f"{rows[-1]['idle_rss_mib']:.0f} MiB, start-up {rows[-1]['startup_s']:.1f} s", flush=True)
        payload |= {"rows": rows, "table": print_table(rows, COLUMNS)}
    if "shared-header" in scenarios:
        header = run_shared_header(args)
        payload |= {"shared_header": header, "shared_header_table": print_table(header, HEADER_COLUMNS)}
    if "long-prompt" in scenarios:
        long = run_long_prompt(args)
        payload |= {"long_prompt": long, "long_prompt_table": print_table(long, LONG_COLUMNS)}
    out = Path(args.out)
    write_json(out, payload)
    if rows:
        plot(out.with_suffix(".png"), rows)
    print(f"wrote {out}" + (f" and {out.with_suffix('.png')}" if rows else ""))
    return rows


if __name__ == "__main__":
    main()
