"""The ONNX backend of the serving engine: an ``attnfree export`` folder run by onnxruntime, without torch.

The export's two graphs (``inference/export.py``) do the work: a fresh prefill is the prefill graph over the left-
padded rows; a step is the step graph; a prefill that continues a state (a later chunk of a long prompt, or a prompt
whose prefix came from the prefix cache) runs the step graph over its tokens, all rows at once (the export's prefill
graph starts from the empty state). States are the manifest's state arrays, batch first, in the manifest's order
(``ArrayState``): nothing here knows a family or a state's name. Sampling follows ``runtime.pick_next`` with one
numpy generator per stream. This module imports numpy, onnxruntime and ``inference.runtime`` only (and
``tokenizers`` for a BPE vocabulary). Glossary: B batch, T time, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from attnfree.inference import runtime
from attnfree.inference.sampling_options import Sampling
from attnfree.inference.serve.backend import Backend


@dataclass
class ArrayState:
    """A batch of states: the manifest's state arrays, each [B, ...], in the manifest's order."""

    arrays: list[np.ndarray]

    def select(self, rows: Sequence[int]) -> ArrayState:
        """A copy of some rows (numpy's fancy indexing copies)."""
        index = np.asarray(rows, dtype=np.int64)
        return ArrayState([a[index] for a in self.arrays])

    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.arrays))

    @staticmethod
    def concat(states: Sequence[ArrayState]) -> ArrayState:
        if len(states) == 1:
            return states[0]
        return ArrayState([np.concatenate(parts, axis=0) for parts in zip(*(s.arrays for s in states), strict=True)])


class ExportTokenizer:
    """An export's tokenizer (bytes, or a ``tokenizers`` JSON file) with the ids its manifest records."""

    def __init__(self, lm: runtime.OnnxLM):
        record = lm.manifest["tokenizer"]
        self.codec, self.name = lm.codec, str(record.get("name", record["kind"]))
        self.vocab_size: int = int(record.get("vocab_size", lm.vocab_size))
        self.pad_token_id, self.bos_token_id, self.eos_token_id = lm.pad_token_id, lm.bos_token_id, lm.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.codec.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.codec.decode(ids)


class OnnxBackend(Backend):
    """Serves an export folder (``quantized``: its int8 graphs) with onnxruntime (``threads``: intra-op threads)."""

    kind = "onnx"

    def __init__(self, folder: str | Path, quantized: bool = False, threads: int | None = None):
        self.lm = runtime.OnnxLM.load(folder, quantized=quantized, threads=threads)
        self.quantized = quantized
        self.context_limit = self.lm.max_positions
        self.tokenizer = ExportTokenizer(self.lm)

    def prefill(self, rows: Sequence[Sequence[int]], start: ArrayState | None) -> tuple[np.ndarray, ArrayState]:
        if start is not None:  # continue the state one token at a time (the rows have equal lengths)
            logits, state = np.empty((len(rows), 0)), start
            for column in zip(*rows, strict=True):
                logits, state = self.step(column, state)
            return logits, state
        logits, arrays = self.lm.prefill(rows)  # left-padded there
        return logits, ArrayState(list(arrays))

    def step(self, tokens: Sequence[int], state: ArrayState) -> tuple[np.ndarray, ArrayState]:
        logits, arrays = self.lm.step(np.asarray(tokens, dtype=np.int64), state.arrays)
        return logits, ArrayState(list(arrays))

    def concat(self, states: Sequence[ArrayState]) -> ArrayState:
        return ArrayState.concat(states)

    def generator(self, seed: int) -> np.random.Generator:
        return np.random.default_rng(seed % 2**64)  # any integer

    def sample(self, logits: np.ndarray, samplings: Sequence[Sampling], generators: Sequence[Any]) -> list[int]:
        """Greedy rows by one argmax over the batch; the others each with its own generator (``draw_row``)."""
        if not len(samplings) == len(generators) == logits.shape[0]:
            raise ValueError(f"need one sampling and one generator per row: {logits.shape[0]} rows, "
                             f"{len(samplings)} samplings, {len(generators)} generators")
        tokens = [int(t) for t in logits.argmax(-1)]
        for b, (sampling, rng) in enumerate(zip(samplings, generators, strict=True)):
            if not sampling.greedy:
                tokens[b] = draw_row(logits[b], sampling, rng)
        return tokens

    def info(self) -> dict[str, Any]:
        manifest = self.lm.manifest
        return {"backend": self.kind, "model_type": manifest["model_type"], "parameters": manifest.get("parameters"),
                "dtype": "int8" if self.quantized else "float32"}


def top_k_ids(x: np.ndarray, k: int) -> np.ndarray:
    """The ids of the k largest of x [V] (0 < k < V), largest first, ties by the lower id (the rule of
    ``inference.sampling.top_k_stable``), in O(V) without a selection over all of V:

    1. cut x into k blocks of V // k (a shorter tail left out); the smallest of the k block maxima is reached by
       at least k values (those maxima), so every one of the k largest is at or above it
    2. the candidates: the ids at or above that threshold (a few times k for logits)
    3. sort the candidates by value, then id, and keep k
    """
    width = x.shape[-1] // k
    threshold = x[:k * width].reshape(k, width).max(-1).min()
    candidates = np.flatnonzero(x >= threshold)
    if len(candidates) < k:  # NaN logits compare false: fall back to all of them
        candidates = np.arange(x.shape[-1])
    return candidates[np.lexsort((candidates, -x[candidates]))[:k]]


def draw_row(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """One token from logits [V], by ``inference.sampling.distribution``'s rule, at top-k's O(V) cost (as the torch
    sampler's ``candidate_probs``; ``runtime.pick_next`` is the plain numpy form):

    1. top-k: the k largest logits, sorted (``top_k_ids``), else all V
    2. subtract the largest, divide by the temperature (a tiny one gives -inf, not NaN)
    3. top-p: on the sorted candidates, drop those after the smallest prefix whose mass reaches top_p
    4. invert the CDF of what is left with one uniform draw from ``rng``
    """
    x, ids = logits, None
    if sampling.top_k and sampling.top_k < x.shape[-1]:
        ids = top_k_ids(x, sampling.top_k)
        x = x[ids]
    x = x.astype(np.float64)
    with np.errstate(over="ignore"):
        x = (x - x.max()) / sampling.temperature
    if sampling.top_p < 1.0:
        if ids is None:
            ids = np.argsort(-x, kind="stable")
            x = x[ids]
        p = np.exp(x - x.max())
        p /= p.sum()
        x = np.where(np.cumsum(p) - p > sampling.top_p, -np.inf, x)
    cdf = np.cumsum(np.exp(x - x.max()))
    index = min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), len(cdf) - 1)
    return int(index if ids is None else ids[index])


def is_export(folder: str | Path) -> bool:
    """Whether ``folder`` holds an ONNX export (its manifest)."""
    return (Path(folder) / "manifest.json").is_file()
