"""Serving an ONNX export without torch: ``attnfree serve EXPORT_DIR`` in a fresh process answers the official
``openai`` client and never imports torch; and for every registered recurrent family, the torch server and the
ONNX server of the same model give the same greedy tokens (mixed prompt lengths, concurrent streams, a prompt
longer than a prefill chunk, a prefix from the prefix cache)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from attnfree.data import ByteTokenizer
from attnfree.inference.decoding import stream_generate
from attnfree.inference.sampling import Sampling
from attnfree.inference.serve.engine import Engine, GenerationRequest
from attnfree.models.base import RecurrentForCausalLM
from attnfree.models.registry import MODELS, ModelSize, build_model
from attnfree.testing import perturb

pytest.importorskip("fastapi")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

TOK = ByteTokenizer()
KEY = "sk-edge-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def greedy(model: torch.nn.Module, prompt: str, n: int) -> str:
    tokens = [int(t) for t in stream_generate(model, torch.tensor([TOK.encode(prompt)]), n, Sampling(greedy=True),
                                              eos_token_id=TOK.eos_token_id)]
    return TOK.decode(tokens)


def test_attnfree_serve_an_export_answers_the_openai_client_without_torch(tiny_export: tuple[Any, Path]) -> None:
    """A fresh interpreter runs the CLI on the export folder (ATTNFREE_NO_TORCH=1 keeps the package from importing
    torch, as on a device without it); after completions, chat and streaming, /stats says torch is not loaded."""
    model, folder = tiny_export
    port = free_port()
    argv = [sys.executable, "-m", "attnfree.cli", "serve", str(folder), "--port", str(port), "--api-key", KEY,
            "--max-streams", "4", "--threads", "1", "--log-level", "warning", "--name", "edge"]
    process = subprocess.Popen(argv, env={**os.environ, "ATTNFREE_NO_TORCH": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, "the server exited"
            try:
                if httpx.get(f"{base}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=30)
        done = client.completions.create(model="edge", prompt="ROMEO:", max_tokens=12, temperature=0)
        assert done.choices[0].text == greedy(model, "ROMEO:", 12)
        chunks = list(client.chat.completions.create(model="edge", messages=[{"role": "user", "content": "Hi"}],
                                                     max_tokens=8, temperature=0.8, seed=3, stream=True))
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="sk-wrong", max_retries=0).models.list()
        headers = {"Authorization": f"Bearer {KEY}"}
        info = httpx.get(f"{base}/info", headers=headers).json()
        stats = httpx.get(f"{base}/stats", headers=headers).json()
        assert info["backend"] == "onnx" and info["dtype"] == "float32" and info["parameters"] > 0
        assert stats["tokens"] >= 13 and stats["torch_loaded"] is False
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_serve_refuses_what_it_cannot_serve(tiny_export: tuple[Any, Path], tmp_path: Path, capsys: Any) -> None:
    from attnfree.cli import main

    assert main(["serve", str(tiny_export[1]), "--quantized"]) == 2
    assert "no int8 graphs" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--quantized"]) == 2
    assert "not an export" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# The same greedy tokens from both backends, for every family
# ----------------------------------------------------------------------------------------------

SIZE = ModelSize(hidden_size=24, n_heads=3, num_layers=2, n_positions=256)
OVERRIDES = {"leviathan": {"dense_lags": 4, "segment": 3}, "leviathan-moe": {"dense_lags": 4, "n_experts": 3},
             "leviathan-ensemble": {"dense_lags": 4, "n_modules": 1, "members_per_module": 2,
                                    "interaction_heads": 3}}
FAMILIES = [name for name, entry in MODELS.items()
            if isinstance(entry.build, type) and issubclass(entry.build, RecurrentForCausalLM)]
QUICK = ("leviathan",)  # the default run (fastformer is served by both backends in test_api); the others: -m slow
HEADER = "A header that several prompts share. " * 2


def served_tokens(engine: Engine, prompts: list[str]) -> list[list[int]]:
    """Greedy tokens of each prompt: the first alone (its prefix then sits in the prefix cache), the rest at once."""
    requests = [GenerationRequest(tuple(TOK.encode(p)), 10, Sampling(greedy=True), stop_at_eos=False)
                for p in prompts]

    async def run() -> list[list[int]]:
        engine.start()
        try:
            async def tokens(request: GenerationRequest) -> list[int]:
                return [e.token async for e in engine.submit(request).events() if e.kind == "token"]

            first = await tokens(requests[0])
            return [first, *await asyncio.gather(*(tokens(r) for r in requests[1:]))]
        finally:
            engine.stop()
    return asyncio.run(run())


@pytest.mark.parametrize("family", [f if f in QUICK else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES])
def test_torch_and_onnx_servers_give_the_same_greedy_tokens(family: str, tmp_path: Path) -> None:
    from attnfree.inference.export import export_onnx
    from attnfree.inference.serve.onnx_backend import OnnxBackend

    torch.manual_seed(0)
    model = perturb(build_model(family, SIZE, TOK, OVERRIDES.get(family)), std=0.2).eval()
    export_onnx(model, TOK, tmp_path)
    prompts = [HEADER + "one", "x", HEADER + "two, a longer tail than the first", HEADER + "one more"]
    settings = {"prefill_chunk": 16, "max_tokens": 64}  # prompts longer than a chunk: continued prefills too
    on_torch = served_tokens(Engine(model, TOK, **settings), prompts)
    onnx = OnnxBackend(tmp_path)
    engine = Engine(onnx, onnx.tokenizer, **settings)
    on_onnx = served_tokens(engine, prompts)
    assert on_onnx == on_torch, family
    assert engine.stats()["prefix_cache_hits"] >= 1  # a prefix came from the cache


@pytest.mark.parametrize("sampling", [Sampling(0.7, 5, 0.8), Sampling(1.3), Sampling(0.9, top_p=0.6),
                                      Sampling(1e-30, 3)], ids=["k+p", "plain", "top-p", "tiny-temperature"])
def test_the_onnx_backend_draws_from_the_reference_distribution(sampling: Sampling) -> None:
    """Empirical frequencies of 20,000 draws against ``inference.sampling.distribution`` (a tie at the k-th logit
    included: top-k keeps the lower id)."""
    import numpy as np

    from attnfree.inference.sampling import distribution
    from attnfree.inference.serve.onnx_backend import draw_row

    logits = np.array([2.0, 1.5, 1.5, 0.3, -1.0, 0.9, 1.5, -3.0, 0.0, 0.2], dtype=np.float32)
    expected = distribution(torch.tensor(logits)[None], sampling)[0].numpy()
    rng = np.random.default_rng(0)
    counts = np.bincount([draw_row(logits, sampling, rng) for _ in range(20_000)], minlength=len(logits))
    assert np.abs(counts / 20_000 - expected).max() < 0.015, (counts / 20_000, expected)
    assert (counts[expected == 0] == 0).all()


@pytest.mark.parametrize("k", [1, 2, 7, 40, 99])
def test_top_k_ids_equals_a_stable_sort(k: int) -> None:
    """The block-maximum shortcut of the ONNX backend's top-k gives the first k of a stable descending sort (ties
    by the lower id), on random logits, on rounded logits full of ties, and with -inf entries."""
    import numpy as np

    from attnfree.inference.serve.onnx_backend import top_k_ids

    rng = np.random.default_rng(k)
    for V in (k + 1, 100, 1001, 50_257):
        for x in (rng.standard_normal(V).astype(np.float32), np.round(rng.standard_normal(V), 1).astype(np.float32),
                  np.where(rng.random(V) < 0.9, -np.inf, rng.standard_normal(V)).astype(np.float32)):
            want = np.argsort(-x.astype(np.float64), kind="stable")[:k]
            np.testing.assert_array_equal(top_k_ids(x, k), want, err_msg=f"V={V}")
