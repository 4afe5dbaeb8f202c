"""The torch backend of the serving engine: an attnfree model in PyTorch, its states ``RecurrentCache``s.

Prefill is the model's parallel forward over a left-padded batch (from a cache when continuing); a step is its
one-token forward over the batch's cache; sampling is ``inference.sampling.sample_rows`` with one
``torch.Generator`` per stream. Glossary: B batch, T time, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from attnfree.inference.sampling import Sampling, sample_rows
from attnfree.inference.serve.backend import Backend
from attnfree.models.cache import RecurrentCache
from attnfree.models.compat import output_cache
from attnfree.models.registry import max_positions


class TorchBackend(Backend):
    """Serves ``model`` (an attnfree recurrent model) on its own device."""

    kind = "torch"

    def __init__(self, model: torch.nn.Module, threads: int | None = None):
        if threads is not None:
            torch.set_num_threads(threads)
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.context_limit = max_positions(model)  # type: ignore[arg-type]

    @torch.inference_mode()
    def prefill(self, rows: Sequence[Sequence[int]], start: RecurrentCache | None) -> tuple[Tensor, RecurrentCache]:
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), 0, dtype=torch.long, device=self.device)  # [B, T]; pads are masked out
        mask = torch.zeros(len(rows), T, dtype=torch.long, device=self.device)
        for b, r in enumerate(rows):
            ids[b, T - len(r):] = torch.tensor(list(r))
            mask[b, T - len(r):] = 1
        out = self.model(input_ids=ids, attention_mask=mask, cache=start, use_cache=True, logits_to_keep=1)
        cache = output_cache(out)
        if not isinstance(cache, RecurrentCache):
            raise TypeError(f"the engine serves models with a RecurrentCache, got {type(cache).__name__}")
        return out.logits[:, -1], cache  # [B, V]

    @torch.inference_mode()
    def step(self, tokens: Sequence[int], state: RecurrentCache) -> tuple[Tensor, RecurrentCache]:
        ids = torch.tensor([[t] for t in tokens], device=self.device)  # [B, 1]
        out = self.model(input_ids=ids, cache=state, use_cache=True)
        return out.logits[:, -1], output_cache(out)

    def concat(self, states: Sequence[RecurrentCache]) -> RecurrentCache:
        return states[0] if len(states) == 1 else RecurrentCache.concat(list(states))

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator(self.device).manual_seed(seed % 2**64)  # any integer

    def sample(self, logits: Tensor, samplings: Sequence[Sampling], generators: Sequence[Any]) -> list[int]:
        return sample_rows(logits, samplings, generators)

    def info(self) -> dict[str, Any]:
        config = getattr(self.model, "config", None)
        return {"backend": self.kind, "model_type": getattr(config, "model_type", type(self.model).__name__),
                "parameters": sum(p.numel() for p in self.model.parameters()),
                "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch.")}

    def worker(self) -> Any:
        return torch.inference_mode()
