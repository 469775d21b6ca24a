"""Alert delivery channels: senders that each make one attempt and report an ``Outcome`` (webhook, SMS,
email). Retrying, storing delivery status and disabling endpoints belong to the delivery jobs that call them.

This module holds the wording every channel shares: what crossed what, from an alert-events payload."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Any

# An event field is ours, but shown to a person; a value that long is a bug, not something to print whole.
MAX_FIELD_CHARS = 64
PERCENT_PLACES = Decimal("0.01")


@dataclass(frozen=True, slots=True)
class AlertFacts:
    """An alert event in words. Plain text: escaping is the template's job."""

    pair: str  # "BTC/USD"
    headline: str  # "BTC/USD rose above 50000 USD"
    condition: str  # "price above 50000 USD"
    measured: str  # the value that crossed: "50012.5 USD", "5.12%"
    price: str  # "50012.5 USD"
    at: str  # "2024-05-01 12:00:03 UTC"
    event_id: str
    alert_id: str


def clean(value: Any, limit: int = MAX_FIELD_CHARS) -> str:
    """``value`` as one printable line: control characters (newlines included) become spaces."""
    text = "" if value is None else str(value)
    text = "".join(" " if unicodedata.category(char).startswith("C") else char for char in text).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _decimal(value: Any) -> Decimal | None:
    try:
        number = Decimal(str(value))
    except (InvalidOperation, ValueError, TypeError):
        return None
    return number if number.is_finite() else None


def _amount(value: Any) -> str:
    number = _decimal(value)
    return clean(value) if number is None else clean(format(number, "f"))


def _percent(value: Any, *, magnitude: bool = False, rounded: bool = False) -> str:
    number = _decimal(value)
    if number is None:
        return clean(value)
    if magnitude:
        # A fall is told as "fell 5%", whichever sign the engine keeps it with.
        number = abs(number)
    if rounded:
        number = number.quantize(PERCENT_PLACES, rounding=ROUND_HALF_EVEN)
    return clean(format(number, "f")) + "%"


def event_time(value: Any) -> str:
    try:
        moment = datetime.fromisoformat(str(value))
    except ValueError:
        return clean(value)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def describe(event: dict[str, Any]) -> AlertFacts:
    """The facts of an alert-events payload, worded for a person (never raises on odd values)."""
    symbol, vs, condition = clean(event.get("symbol"), 16), clean(event.get("vs"), 16), clean(event.get("condition"))
    pair = f"{symbol}/{vs}"
    threshold, value = event.get("threshold"), event.get("value")
    window = event.get("window_minutes")
    within = f" within {clean(window, 8)} min" if window else ""
    measured = _percent(value, rounded=True)
    if condition == "above":
        headline = f"{pair} rose above {_amount(threshold)} {vs}"
        wanted = f"price above {_amount(threshold)} {vs}"
        measured = f"{_amount(value)} {vs}"
    elif condition == "below":
        headline = f"{pair} fell below {_amount(threshold)} {vs}"
        wanted = f"price below {_amount(threshold)} {vs}"
        measured = f"{_amount(value)} {vs}"
    elif condition == "pct_change_up":
        headline = f"{pair} rose {measured}{within} (alert at {_percent(threshold)})"
        wanted = f"a rise of {_percent(threshold)} or more{within}"
    elif condition == "pct_change_down":
        measured = _percent(value, magnitude=True, rounded=True)
        headline = f"{pair} fell {measured}{within} (alert at {_percent(threshold, magnitude=True)})"
        wanted = f"a fall of {_percent(threshold, magnitude=True)} or more{within}"
    elif condition == "spread_above":
        headline = f"{pair} spread between sources reached {measured} (alert above {_percent(threshold)})"
        wanted = f"spread between sources above {_percent(threshold)}"
    else:
        headline = f"{pair} alert fired ({condition} {_amount(threshold)})"
        wanted = f"{condition} {_amount(threshold)}"
        measured = _amount(value)
    return AlertFacts(
        pair=pair,
        headline=headline,
        condition=wanted,
        measured=measured,
        price=f"{_amount(event.get('price'))} {vs}",
        at=event_time(event.get("created_at")),
        event_id=clean(event.get("id")),
        alert_id=clean(event.get("alert_id")),
    )
