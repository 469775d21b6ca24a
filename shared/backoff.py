"""The one backoff policy: capped exponential growth with jitter, for every loop that retries.

Callers need the delay as a number (it is shown in source health, kept in Redis as a deadline, or waited on
while a stop event and a REST fallback run), not a decorated call, which is why this is a function and not a
retry library's decorator."""

from __future__ import annotations

import random
from typing import Literal

Jitter = Literal["full", "equal", "none"]
# 2**32 times any sane base is past every cap; clamping the exponent keeps the float from overflowing.
_MAX_EXPONENT = 32


def jittered_backoff(
    attempt: int, *, base: float, cap: float, floor: float | None = None, jitter: Jitter = "full"
) -> float:
    """Seconds to wait before retry ``attempt`` (1 for the first retry): the ceiling is ``base`` doubled per
    attempt, at most ``cap``.

    ``jitter``: "full" draws from [0, ceiling] (spreads many clients best), "equal" from [ceiling/2, ceiling]
    (never less than half the step, so a refusing server is not hammered), "none" is the ceiling itself.
    ``floor``: the delay is never below it (e.g. the normal poll interval), whatever the draw."""
    ceiling = min(cap, base * 2.0 ** min(max(attempt - 1, 0), _MAX_EXPONENT))
    low = 0.0 if jitter == "full" else ceiling / 2 if jitter == "equal" else ceiling
    if floor is not None:
        low = max(low, floor)
        ceiling = max(ceiling, floor)
    return low if low >= ceiling else random.uniform(low, ceiling)
