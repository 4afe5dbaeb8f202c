"""Picking the next token: the one torch sampler of the library (the lean decoding loop, hence ``attnfree generate``
and compare's samples, and the server use it).

``sample_rows`` samples a batch of rows at once, each row with its own settings (``Sampling``: greedy, or
temperature / top-k / top-p) and its own random generator. Rows that share settings are filtered together, top-k
keeps only the k candidates (so the later steps touch [G, k], not [G, V]: a draw over the whole vocabulary can cost
more than a batched model step), and each row draws one
uniform number from its own generator and inverts the cumulative distribution (``searchsorted``): a row's draw never
depends on which other rows share its batch, so a seed gives the same tokens alone and in any company.

``distribution`` is the reference beside it: the same rule written over the whole vocabulary, sort by sort, in
float64. Ties at the k-th logit: top-k keeps exactly k candidates (the first k of a stable descending sort).
The torch-free runtime (``inference/runtime.py``) has its own numpy twin of this rule.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from attnfree.inference.sampling_options import Sampling

__all__ = ["Sampling", "candidate_probs", "distribution", "draw", "sample", "sample_rows", "top_k_stable"]


def distribution(logits: Tensor, sampling: Sampling) -> Tensor:
    """Reference: logits [B, V] -> the probabilities [B, V] (float64) that ``sample_rows`` draws from, row by row:

    greedy puts all mass on the first largest logit; otherwise rank the logits (a stable descending sort), keep the
    first top_k, subtract the largest and divide by the temperature (so a tiny temperature gives -inf, not inf - inf),
    keep the candidates whose preceding mass is at most top_p (so at least the first), and renormalise over what is
    kept.
    """
    x = logits.double()
    probs = torch.zeros_like(x)
    for b in range(x.shape[0]):
        ranked = torch.sort(x[b], descending=True, stable=True).indices  # [V]
        if sampling.greedy:
            probs[b, ranked[0]] = 1.0
            continue
        if sampling.top_k:
            ranked = ranked[: sampling.top_k]
        scaled = (x[b] - x[b].max()) / sampling.temperature  # [V]
        if sampling.top_p < 1.0:
            p = torch.softmax(scaled[ranked], dim=0)
            ranked = ranked[torch.cumsum(p, 0) - p <= sampling.top_p]
        probs[b, ranked] = torch.softmax(scaled[ranked], dim=0)
    return probs


def top_k_stable(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest of x [G, V] as (values, ids) [G, k], largest first; among equal values the lowest ids, in id
    order: the first k of a stable descending sort, at ``topk``'s O(V) cost (``topk`` leaves ties unspecified)."""
    kth = torch.topk(x, k, dim=-1).values[:, -1:]  # [G, 1]
    above, tied = x > kth, x == kth
    room = k - above.sum(-1, keepdim=True)  # how many of the tied values fit
    keep = above | (tied & (tied.cumsum(-1) <= room))  # exactly k per row
    ids = keep.nonzero()[:, 1].view(x.shape[0], k)  # ascending ids
    values = x.gather(-1, ids)
    order = torch.sort(values, dim=-1, descending=True, stable=True).indices
    return values.gather(-1, order), ids.gather(-1, order)


def candidate_probs(logits: Tensor, sampling: Sampling) -> tuple[Tensor, Tensor | None]:
    """logits [G, V] -> (probs [G, K], ids [G, K] or None when K = V and the ids are the positions).

    1. top-k: the k largest logits, sorted (K = k); otherwise all V
    2. subtract the largest logit and divide by the temperature (no NaN for any temperature > 0: the largest is 0,
       the others at worst -inf; a temperature below float32's smallest normal number counts as that number,
       which is already greedy up to ties)
    3. top-p: on the sorted candidates, drop those after the smallest prefix whose mass reaches top_p
    4. softmax over what is left (dropped candidates get probability 0)
    """
    x, ids = logits.float(), None
    if sampling.top_k and sampling.top_k < x.shape[-1]:
        x, ids = top_k_stable(x, sampling.top_k)  # sorted, largest first
    x = (x - x.max(-1, keepdim=True).values) / max(sampling.temperature, torch.finfo(x.dtype).tiny)
    if sampling.top_p < 1.0:
        if ids is None:
            x, ids = torch.sort(x, descending=True, dim=-1, stable=True)
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


def sample(logits: Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> Tensor:
    """logits [B, V] -> next token ids [B], every row sampled as ``sampling`` says (rows draw in turn from
    ``generator``)."""
    return torch.tensor(sample_rows(logits, [sampling] * logits.shape[0], [generator] * logits.shape[0]),
                        dtype=torch.long, device=logits.device)


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
