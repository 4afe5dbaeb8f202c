"""The one torch sampler (``sample_rows``, ``sample``) against its reference (``distribution``)."""

from __future__ import annotations

import pytest
import torch

from attnfree.inference.sampling import Sampling, candidate_probs, distribution, sample, sample_rows
from attnfree.testing import assert_close

SAMPLINGS = [Sampling(), Sampling(0.7, 5), Sampling(1.3, 0, 0.8), Sampling(1.0, 9, 0.6), Sampling(0.5, 100, 0.99)]


@pytest.mark.parametrize("s", SAMPLINGS, ids=lambda s: f"t{s.temperature}-k{s.top_k}-p{s.top_p}")
def test_candidate_probs_match_the_reference(s: Sampling) -> None:
    logits = torch.randn(3, 37, generator=torch.Generator().manual_seed(1)) * 3  # V = 37: awkward
    probs, ids = candidate_probs(logits, s)
    full = torch.zeros(3, 37, dtype=probs.dtype)
    full = full.scatter(-1, ids, probs) if ids is not None else probs
    assert_close("candidate probs", full, distribution(logits, s).float())


@pytest.mark.parametrize("s", SAMPLINGS[1:3], ids=["top-k", "top-p"])
def test_sample_rows_draws_from_the_distribution(s: Sampling) -> None:
    n = 20000
    logits = torch.randn(1, 37, generator=torch.Generator().manual_seed(2)).expand(n, 37)
    tokens = sample_rows(logits, [s] * n, [torch.Generator().manual_seed(i) for i in range(n)])
    freq = torch.bincount(torch.tensor(tokens), minlength=37).double() / n
    expected = distribution(logits[:1], s)[0]
    assert bool((freq[expected == 0] == 0).all()), "drew a token outside the top-k / nucleus"
    assert float((freq - expected).abs().max()) < 0.015  # ~4.5 sigma at p = 0.5, n = 20000


def test_a_row_does_not_depend_on_its_neighbours() -> None:
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(3))
    settings = [Sampling(), Sampling(greedy=True), Sampling(0.8, 7), Sampling(), Sampling(1.2, 0, 0.9),
                Sampling(0.8, 7)]
    together = sample_rows(logits, settings, [torch.Generator().manual_seed(i) for i in range(6)])
    alone = [sample_rows(logits[i:i + 1], [settings[i]], [torch.Generator().manual_seed(i)])[0] for i in range(6)]
    assert together == alone and together[1] == int(logits[1].argmax())
    with pytest.raises(ValueError, match="one sampling and one generator per row"):
        sample_rows(logits, settings[:2], [None, None])


def test_top_p_keeps_the_smallest_nucleus_and_top_k_ties_keep_exactly_k() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    picks = {int(sample(logits, Sampling(top_p=0.7), torch.Generator().manual_seed(s))) for s in range(50)}
    assert picks == {0, 1}
    tied = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0]])  # top-2 of three equal logits: the first two of them
    assert torch.equal(distribution(tied, Sampling(top_k=2))[0] > 0, torch.tensor([False, True, True, False, False]))
    picks = {int(sample(tied, Sampling(top_k=2), torch.Generator().manual_seed(s))) for s in range(50)}
    assert picks == {1, 2}


def test_greedy_is_the_first_largest_logit() -> None:
    logits = torch.tensor([[0.0, 2.0, 2.0], [5.0, 1.0, 5.0]])
    assert sample(logits, Sampling(greedy=True)).tolist() == [1, 0]
    assert distribution(logits, Sampling(greedy=True)).argmax(-1).tolist() == [1, 0]


@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 1e300], ids=["subnormal", "tiny", "huge"])
def test_extreme_temperatures_give_a_distribution_not_nan(temperature: float) -> None:
    """Any temperature > 0 is a valid request (the server takes it): a tiny one is greedy among the largest logits,
    a huge one is uniform; dividing the raw logits would make inf - inf = NaN (found by fuzzing the server)."""
    logits = torch.tensor([[0.5, 2.0, -1.0, 2.0]])
    s = Sampling(temperature)
    probs, _ = candidate_probs(logits, s)
    expected = [0.0, 0.5, 0.0, 0.5] if temperature < 1 else [0.25] * 4
    assert_close("probs", probs[0].double(), torch.tensor(expected, dtype=torch.float64))
    assert_close("reference", distribution(logits, s)[0], torch.tensor(expected, dtype=torch.float64))
    assert int(sample(logits, s, torch.Generator().manual_seed(0))) in ((1, 3) if temperature < 1 else range(4))
