"""Sampling a batch of rows at once, each row with its own settings and its own random generator.

``attnfree.decoding.pick_next`` is the reference: same temperature / top-k / top-p rule. It draws with
``torch.multinomial`` over the whole vocabulary, which on CPU costs ~2.5 ms per row at V = 50257 (more than
a whole batched model step at batch 64). Here rows that share settings are filtered together, top-k keeps
only the k candidates (so the later steps touch [G, k], not [G, V]), and each row draws one uniform number
from its own generator and inverts the cumulative distribution (``searchsorted``): one row's draw never
depends on which other rows share its batch.

The distribution is pick_next's, with one difference at exact ties: top-k keeps exactly k candidates, where
pick_next keeps every logit equal to the k-th. The random stream differs too, so a seed gives other tokens
here than in ``stream_generate`` (but the same tokens on every run and at every batch size).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from attnfree.decoding import Sampling


def candidate_probs(logits: Tensor, sampling: Sampling) -> tuple[Tensor, Tensor | None]:
    """logits [G, V] -> (probs [G, K], ids [G, K] or None when K = V and the ids are the positions).

    1. top-k: the k largest logits, sorted (K = k); otherwise all V
    2. divide by the temperature
    3. top-p: on the sorted candidates, drop those after the smallest prefix whose mass reaches top_p
    4. softmax over what is left (dropped candidates get probability 0)
    """
    x, ids = logits.float(), None
    if sampling.top_k and sampling.top_k < x.shape[-1]:
        x, ids = torch.topk(x, sampling.top_k, dim=-1)  # sorted, largest first
    x = x / sampling.temperature
    if sampling.top_p < 1.0:
        if ids is None:
            x, ids = torch.sort(x, descending=True, dim=-1)
        probs = x.softmax(-1)
        drop = probs.cumsum(-1) - probs > sampling.top_p  # (the first candidate is always kept)
        x = x.masked_fill(drop, float("-inf"))
    return x.softmax(-1), ids


def draw(probs: Tensor, generators: Sequence[torch.Generator | None]) -> Tensor:
    """probs [G, K] (rows summing to 1) -> one index per row [G], row g drawn with generators[g]."""
    u = torch.stack([torch.rand((), generator=g, device=probs.device) for g in generators])  # [G] in [0, 1)
    cdf = probs.cumsum(-1)  # [G, K]
    # first index whose cdf exceeds u * total: a zero-probability candidate is never picked
    index = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    return index.clamp_max(probs.shape[-1] - 1)


def sample_rows(logits: Tensor, samplings: Sequence[Sampling], generators: Sequence[torch.Generator | None]
                ) -> list[int]:
    """logits [B, V] -> the next token of each row, row b sampled as samplings[b] says with generators[b]."""
    if not len(samplings) == len(generators) == logits.shape[0]:
        raise ValueError(f"need one sampling and one generator per row: {logits.shape[0]} rows, "
                         f"{len(samplings)} samplings, {len(generators)} generators")
    tokens = [0] * logits.shape[0]
    groups: dict[Sampling, list[int]] = {}
    for row, sampling in enumerate(samplings):
        groups.setdefault(sampling, []).append(row)
    for sampling, rows in groups.items():
        group = logits[rows] if len(rows) < logits.shape[0] else logits  # [G, V]
        if sampling.greedy:
            picked = group.argmax(-1)
        else:
            probs, ids = candidate_probs(group, sampling)
            index = draw(probs, [generators[r] for r in rows])
            picked = index if ids is None else ids.gather(-1, index.unsqueeze(-1)).squeeze(-1)
        for row, token in zip(rows, picked.tolist(), strict=True):
            tokens[row] = int(token)
    return tokens
