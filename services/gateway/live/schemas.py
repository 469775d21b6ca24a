"""What goes over the live websocket: the close codes, the frames the server sends (built once per stream
entry and shared by every socket that gets them), and the stream payloads they are made from."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from services.gateway.web.session import ACCESS_COOKIE
from shared.responses import dumps
from shared.timeparse import iso_z
from shared.validation import SYMBOL_RE

# The dashboard's cookie holding an access token (the websocket API cannot set an Authorization header).
COOKIE_NAME = ACCESS_COOKIE
# A browser offers ["bearer", "<access token>"]; the server accepts with "bearer" alone.
SUBPROTOCOL = "bearer"

# 1008: the query is unusable (unknown symbol or currency, malformed value, plain ws:// on an https-only
# gateway). 1011: the token could not be checked (Redis unavailable). 1013: the process is full or the
# caller's rate limit is spent; retry later. 4401, 4403, 4408: HTTP's 401, 403 and 408, in the range RFC 6455
# leaves to applications.
CLOSE_POLICY = 1008
CLOSE_UNAVAILABLE = 1011
CLOSE_TRY_LATER = 1013
CLOSE_UNAUTHORIZED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_TOO_SLOW = 4408
TOO_SLOW_REASON = "client too slow"

# Alert payload fields written as decimal strings on the stream (services/alerting/evaluation.py
# event_payload); frames carry them as JSON numbers, like every price and amount of the API.
ALERT_DECIMALS = ("threshold", "value", "previous", "price")

Pair = tuple[str, str]


class BadEntry(Exception):
    """A stream entry that cannot become a frame; the message says why (for the log)."""


def text(frame: dict[str, Any]) -> str:
    return dumps(frame).decode()


def welcome(symbols: list[str], vs: str, *, authenticated: bool, heartbeat_seconds: float) -> str:
    beat: float | int = int(heartbeat_seconds) if float(heartbeat_seconds).is_integer() else heartbeat_seconds
    return text(
        {"type": "welcome", "symbols": symbols, "vs": vs, "authenticated": authenticated, "heartbeat_seconds": beat}
    )


def heartbeat(now: datetime) -> str:
    return text({"type": "heartbeat", "at": iso_z(now)})


def subscribed(symbols: list[str]) -> str:
    return text({"type": "subscribed", "symbols": symbols})


def pong() -> str:
    return '{"type":"pong"}'


def authenticated(expires_at: datetime | None) -> str:
    return text({"type": "authenticated", "expires_at": iso_z(expires_at)})


def error(code: str, message: str) -> str:
    return text({"type": "error", "code": code, "message": message})


def _decimal(value: object) -> Decimal | None:
    if isinstance(value, bool) or not isinstance(value, str | int | float | Decimal):
        return None
    try:
        number = Decimal(str(value))
    except (InvalidOperation, ValueError):
        return None
    return number if number.is_finite() else None


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def price_frame(payload: dict[str, Any], entry_id: str) -> tuple[Pair, str]:
    """The ``price`` frame of a prices-stream payload, and the (base, vs) it belongs to."""
    base, vs = payload.get("base"), payload.get("vs")
    if not isinstance(base, str) or not SYMBOL_RE.match(base) or not isinstance(vs, str) or not SYMBOL_RE.match(vs):
        raise BadEntry("base and vs must be upper-case ticker symbols")
    price = _decimal(payload.get("price"))
    if price is None:
        raise BadEntry(f"price is not a finite decimal: {str(payload.get('price'))[:40]!r}")
    spread = payload.get("spread_pct")
    frame = {
        "type": "price",
        "base": base,
        "vs": vs,
        "price": price,
        "status": _text(payload.get("status")),
        "last_updated": _text(payload.get("last_updated")),
        "sources_used": _count(payload.get("sources_used")),
        "sources_total": _count(payload.get("sources_total")),
        "spread_pct": None if spread is None else _decimal(spread),
        "event_id": _text(payload.get("event_id")) or entry_id,
    }
    return (base, vs), text(frame)


def alert_frame(payload: dict[str, Any]) -> tuple[str, str]:
    """The ``alert.triggered`` frame of an alert-events payload, and the user it is for."""
    user_id = payload.get("user_id")
    if not isinstance(user_id, str) or not user_id:
        raise BadEntry("the alert event names no user_id")
    frame = {**payload, "type": "alert.triggered"}
    for name in ALERT_DECIMALS:
        number = _decimal(frame.get(name))
        if number is not None:
            frame[name] = number
    return user_id, text(frame)
