"""HTTP helpers every outbound client uses: pointing an endpoint at a mirror, and reading Retry-After."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit, urlunsplit

# An hour-long ban is plausible; a header asking for more than a day is a broken server, not a plan.
MAX_RETRY_AFTER_SECONDS = 86_400.0


def rebase_url(url: str, base: str) -> str:
    """Point ``url`` at ``base`` (scheme, host and path prefix), keeping the endpoint's own path and query.

    This is how COINLYTICS_SOURCE_<NAME>_REST_URL / _WS_URL send a client to a mirror or a replay server without
    each client knowing the exchange's endpoint layout."""
    target = urlsplit(base)
    original = urlsplit(url)
    path = target.path.rstrip("/") + original.path
    return urlunsplit((target.scheme, target.netloc, path, original.query, original.fragment))


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date, RFC 9110); None when absent
    or unreadable. A date in the past is no wait; anything beyond MAX_RETRY_AFTER_SECONDS is capped there."""
    if not value or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_SECONDS)
