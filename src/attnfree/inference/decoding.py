"""Text generation, one path: ``stream_generate`` (prefill once, then one forward of one token per step, each token
picked by the one sampler, ``inference.sampling``) and ``IncrementalDecoder`` (ids to text without splitting a
character); ``generate_text`` joins the two for ``attnfree generate`` and compare's samples, and the server's
engine batches the same step and sampler.

``model.generate`` works too (and does beam search, stopping criteria, ...) and stays tested as a compatibility
surface (``TokenStreamer`` prints its output); this loop exists because it is small enough to read, streams tokens
as they come, and has no per-step overhead beyond the model's own step: the recurrent state is updated in place.
Long prompts are prefilled in chunks that continue from the state, so memory stays flat in the prompt length too.
Models without our recurrent cache (the transformers peers: gpt2, rwkv, mamba, ...) decode by the slow, obviously
correct rule instead: each step runs the whole sequence so far again.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedModel
from transformers.generation.streamers import BaseStreamer

from attnfree.data import TextTokenizer
from attnfree.inference.detokenize import IncrementalDecoder
from attnfree.inference.sampling import Sampling, sample
from attnfree.models.base import RecurrentForCausalLM
from attnfree.models.cache import RecurrentCache
from attnfree.models.compat import output_cache
from attnfree.models.registry import max_positions

DEFAULT_PREFILL_CHUNK = 2048


def chunked_prefill(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None,
                    chunk_size: int = DEFAULT_PREFILL_CHUNK) -> Any:
    """Run the prompt [B, T] through the model ``chunk_size`` positions at a time, each chunk continuing
    from the state the previous one left, and return the last forward's output (last-position logits and
    the cache). Same values as one parallel forward; activations are those of one chunk, not of T."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    T = input_ids.shape[1]
    cache, out = None, None
    for start in range(0, max(T, 1), chunk_size):  # T = 0 still makes one (erroring) call
        part = slice(start, start + chunk_size)
        mask = attention_mask[:, part] if attention_mask is not None else None
        out = model(input_ids=input_ids[:, part], attention_mask=mask, cache=cache, use_cache=True,
                    logits_to_keep=1)
        cache = output_cache(out)
    return out


@torch.inference_mode()
def stream_generate(
    model: torch.nn.Module,
    input_ids: Tensor,
    max_new_tokens: int,
    sampling: Sampling | None = None,
    attention_mask: Tensor | None = None,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
) -> Iterator[Tensor]:
    """Yield the next token ids [B] one step at a time.

    input_ids: [B, T] (left-padded with attention_mask for a batch of different lengths). Stops after
    ``max_new_tokens`` or when every sequence has produced ``eos_token_id``. The prompt is prefilled
    ``prefill_chunk`` positions at a time (``chunked_prefill``). A model without our recurrent cache decodes by
    ``recompute_generate``.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    sampling = sampling or Sampling()
    model.eval()
    if not isinstance(model, RecurrentForCausalLM):
        yield from recompute_generate(model, input_ids, max_new_tokens, sampling, attention_mask, eos_token_id,
                                      generator)
        return
    # 1. prefill the prompt in parallel, chunk by chunk; keep only the last position's logits
    out = chunked_prefill(model, input_ids, attention_mask, prefill_chunk)
    cache = output_cache(out)
    if not isinstance(cache, RecurrentCache):
        raise TypeError(f"stream_generate needs a model with a RecurrentCache, got {type(cache).__name__}")
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        # 2. pick, yield, and feed back one token: the cache carries all the context
        token = sample(out.logits[:, -1], sampling, generator)
        yield token
        if eos_token_id is not None:
            done |= token == eos_token_id
            if bool(done.all()):
                return
        out = model(input_ids=token.unsqueeze(-1), cache=cache, use_cache=True)


@torch.inference_mode()
def recompute_generate(
    model: torch.nn.Module,
    input_ids: Tensor,
    max_new_tokens: int,
    sampling: Sampling,
    attention_mask: Tensor | None = None,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[Tensor]:
    """``stream_generate`` for any causal LM (no cache): each step runs the whole sequence so far [B, T + n] and
    samples from its last position. Slow (quadratic in the length), obviously correct, the same sampler. A
    left-padded batch gets whatever the model itself does with padding (GPT-2's positions ignore the mask)."""
    ids = input_ids
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids, attention_mask=mask).logits[:, -1]  # [B, V]
        token = sample(logits, sampling, generator)  # [B]
        yield token
        if eos_token_id is not None:
            done |= token == eos_token_id
            if bool(done.all()):
                return
        ids, mask = torch.cat([ids, token[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)


class TokenStreamer(BaseStreamer):
    """For ``model.generate(..., streamer=...)`` (the transformers path): writes generated text as it is produced,
    decoding incrementally with our ``TextTokenizer``.

    The first ``put`` (the prompt) is written as decoded. Text ending in an incomplete UTF-8 character (decoded
    as U+FFFD) is held back until the next token completes it.
    """

    def __init__(self, tokenizer: TextTokenizer, out: Any = None):
        self.tokenizer, self.out = tokenizer, out if out is not None else sys.stdout
        self.ids: list[int] = []
        self.printed = 0  # characters of the decoded text already written
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            self._write(self.tokenizer.decode(value.reshape(-1).tolist()))
            return
        self.ids.extend(int(i) for i in value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        self._write(text[self.printed:])
        self.printed = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.ids)
        self._write(text[self.printed:] + "\n")
        self.ids, self.printed, self.prompt_seen = [], 0, False

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()


def generate_text(
    model: PreTrainedModel,
    tokenizer: TextTokenizer,
    prompt: str,
    max_new_tokens: int = 200,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
    seed: int | None = 0,
    on_text: Callable[[str], None] | None = None,
) -> str:
    """Continue ``prompt`` (an empty prompt starts from BOS) through ``stream_generate`` and ``IncrementalDecoder``;
    returns only the new text, and hands each piece to ``on_text`` as it is decoded. Stops at the tokenizer's EOS.

    1. the prompt's ids, checked against the model's positions
    2. one token at a time from ``stream_generate`` (sampled with a generator seeded by ``seed``)
    3. each token's text, held back while a character is incomplete
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    sampling = Sampling(greedy=True) if greedy else Sampling(temperature, top_k or 0, top_p or 1.0)
    # 1
    ids = tokenizer.encode(prompt) or [tokenizer.bos_token_id]
    limit = max_positions(model)
    if limit is not None and len(ids) + max_new_tokens > limit:
        raise ValueError(f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"n_positions={limit}")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    # 2-3
    decoder, pieces = IncrementalDecoder(tokenizer), []
    for token in stream_generate(model, torch.tensor([ids], device=device), max_new_tokens, sampling,
                                 eos_token_id=tokenizer.eos_token_id, generator=generator):
        pieces.append(decoder.push(int(token[0])))
        if on_text is not None and pieces[-1]:
            on_text(pieces[-1])
    pieces.append(decoder.flush())
    if on_text is not None and pieces[-1]:
        on_text(pieces[-1])
    return "".join(pieces)
