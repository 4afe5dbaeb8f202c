"""A claim about quality is a distribution: mean ± std over seeds, and the paired difference to a baseline.

Models compared under the same seeds share the data order and (for equal sizes) nothing else; the paired
difference d_i = a_i - b_i over seeds i removes the part of the seed noise that the data order causes in both.
Its 95% interval is Student's t: mean(d) ± t_{0.975, n-1} · std(d) / sqrt(n), with the sample standard deviation
(n - 1 in the denominator). An interval that includes 0 is "not significant" (at n = 1 there is no interval).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

# two-sided 95% quantiles of Student's t by degrees of freedom (then the normal quantile beyond the table)
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def t_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (the next tabulated df below, else 1.96)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return T_975[max(k for k in T_975 if k <= df)] if df <= 120 else 1.960


@dataclass(frozen=True)
class Summary:
    """n values: their mean and sample standard deviation (0 for one value)."""

    n: int
    mean: float
    std: float

    def __str__(self) -> str:
        return f"{self.mean:.3f} ± {self.std:.3f}" if self.n > 1 else f"{self.mean:.3f}"


def summarize(values: Sequence[float]) -> Summary:
    if not values:
        raise ValueError("no values to summarize")
    return Summary(len(values), statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


@dataclass(frozen=True)
class PairedDifference:
    """mean(a - b) over paired values, its 95% interval, and the same relative to mean(b) (as fractions)."""

    n: int
    mean: float
    std: float
    low: float | None  # None for n = 1
    high: float | None
    relative: float  # mean(a - b) / mean(b)
    relative_low: float | None
    relative_high: float | None

    @property
    def significant(self) -> bool | None:
        """True when the interval excludes 0, False when it includes it, None without an interval (n = 1)."""
        if self.low is None or self.high is None:
            return None
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "significant": self.significant}

    def __str__(self) -> str:
        text = f"{self.relative:+.1%}"
        if self.relative_low is None or self.relative_high is None:
            return text + " (one seed)"
        note = "" if self.significant else ", not significant"
        return f"{text} [{self.relative_low:+.1%}, {self.relative_high:+.1%}]{note}"


def paired_difference(a: Sequence[float], b: Sequence[float]) -> PairedDifference:
    """a_i - b_i over the same seeds (the same length, in the same order)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired values need equal, non-zero lengths, got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b, strict=True)]
    s, base = summarize(d), statistics.fmean(b)
    if s.n < 2:
        return PairedDifference(1, s.mean, 0.0, None, None, s.mean / base, None, None)
    half = t_975(s.n - 1) * s.std / math.sqrt(s.n)
    low, high = s.mean - half, s.mean + half
    return PairedDifference(s.n, s.mean, s.std, low, high, s.mean / base, low / base, high / base)
