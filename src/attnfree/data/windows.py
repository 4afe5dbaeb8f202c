"""Tokens and training windows: the token cache and the torch datasets that feed ``transformers.Trainer``.

Text -> ``TextTokenizer.encode`` -> 1-D token tensor (cached as ``.npy``) -> windows
``{"input_ids": [T], "labels": [T]}``. Labels equal the inputs: the model shifts them internally, as GPT-2 does.
Glossary: B batch, T time (sequence), V vocabulary.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from attnfree.data.fetch import default_cache_dir
from attnfree.data.tokenization import TextTokenizer

# ----------------------------------------------------------------------------------------------
# Token cache
# ----------------------------------------------------------------------------------------------


def tokenize_cached(text: str, tokenizer: TextTokenizer, cache_dir: str | Path | None = None) -> torch.Tensor:
    """Tokens of ``text`` as an int64 tensor [T], read from / written to ``cache_dir`` as int32 .npy.

    The key is sha256 over the text and the tokenizer's ``fingerprint`` (for BPE, a hash of its whole
    serialisation: vocabulary and merges), so a retrained tokenizer never reads stale ids.
    """
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = hashlib.sha256(f"{tokenizer.fingerprint}\n".encode() + text.encode("utf-8")).hexdigest()
    file = folder / f"tokens-{key[:40]}.npy"
    if file.is_file():
        return torch.from_numpy(np.load(file).astype(np.int64))
    ids = np.asarray(tokenizer.encode(text), dtype=np.int32)
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f"{file.stem}.{os.getpid()}.partial.npy"
    np.save(partial, ids)
    os.replace(partial, file)  # atomic: a concurrent reader never sees half a file
    return torch.from_numpy(ids.astype(np.int64))


# ----------------------------------------------------------------------------------------------
# Torch datasets for Trainer
# ----------------------------------------------------------------------------------------------


def _as_tokens(tokens: torch.Tensor | Sequence[int], block_size: int) -> torch.Tensor:
    data = torch.as_tensor(tokens, dtype=torch.long)
    if data.dim() != 1:
        raise ValueError(f"tokens must be 1-D [T], got shape {tuple(data.shape)}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if data.numel() < block_size + 1:
        need = block_size + 1
        raise ValueError(f"text has {data.numel()} tokens; block_size {block_size} needs at least {need}")
    return data


def _example(window: torch.Tensor) -> dict[str, torch.Tensor]:
    window = window.clone()
    return {"input_ids": window, "labels": window.clone()}


class RandomWindowDataset(Dataset[dict[str, torch.Tensor]]):
    """``num_samples`` windows of ``block_size`` tokens at random offsets, nanoGPT's ``get_batch``.

    Offsets are drawn in ``[0, len - block_size)`` as nanoGPT's ``torch.randint(len(data) - block_size)``
    (so the token after each window exists). Item ``i`` depends only on ``(seed, i)``: a run resumed
    at step k sees the same windows it would have seen.
    """

    def __init__(
        self,
        tokens: torch.Tensor | Sequence[int],
        block_size: int,
        num_samples: int,
        seed: int = 0,
    ) -> None:
        self.tokens = _as_tokens(tokens, block_size)
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.block_size, self.num_samples, self.seed = block_size, num_samples, seed

    def __len__(self) -> int:
        return self.num_samples

    def offset(self, index: int) -> int:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        rng = np.random.default_rng([self.seed, index])  # SeedSequence: no collisions between (seed, i)
        return int(rng.integers(0, self.tokens.numel() - self.block_size))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        start = self.offset(index)
        return _example(self.tokens[start : start + self.block_size])  # [T]


class BlockDataset(Dataset[dict[str, torch.Tensor]]):
    """Non-overlapping contiguous blocks of ``block_size`` tokens, in order.

    The last partial block is dropped (training wants full-length batches); evaluation must not drop
    it, so score held-out text with ``attnfree.evaluation.bpc.evaluate_bpc`` rather than this dataset.
    """

    def __init__(self, tokens: torch.Tensor | Sequence[int], block_size: int) -> None:
        self.tokens = _as_tokens(tokens, block_size)
        self.block_size = block_size

    def __len__(self) -> int:
        return self.tokens.numel() // self.block_size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"block {index} out of range for {len(self)} blocks")
        start = index * self.block_size
        return _example(self.tokens[start : start + self.block_size])  # [T]
