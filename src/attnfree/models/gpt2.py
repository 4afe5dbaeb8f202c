"""The attention baseline: a GPT-2 from ``transformers``, sized to match one of our models.

Nothing here is ours but the sizing: the comparison is only fair if the baseline is the stock,
well-tested implementation (SDPA attention, tied input/output embeddings, learned positions).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel


def gpt2_baseline(
    vocab_size: int,
    hidden_size: int,
    n_heads: int,
    num_layers: int,
    n_positions: int,
    dropout: float,
    pad_token_id: int,
    bos_token_id: int,
    eos_token_id: int,
    ffn_multiplier: float = 4,
) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2 with tied embeddings and ``attn_implementation="sdpa"``.

    ``dropout`` applies to embeddings, residual branches and attention probabilities alike. The
    special ids are set inside the config: GPT-2's defaults (50256) are out of range for small V.
    The feed-forward width is ``round(ffn_multiplier * hidden_size)``.
    """
    if hidden_size % n_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by n_heads {n_heads}")
    for name, token_id in (("pad", pad_token_id), ("bos", bos_token_id), ("eos", eos_token_id)):
        if not 0 <= token_id < vocab_size:
            raise ValueError(f"{name}_token_id {token_id} out of range for vocab_size {vocab_size}")
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=hidden_size,
        n_layer=num_layers,
        n_head=n_heads,
        n_inner=round(ffn_multiplier * hidden_size),
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        tie_word_embeddings=True,
    )
    return GPT2LMHeadModel._from_config(config, attn_implementation="sdpa")


def matched_gpt2(config: Any) -> GPT2LMHeadModel:
    """The GPT-2 baseline matching ``config`` (any object with ``hidden_size``, ``n_heads``,
    ``num_hidden_layers``, ``n_positions`` (or ``max_position_embeddings``), ``hidden_dropout_prob``,
    ``vocab_size`` and ``pad/bos/eos_token_id``). The feed-forward width follows ``intermediate_size``
    when the config has one, else 4 x hidden."""
    hidden = int(config.hidden_size)
    n_positions = getattr(config, "n_positions", None) or config.max_position_embeddings
    intermediate = getattr(config, "intermediate_size", None)
    return gpt2_baseline(
        vocab_size=int(config.vocab_size),
        hidden_size=hidden,
        n_heads=int(config.n_heads),
        num_layers=int(config.num_hidden_layers),
        n_positions=int(n_positions),
        dropout=float(config.hidden_dropout_prob),
        pad_token_id=int(config.pad_token_id),
        bos_token_id=int(config.bos_token_id),
        eos_token_id=int(config.eos_token_id),
        ffn_multiplier=intermediate / hidden if intermediate else 4,
    )


def count_parameters(model: torch.nn.Module, trainable_only: bool = True) -> int:
    """Number of parameters, counting each shared (tied) tensor once.

    ``nn.Module.parameters()`` yields a shared ``Parameter`` once, which is how ``transformers`` ties
    ``lm_head.weight`` to the input embedding.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
