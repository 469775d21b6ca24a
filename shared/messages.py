"""Stream message contracts shared by producers and consumers."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shared.streams import PoisonMessage
from shared.timeparse import iso_z
from shared.validation import STORED_SYMBOL_PATTERN


def utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def to_decimal(value: object) -> Decimal | None:
    """A finite Decimal from an exchange value (str, int or float), or None when absent."""
    if value is None or value == "":
        return None
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"not a finite number: {value!r}")
        # repr gives the shortest string that round-trips, i.e. the digits the exchange sent.
        value = repr(value)
    try:
        result = Decimal(str(value))
    except InvalidOperation:
        raise ValueError(f"not a number: {value!r}") from None
    if not result.is_finite():
        raise ValueError(f"not a finite number: {value!r}")
    return result


class TickMessage(BaseModel):
    """One normalised quote from one source, as published on the ticks stream."""

    model_config = ConfigDict(frozen=True)

    tick_id: str = Field(min_length=1, max_length=200)
    source: str = Field(min_length=1, max_length=50)
    base: str = Field(pattern=STORED_SYMBOL_PATTERN)
    quote: str = Field(pattern=STORED_SYMBOL_PATTERN)
    pair: str = Field(min_length=1, max_length=40)
    price: Decimal = Field(gt=0)
    bid: Decimal | None = Field(default=None, gt=0)
    ask: Decimal | None = Field(default=None, gt=0)
    volume_24h: Decimal | None = Field(default=None, ge=0)
    quote_volume_24h: Decimal | None = Field(default=None, ge=0)
    exchange_ts: datetime
    received_at: datetime
    # How the quote arrived: sources age out faster on a websocket than on REST polling.
    transport: Literal["ws", "rest", "sim"] = "rest"
    # Where ``price`` came from: the last trade, or the mid of best bid/ask when a feed only sends book tops.
    price_kind: Literal["last", "mid"] = "last"

    @field_validator("exchange_ts", "received_at")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        return utc(value)

    @classmethod
    def from_stream(cls, payload: dict[str, Any]) -> TickMessage:
        try:
            return cls.model_validate(payload)
        except ValidationError as exc:
            raise PoisonMessage(f"invalid tick: {validation_problems(exc)}") from None

    @classmethod
    def from_json(cls, raw: str | bytes | None) -> TickMessage:
        """Parse a stream entry's ``data`` straight from JSON (pydantic-core parses and validates in one pass)."""
        if raw is None:
            raise PoisonMessage("entry has no 'data' field")
        try:
            return cls.model_validate_json(raw)
        except ValidationError as exc:
            raise PoisonMessage(f"invalid tick: {validation_problems(exc)}") from None

    def to_stream(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def validation_problems(exc: ValidationError) -> str:
    """The first few of a stream message's validation errors, for its dead-letter reason."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'message'}: {e['msg']}" for e in exc.errors()[:5])


def price_event(row: Any) -> dict[str, Any]:
    """A consolidated price as published on the prices stream and kept in caches; built from pricing's
    result or from a stored ``prices`` row, so producers and readers agree on one shape."""
    return {
        "base": row.base,
        "vs": row.vs,
        "price": str(row.price),
        "volume_24h": None if row.volume_24h is None else str(row.volume_24h),
        "status": row.status,
        "sources_used": row.sources_used,
        "sources_total": row.sources_total,
        "method": row.method,
        "last_updated": iso_z(row.last_updated),
        "fresh_until": iso_z(row.fresh_until),
        # Highest against lowest used source, in percent: what spread_above alerts watch. Only a fresh
        # consolidation knows it (stored rows don't keep per-source prices), so rebuilt events carry None.
        "spread_pct": None if getattr(row, "spread_pct", None) is None else str(row.spread_pct),
    }


def effective_status(payload: dict[str, Any], now: datetime) -> str:
    """A price event's status at ``now`` (see ``status_at``)."""
    return status_at(str(payload.get("status")), payload.get("fresh_until"), now)


def status_at(status: str, fresh_until: datetime | str | None, now: datetime) -> str:
    """A price's status at ``now``: a "fresh" price past its ``fresh_until`` has lost its quorum of fresh
    votes since it was computed, whatever the cache or the database still say."""
    if status != "fresh":
        return status
    # No expiry recorded (a price from before it existed), or an unreadable one: not vouched for.
    until = _fresh_until(fresh_until)
    return "fresh" if until is not None and now <= until else "stale"


def seconds_until_stale(payload: dict[str, Any], now: datetime) -> float | None:
    """How long a "fresh" price event stays so after ``now`` (0: no longer); None for any other status, which
    only a new event changes. An answer showing the price may be reused only that long."""
    if str(payload.get("status")) != "fresh":
        return None
    until = _fresh_until(payload.get("fresh_until"))
    return max(0.0, (until - now).total_seconds()) if until is not None else 0.0


def _fresh_until(value: datetime | str | None) -> datetime | None:
    if not value:
        return None
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
    return value
