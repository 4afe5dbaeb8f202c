"""Text generation: a lean decoding loop (prefill once, then one forward of one token per step) and the
``generate``-based ``generate_text`` with a streamer for the terminal.

``model.generate`` works too (and does beam search, stopping criteria, ...); this loop exists because
it is small enough to read, streams tokens as they come (for the CLI and the server), and has no
per-step overhead beyond the model's own step: the recurrent state is updated in place. Long prompts are
prefilled in chunks that continue from the state, so memory stays flat in the prompt length too.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any, cast

import torch
from torch import Tensor
from transformers import PreTrainedModel, set_seed
from transformers.generation.streamers import BaseStreamer

from attnfree.data import TextTokenizer
from attnfree.inference.sampling import Sampling, sample
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
        token = sample(out.logits[:, -1], sampling, generator)
        yield token
        if eos_token_id is not None:
            done |= token == eos_token_id
            if bool(done.all()):
                return
        out = model(input_ids=token.unsqueeze(-1), cache=cache, use_cache=True)


class TokenStreamer(BaseStreamer):
    """Writes generated text as it is produced, decoding incrementally with our ``TextTokenizer``.

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
    streamer: BaseStreamer | None = None,
) -> str:
    """Continue ``prompt`` (an empty prompt starts from BOS); returns only the new text."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not greedy and not temperature > 0:
        raise ValueError(f"temperature must be > 0 (or use greedy), got {temperature}")
    if seed is not None:
        set_seed(seed)
    ids = tokenizer.encode(prompt) or [tokenizer.bos_token_id]
    limit = max_positions(model)
    if limit is not None and len(ids) + max_new_tokens > limit:
        raise ValueError(f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"n_positions={limit}")
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)  # [1, T]
    sampling: dict[str, Any] = {"do_sample": False} if greedy else {
        "do_sample": True, "temperature": temperature, "top_k": top_k or 0, "top_p": top_p if top_p else 1.0}
    with torch.no_grad():
        out = cast(Any, model).generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                        max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                        streamer=streamer, **sampling)  # [1, T + N]
    return tokenizer.decode(out[0, len(ids):].tolist())
