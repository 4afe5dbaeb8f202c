"""Means, standard deviations and paired differences with Student's interval."""

import math
import statistics

import pytest

from attnfree.evaluation.stats import paired_difference, summarize, t_975


def test_summary_is_the_sample_mean_and_std():
    s = summarize([2.6, 2.9, 2.7])
    assert s.mean == pytest.approx(2.7333333) and s.std == pytest.approx(statistics.stdev([2.6, 2.9, 2.7]))
    assert summarize([1.0]).std == 0.0 and str(summarize([1.0])) == "1.000"
    with pytest.raises(ValueError):
        summarize([])


def test_the_paired_interval_by_hand():
    a, b = [2.50, 2.55, 2.47], [2.75, 2.74, 2.76]
    d = [x - y for x, y in zip(a, b)]
    half = 4.303 * statistics.stdev(d) / math.sqrt(3)  # t_{0.975, 2}
    got = paired_difference(a, b)
    assert got.mean == pytest.approx(statistics.fmean(d)) and got.low == pytest.approx(got.mean - half)
    assert got.high == pytest.approx(got.mean + half) and got.significant is True
    assert got.relative == pytest.approx(got.mean / statistics.fmean(b))
    assert "not significant" not in str(got)


def test_an_interval_across_zero_is_not_significant_and_one_seed_has_none():
    noisy = paired_difference([2.6, 2.9, 2.7], [2.7, 2.7, 2.8])
    assert noisy.significant is False and "not significant" in str(noisy)
    single = paired_difference([2.5], [2.7])
    assert single.low is None and single.significant is None and "one seed" in str(single)
    with pytest.raises(ValueError, match="equal"):
        paired_difference([1.0, 2.0], [1.0])


def test_t_quantiles():
    assert t_975(2) == 4.303 and t_975(22) == 2.086 and t_975(1000) == 1.96
    with pytest.raises(ValueError):
        t_975(0)
