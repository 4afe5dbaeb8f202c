"""The engine's prefill and pacing: chunked and mixed-length prefill, the exact prefix-state cache, back-pressure.

Every check is token for token against the same requests served without the feature (greedy, and sampling with a
seed, which any change in the probabilities would alter).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch

from attnfree.data import ByteTokenizer
from attnfree.inference.sampling import Sampling
from attnfree.inference.serve.engine import Engine, GenerationRequest
from attnfree.inference.serve.prefix_cache import PrefixCache, common_prefix
from attnfree.models.registry import ModelSize, build_model

TOK = ByteTokenizer()
HEADER = "You are a careful assistant. Answer in one line.\n" * 3  # 150 bytes shared by every prompt


def tiny(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    overrides = {"dense_lags": 4} if name.startswith("leviathan") else None
    return build_model(name, ModelSize(32, 2, 2, n_positions=4096), TOK, overrides).double().eval()


def requests(tails: list[str], max_tokens: int = 12) -> list[GenerationRequest]:
    return [GenerationRequest(tuple(TOK.encode(HEADER + t)), max_tokens,
                              Sampling(greedy=True) if i % 2 == 0 else Sampling(0.9, 20), seed=i, stop_at_eos=False)
            for i, t in enumerate(tails)]


async def tokens_of(stream: Any) -> list[int]:
    return [e.token async for e in stream.events() if e.kind == "token"]


def serve(engine: Engine, batch: list[GenerationRequest], one_by_one: bool = True) -> list[list[int]]:
    """The tokens of each request, submitted one after the other (each finished before the next) or all at once."""
    async def run() -> list[list[int]]:
        engine.start()
        try:
            if one_by_one:
                return [await tokens_of(engine.submit(r)) for r in batch]
            streams = [engine.submit(r) for r in batch]
            return [await tokens_of(s) for s in streams]
        finally:
            engine.stop()
    return asyncio.run(run())


@pytest.mark.parametrize("name", ["fastformer-conv", "leviathan"])
def test_the_prefix_cache_changes_no_token_and_prefills_only_the_new_tokens(name: str) -> None:
    model = tiny(name)
    batch = requests(["1?", "two?", "1?", "three, longer than the others?"])
    plain = serve(Engine(model, TOK, prefix_cache_mib=0), batch)
    engine = Engine(model, TOK, prefix_cache_mib=64)
    assert serve(engine, batch) == plain
    stats = engine.stats()
    header = len(TOK.encode(HEADER))
    # the 2nd prompt leaves the 1st after the header (so the header's state is cached there); the 3rd and the 4th start
    # from it (a prompt is never taken whole from the cache: its last token gives the first token's logits)
    assert stats["prefix_cache_hits"] == 2 and stats["prefix_cache_tokens_saved"] == 2 * header
    total = sum(len(r.prompt_ids) for r in batch)
    assert stats["prefill_tokens"] == total - stats["prefix_cache_tokens_saved"]


def test_prompts_longer_than_a_chunk_and_of_mixed_lengths_prefill_exactly() -> None:
    model = tiny("fastformer-conv")
    batch = requests(["x" * 300, "short", "y" * 77, ""])
    whole = serve(Engine(model, TOK, prefix_cache_mib=0), batch)
    chunked = Engine(model, TOK, prefix_cache_mib=0, prefill_chunk=64)
    assert serve(chunked, batch, one_by_one=False) == whole
    assert chunked.counters["prefills"] >= (len(batch[0].prompt_ids) + 63) // 64


def test_a_long_prompt_does_not_stall_running_streams_for_more_than_a_chunk() -> None:
    """While a 2,000-token prompt is prefilled in chunks of 100, a stream already decoding gets a token after
    every chunk: its tokens keep coming during the whole prefill."""
    model = tiny("fastformer")
    engine = Engine(model, TOK, prefix_cache_mib=0, prefill_chunk=100)

    async def run() -> tuple[int, int]:
        engine.start()
        try:
            running = engine.submit(GenerationRequest(tuple(TOK.encode("go")), 200, stop_at_eos=False))
            await running.next_event()
            steps_before = engine.counters["steps"]
            long = engine.submit(GenerationRequest(tuple(TOK.encode("z" * 2000)), 1, stop_at_eos=False))
            await tokens_of(long)
            steps_during = engine.counters["steps"] - steps_before
            running.cancel()
            return steps_during, engine.counters["prefills"]
        finally:
            engine.stop()

    steps, prefills = asyncio.run(run())
    assert prefills >= 20 and steps >= 19, (steps, prefills)  # a decode step between consecutive chunks


def test_a_slow_reader_pauses_its_stream_without_holding_the_others() -> None:
    model = tiny("fastformer")
    engine = Engine(model, TOK, prefix_cache_mib=0, max_buffered=8)
    slow_request = GenerationRequest(tuple(TOK.encode("slow")), 100, stop_at_eos=False)
    fast_request = GenerationRequest(tuple(TOK.encode("fast")), 60, stop_at_eos=False)
    alone = serve(Engine(model, TOK, prefix_cache_mib=0), [slow_request, fast_request])

    async def run() -> tuple[list[int], list[int], int, int]:
        engine.start()
        try:
            slow = engine.submit(slow_request)
            fast_tokens = await tokens_of(engine.submit(fast_request))  # the slow reader reads nothing meanwhile
            sent_while_unread = slow.sent
            paused = engine.stats()["paused_streams"]
            slow_tokens = await tokens_of(slow)  # now it reads, and its stream resumes
            return slow_tokens, fast_tokens, sent_while_unread, paused
        finally:
            engine.stop()

    slow_tokens, fast_tokens, sent, paused = asyncio.run(run())
    assert paused == 1 and sent <= 8 + 1  # bounded by max_buffered (+ the token of the step that crossed it)
    assert [slow_tokens, fast_tokens] == alone


def test_the_prefix_cache_is_bounded_and_least_recently_used_goes_first() -> None:
    model = tiny("fastformer")
    from attnfree.models.compat import output_cache

    def cached(tokens: list[int]) -> Any:
        with torch.no_grad():
            return output_cache(model(torch.tensor([tokens]), use_cache=True))

    one = cached([5, 6, 7])
    size = one.nbytes() + 8 * 3
    cache = PrefixCache(2 * size + 10)
    cache.insert([5, 6, 7], one)
    cache.insert([8, 9, 10], cached([8, 9, 10]))
    assert cache.lookup([5, 6, 7, 11])[0] == 3  # touches [5, 6, 7]
    cache.insert([1, 2, 3], cached([1, 2, 3]))  # evicts [8, 9, 10], the least recently used
    assert cache.lookup([8, 9, 10, 11]) == (0, None) and cache.lookup([5, 6, 7, 12])[0] == 3
    assert cache.lookup([5, 6, 7])[0] == 0  # never the whole prompt: its last token gives the first logits
    assert cache.bytes <= cache.max_bytes and cache.branch_point([5, 6, 99, 100]) == 2
    assert common_prefix(torch.tensor([1, 2, 3]).numpy(), torch.tensor([1, 2]).numpy()) == 2
    with pytest.raises(ValueError):
        PrefixCache(-1)
