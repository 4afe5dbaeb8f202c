"""The attention baseline: a GPT-2 from ``transformers``, sized to match one of our models.

Nothing here is ours but the sizing: the comparison is only fair if the baseline is the stock, well-tested
implementation (SDPA attention, tied input/output embeddings, learned positions). The registry builds it through
``gpt2_sizes`` and ``build_gpt2`` like every other family.
"""

from __future__ import annotations

from typing import Any

from transformers import GPT2Config, GPT2LMHeadModel


def gpt2_sizes(hidden_size: int, n_heads: int, num_layers: int, n_positions: int, dropout: float, vocab_size: int,
               pad_token_id: int, bos_token_id: int, eos_token_id: int) -> dict[str, Any]:
    """GPT2Config fields for the shared sizes. ``dropout`` applies to embeddings, residual branches and attention
    probabilities alike; the special ids are set inside the config (GPT-2's defaults, 50256, are out of range for a
    small vocabulary); input and output embeddings are tied, as in our models."""
    return {"vocab_size": vocab_size, "n_positions": n_positions, "n_embd": hidden_size, "n_layer": num_layers,
            "n_head": n_heads, "resid_pdrop": dropout, "embd_pdrop": dropout, "attn_pdrop": dropout,
            "pad_token_id": pad_token_id, "bos_token_id": bos_token_id, "eos_token_id": eos_token_id,
            "tie_word_embeddings": True}


def check_gpt2_config(config: GPT2Config) -> None:
    """ValueError for sizes transformers would accept and fail on later (heads, special ids)."""
    if config.n_embd % config.n_head:
        raise ValueError(f"GPT2Config.n_embd={config.n_embd} is not divisible by n_head={config.n_head}")
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        token_id = getattr(config, name)
        if token_id is not None and not 0 <= token_id < config.vocab_size:
            raise ValueError(f"GPT2Config.{name}={token_id} is outside the vocabulary [0, {config.vocab_size})")


def build_gpt2(config: GPT2Config) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2 with SDPA attention."""
    check_gpt2_config(config)
    return GPT2LMHeadModel._from_config(config, attn_implementation="sdpa")
