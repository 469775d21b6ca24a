"""Time as the contract has it: accepted as ISO 8601 (with or without offset) or Unix seconds, written as
ISO 8601 in UTC with a "Z"."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import overload

from shared.errors import ValidationFailed

# Accepted moments. The day's margin below datetime's year-9999 limit leaves room for the arithmetic callers
# do around a moment (a window's end, a candle's length) without an OverflowError.
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(9999, 12, 30, tzinfo=UTC)


def _out_of_range(name: str, value: str) -> ValidationFailed:
    return ValidationFailed(
        f"{name}: {value[:40]!r} is out of range: use a moment from 1970-01-01 to 9999-12-30 (UTC)",
        details={"parameter": name, "earliest": "1970-01-01T00:00:00Z", "latest": "9999-12-30T00:00:00Z"},
    )


@overload
def iso_z(value: datetime) -> str: ...
@overload
def iso_z(value: datetime | None) -> str | None: ...
def iso_z(value: datetime | None) -> str | None:
    """A moment as the contract writes it: ISO 8601 in UTC with a "Z" (None stays None)."""
    return None if value is None else value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def parse_time(value: str, name: str) -> datetime:
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds) or not (EARLIEST.timestamp() <= seconds <= LATEST.timestamp()):
            raise _out_of_range(name, value)
        return datetime.fromtimestamp(seconds, tz=UTC)
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValidationFailed(f"{name}: expected ISO 8601 or Unix seconds, got {value!r}") from None
    try:
        moment = parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    except OverflowError:
        # An offset that pushes year 1 or 9999 past datetime's range.
        raise _out_of_range(name, value) from None
    if not (EARLIEST <= moment <= LATEST):
        raise _out_of_range(name, value)
    return moment


# "15m", "24h", "7d", "90s", "2w": a span back from now, as operators type it on a command line.
_SPAN_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


def parse_since(value: str, name: str, now: datetime) -> datetime:
    """A window's start: a span back from ``now`` ("15m", "24h", "7d") or a moment as ``parse_time`` takes it."""
    text = value.strip().lower()
    unit = _SPAN_UNITS.get(text[-1:]) if text else None
    # isascii too: str.isdigit() accepts "²", which int() refuses.
    if unit is not None and text[:-1].isascii() and text[:-1].isdigit() and len(text) <= 12:
        seconds = int(text[:-1]) * unit
        if seconds <= 0 or seconds > (now - EARLIEST).total_seconds():
            raise ValidationFailed(
                f"{name}: {value[:40]!r} must be a positive span that starts after 1970-01-01",
                details={"parameter": name},
            )
        return now - timedelta(seconds=seconds)
    try:
        return parse_time(value, name)
    except ValidationFailed as exc:
        if isinstance(exc.details, dict) and "earliest" in exc.details:
            raise  # a moment, but out of range: that message says more
        raise ValidationFailed(
            f"{name}: expected a span such as 15m, 24h or 7d, or an ISO 8601 moment, got {value[:40]!r}",
            details={"parameter": name},
        ) from exc
