"""What one delivery attempt came to: the arq job decides from it whether to retry, stop or disable."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from shared.http import MAX_RETRY_AFTER_SECONDS

Status = Literal["delivered", "retry", "gone", "failed"]
# A receiver's reason is for a person reading the delivery history, not a place to store a response body.
MAX_DETAIL_CHARS = 300


@dataclass(frozen=True, slots=True)
class Outcome:
    """``delivered``: accepted. ``retry``: a transient failure, try again later (after ``retry_after`` seconds
    when the receiver asked). ``gone``: the endpoint says it no longer exists (HTTP 410), stop using it.
    ``failed``: permanent for this message (refused address, rejected recipient), retrying cannot help."""

    status: Status
    detail: str | None = None
    retry_after: float | None = None

    def __post_init__(self) -> None:
        if self.detail is not None and len(self.detail) > MAX_DETAIL_CHARS:
            object.__setattr__(self, "detail", self.detail[: MAX_DETAIL_CHARS - 3] + "...")
        if self.retry_after is not None:
            wait = min(max(self.retry_after, 0.0), MAX_RETRY_AFTER_SECONDS) if math.isfinite(self.retry_after) else None
            object.__setattr__(self, "retry_after", wait)


DELIVERED = Outcome("delivered")
