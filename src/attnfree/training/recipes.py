"""Recipes: named starting points for a run (any field can still be overridden)."""

from __future__ import annotations

from typing import Any

from attnfree.training.settings import TrainSettings

RECIPES: dict[str, TrainSettings] = {
    # Small enough that `attnfree compare --recipe demo` of three models finishes in minutes on 2 CPU cores
    # (docs/results.md has the measured times).
    "demo": TrainSettings(
        data="tinyshakespeare", tokenizer="byte", hidden_size=128, n_heads=4, num_layers=4, block_size=64,
        batch_size=12, max_steps=500, dropout=0.0, lr=2e-3, eval_every=100, eval_max_chars=20_000,
        eval_batch_size=32, output_dir="runs/demo", log_every=25,
        threads=1,  # tiny matmuls gain little from a second thread, and one thread copes with shared cores
    ),
    # nanoGPT's shakespeare_char CPU recipe (its README: val loss 1.88 after 2000 iterations).
    "nanogpt-char": TrainSettings(
        data="tinyshakespeare", tokenizer="byte", hidden_size=128, n_heads=4, num_layers=4, block_size=64,
        batch_size=12, max_steps=2000, dropout=0.0, lr=1e-3, eval_every=250, eval_stride=None, eval_bos=True,
        output_dir="runs/nanogpt-char",
    ),
    # Windows shorter than the context: block 512 at byte level on the complete works, 2x nanogpt-char's training
    # tokens (4 x 512 x 1,500 = 3.1M against 12 x 64 x 2,000 = 1.5M), the same model size.
    "shakespeare-512": TrainSettings(
        data="shakespeare", tokenizer="byte", hidden_size=128, n_heads=4, num_layers=4, block_size=512,
        batch_size=4, max_steps=1500, dropout=0.0, lr=1e-3, eval_every=500, eval_max_chars=50_000,
        eval_stride=None, eval_bos=True, output_dir="runs/shakespeare-512",
    ),
    # The earlier fastformerLM work's setting. It used the T5 tokenizer (32,100 ids), which is not available
    # offline: GPT-2's BPE stands in. WikiText-2 offline protocol: train on valid, evaluate on test.
    "earlier-work": TrainSettings(
        data="wikitext2-offline", tokenizer="gpt2", hidden_size=256, n_heads=4, num_layers=4, block_size=1024,
        n_positions=1024, batch_size=4, max_steps=5000, dropout=0.1, lr=1e-3, lr_scheduler="linear",
        eval_every=500, eval_batch_size=4, output_dir="runs/earlier-work",
    ),
}


def recipe(name: str, **overrides: Any) -> TrainSettings:
    """The recipe ``name`` with ``overrides`` applied (ValueError listing the recipes if unknown)."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; valid: {', '.join(RECIPES)}")
    return RECIPES[name].replace(**overrides)
