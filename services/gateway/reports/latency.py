"""A bounded summary of durations: percentiles within 1% of the exact ones, in memory that does not grow with
the number of durations.

Durations fall into log-spaced buckets: bucket ``b`` holds the values whose ``log(v) / log(1.01)`` rounds to
``b``, so the largest value of a bucket is at most 1.01 times its smallest. Each bucket keeps its count and the
sum of its values; a percentile is found on the cumulative counts (nearest rank, as exact percentiles are) and
answered with the mean of the bucket it falls in. That mean and the exact value lie in the same bucket, so they
are less than 1% apart, and a bucket of one repeated value (the common case for small samples) answers exactly.

Durations from 1 µs to a day span about 2,500 buckets; a route's summary is a few hundred in practice, whatever
the size of the log.
"""

from __future__ import annotations

import math
from math import log

# Multiplying by the inverse is cheaper than dividing, and add() runs once per line of the log.
_INVERSE_LOG_BASE = 1 / log(1.01)
# Zero (and anything below a microsecond: a clock's rounding) gets a bucket of its own below every other.
_ZERO = -(10**6)
_SMALLEST = 0.001


class LatencySummary:
    __slots__ = ("buckets", "count", "max")

    def __init__(self) -> None:
        # bucket -> [count, sum of its values]
        self.buckets: dict[int, list[float]] = {}
        self.count = 0
        self.max = -1.0  # below any duration: max_ms() says None while nothing was added

    def add(self, ms: float) -> None:
        """One duration in milliseconds (finite, not negative: the caller checks)."""
        bucket = round(log(ms) * _INVERSE_LOG_BASE) if ms >= _SMALLEST else _ZERO
        entry = self.buckets.get(bucket)
        if entry is None:
            self.buckets[bucket] = [1, ms]
        else:
            entry[0] += 1
            entry[1] += ms
        self.count += 1
        if ms > self.max:
            self.max = ms

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile (0 < q <= 1) by nearest rank, within 1% of the exact one; None when empty."""
        if not self.count:
            return None
        rank = max(1, math.ceil(q * self.count))
        seen = 0.0
        for bucket in sorted(self.buckets):
            count, total = self.buckets[bucket]
            seen += count
            if seen >= rank:
                return round(total / count, 3)
        return self.max_ms()  # not reached: the last bucket's cumulative count is the total

    def max_ms(self) -> float | None:
        return round(self.max, 3) if self.count else None
