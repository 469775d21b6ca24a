"""Time input as the contract accepts it: ISO 8601 (with or without offset) or Unix seconds."""

from __future__ import annotations

import math
from datetime import UTC, datetime

from shared.errors import ValidationFailed


def parse_time(value: str, name: str) -> datetime:
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds) or not (0 <= seconds < 253402300800):
            raise ValidationFailed(f"{name}: Unix seconds out of range: {value!r}")
        return datetime.fromtimestamp(seconds, tz=UTC)
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValidationFailed(f"{name}: expected ISO 8601 or Unix seconds, got {value!r}") from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
