"""What a causal LM carries from one token to the next: measured the same way for ours, GPT-2 and every peer.

``decode_state_bytes(model, T)`` runs one sequence of T tokens with caching on and counts the bytes of every distinct
tensor the model keeps to decode token T + 1: our ``RecurrentCache`` (constant in T), GPT-2's KV cache (growing
with T), RWKV's ``state``, Mamba's and Mamba-2's caches, and Griffin's (RecurrentGemma), which keeps its recurrent
states on its modules and its local attention's keys and values in a cache it is handed.
"""

from __future__ import annotations

from typing import Any

import torch

from attnfree.models.compat import output_cache


def decode_state_bytes(model: torch.nn.Module, seq_len: int) -> int:
    """Bytes of the decoding state after ``seq_len`` tokens of one sequence (the model is run in eval mode)."""
    ids = torch.zeros(1, seq_len, dtype=torch.long, device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            cache = _returned_cache(model(input_ids=ids, use_cache=True))
            if cache is None:  # a model that keeps its cache only when handed one (RecurrentGemma)
                from transformers import DynamicCache

                cache = DynamicCache(config=getattr(model, "config", None))
                model(input_ids=ids, use_cache=True, cache=cache)
    finally:
        model.train(was_training)
    seen: set[int] = set()
    return tensor_bytes(cache, seen) + sum(tensor_bytes(t, seen) for t in module_states(model))


def _returned_cache(out: Any) -> Any:
    cache = output_cache(out)
    for name in ("state", "cache_params"):  # RWKV's and (older releases') Mamba's names
        cache = cache if cache is not None else getattr(out, name, None)
    return cache


def module_states(model: torch.nn.Module) -> list[torch.Tensor]:
    """Tensors a model keeps as plain attributes of its modules (neither parameters nor buffers): recurrent states
    that some transformers models hold there between calls."""
    return [value for module in model.modules() for value in vars(module).values() if isinstance(value, torch.Tensor)]


def tensor_bytes(obj: Any, seen: set[int]) -> int:
    """Bytes of every distinct tensor reachable from ``obj`` (attributes, sequences, dicts), each counted once."""
    if id(obj) in seen or obj is None or isinstance(obj, (int, float, str, bool)):
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    return sum(tensor_bytes(v, seen) for v in getattr(obj, "__dict__", {}).values())
