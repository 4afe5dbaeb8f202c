"""A lean decoding loop: prefill once, then one forward of one token per step, sampling in place.

``model.generate`` works too (and does beam search, stopping criteria, ...); this loop exists because
it is small enough to read, streams tokens as they come (for the CLI and the server), and has no
per-step overhead beyond the model's own step: the recurrent state is updated in place. Long prompts are
prefilled in chunks that continue from the state, so memory stays flat in the prompt length too.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attnfree.cache import RecurrentCache
from attnfree.models.compat import output_cache


@dataclass(frozen=True)
class Sampling:
    """How to pick the next token. greedy=True ignores the rest."""

    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    greedy: bool = False

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def pick_next(logits: Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> Tensor:
    """logits: [B, V] -> next token ids [B] (greedy, or temperature / top-k / top-p sampling)."""
    if sampling.greedy:
        return logits.argmax(-1)
    logits = logits.float() / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > sampling.top_p  # keep the smallest prefix reaching top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


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
    """Yield the next token ids [B] one step at a time, for one of our recurrent models.

    input_ids: [B, T] (left-padded with attention_mask for a batch of different lengths). Stops after
    ``max_new_tokens`` or when every sequence has produced ``eos_token_id``. The prompt is prefilled
    ``prefill_chunk`` positions at a time (``chunked_prefill``).
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    sampling = sampling or Sampling()
    model.eval()
    # 1. prefill the prompt in parallel, chunk by chunk; keep only the last position's logits
    out = chunked_prefill(model, input_ids, attention_mask, prefill_chunk)
    cache = output_cache(out)
    if not isinstance(cache, RecurrentCache):
        raise TypeError(f"stream_generate needs a model with a RecurrentCache, got {type(cache).__name__}")
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        # 2. pick, yield, and feed back one token: the cache carries all the context
        token = pick_next(out.logits[:, -1], sampling, generator)
        yield token
        if eos_token_id is not None:
            done |= token == eos_token_id
            if bool(done.all()):
                return
        out = model(input_ids=token.unsqueeze(-1), cache=cache, use_cache=True)
