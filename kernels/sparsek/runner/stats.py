"""Summary statistics of timing samples, with the standard library only.

Quartiles interpolate linearly between order statistics (the "inclusive" method,
numpy's default), so min <= q1 <= median <= q3 <= max always holds. The 95%
confidence interval of the median comes from order statistics and the binomial
distribution, which assumes nothing about the shape of the timing distribution
(timings are skewed and often bimodal, so a normal interval would mislead).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from sparsek_remote.schema import Stats

CONFIDENCE = 0.95
# The fewest samples whose order statistics can bound the median with 95% (for five,
# even the whole range covers it only with 1 - 2^-4 = 93.75%).
CI_MIN_SAMPLES = 6


def summarize(samples_ms: Sequence[float]) -> Stats:
    """Stats of ``samples_ms`` (milliseconds, at least one sample)."""
    if not samples_ms:
        raise ValueError("cannot summarize zero timing samples")
    ordered = sorted(float(s) for s in samples_ms)
    low, high = median_confidence_interval(ordered)
    q1, q3 = quantile(ordered, 0.25), quantile(ordered, 0.75)
    return Stats(
        n=len(ordered),
        median_ms=statistics.median(ordered),
        mean_ms=statistics.fmean(ordered),
        min_ms=ordered[0],
        max_ms=ordered[-1],
        q1_ms=q1,
        q3_ms=q3,
        iqr_ms=q3 - q1,
        ci95_low_ms=low,
        ci95_high_ms=high,
    )


def relative_ci(samples_ms: Sequence[float]) -> float:
    """How far the median's 95% confidence interval reaches from the median, as a
    fraction of it: ``max(median - low, high - median) / median``. The larger side is
    taken because the interval is not symmetric. Infinite below CI_MIN_SAMPLES
    samples, where there is no 95% interval, and for a zero median with any spread."""
    if len(samples_ms) < CI_MIN_SAMPLES:
        return math.inf
    ordered = sorted(float(s) for s in samples_ms)
    median = statistics.median(ordered)
    low, high = median_confidence_interval(ordered)
    reach = max(median - low, high - median)
    if median <= 0:
        return 0.0 if reach == 0 else math.inf
    return reach / median


def quantile(ordered: Sequence[float], p: float) -> float:
    """The ``p`` quantile of already sorted values, interpolated linearly."""
    position = p * (len(ordered) - 1)
    below = math.floor(position)
    above = min(below + 1, len(ordered) - 1)
    fraction = position - below
    return ordered[below] + fraction * (ordered[above] - ordered[below])


def median_confidence_interval(ordered: Sequence[float]) -> tuple[float, float]:
    """Order statistics ``(x_(l), x_(n+1-l))`` covering the median with at least 95%.

    ``l`` is the largest rank with ``P(Binomial(n, 1/2) <= l - 1) <= 2.5%``. Below six
    samples no such rank exists and the whole range is returned (its coverage is
    then ``1 - 2^(1-n)``, less than 95%: the sample is too small to say more).
    """
    n = len(ordered)
    rank = _lower_rank(n, (1.0 - CONFIDENCE) / 2.0)
    if rank < 1:
        return ordered[0], ordered[-1]
    return ordered[rank - 1], ordered[n - rank]


def _lower_rank(n: int, tail: float) -> int:
    """Largest ``l`` with ``P(X <= l - 1) <= tail`` for ``X ~ Binomial(n, 1/2)``; 0 if none."""
    log_half_n = n * math.log(0.5)
    log_n_fact = math.lgamma(n + 1)
    cumulative = 0.0
    for k in range(n + 1):
        log_pmf = log_n_fact - math.lgamma(k + 1) - math.lgamma(n - k + 1) + log_half_n
        cumulative += math.exp(log_pmf)
        # Guard against rounding: the interval must never be narrower than exact.
        if cumulative > tail * (1.0 - 1e-12):
            return k
    return 0
