"""The ECB euro foreign exchange reference rates feed: fetching and parsing its XML files.

The ECB publishes one set of rates per TARGET working day, around 16:00 CET, as units of each currency per
1 EUR (``eurofxref-daily.xml``); ``eurofxref-hist-90d.xml`` holds the last 90 days in the same shape."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal, InvalidOperation
from zoneinfo import ZoneInfo

import defusedxml.ElementTree as SafeET
import httpx
from defusedxml import DefusedXmlException

DEFAULT_ECB_URL = "https://www.ecb.europa.eu/stats/eurofxref"
DAILY_FILE = "eurofxref-daily.xml"
HISTORY_FILE = "eurofxref-hist-90d.xml"
MAX_BODY_BYTES = 2_000_000  # the 90-day file is ~75 KB; anything far larger is not the feed
CURRENCY_RE = re.compile(r"^[A-Z]{3}$")
ECB_TZ = ZoneInfo("Europe/Berlin")
PUBLICATION_TIME = time(16, 0)


class EcbError(Exception):
    """A fetch or parse failure; ``kind`` names it for source health and the error log."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class EcbRates:
    days: dict[date, dict[str, Decimal]] = field(default_factory=dict)
    rejected: int = 0

    def count(self) -> int:
        return sum(len(rates) for rates in self.days.values())


def published_at(day: date) -> datetime:
    """When the rates of ``day`` became public (16:00 Frankfurt time), in UTC."""
    return datetime.combine(day, PUBLICATION_TIME, tzinfo=ECB_TZ).astimezone(UTC)


def last_publication_day(moment: datetime) -> date:
    """The latest day whose rates were public at ``moment`` (its 16:00 CET publication has passed)."""
    day = moment.astimezone(ECB_TZ).date()
    return day if published_at(day) <= moment else day - timedelta(days=1)


def parse(body: bytes) -> EcbRates:
    """Every ``<Cube time=...>`` day and its ``<Cube currency=... rate=...>`` entries.

    Parsed with defusedxml (no entity expansion, no external references). A malformed entry is counted in
    ``rejected`` and skipped; a document with no usable day at all is an error."""
    try:
        root = SafeET.fromstring(body)
    except (SafeET.ParseError, DefusedXmlException, ValueError) as exc:
        raise EcbError("parse", f"not a valid ECB XML document: {exc}") from None
    result = EcbRates()
    for element in root.iter():
        if _local(element.tag) != "Cube" or "time" not in element.attrib:
            continue
        try:
            day = date.fromisoformat(element.attrib["time"].strip())
        except ValueError:
            result.rejected += 1
            continue
        rates = result.days.setdefault(day, {})
        for child in element:
            if _local(child.tag) != "Cube":
                continue
            currency = child.attrib.get("currency", "").strip().upper()
            raw = child.attrib.get("rate", "").strip()
            try:
                rate = Decimal(raw)
            except InvalidOperation:
                result.rejected += 1
                continue
            if not CURRENCY_RE.match(currency) or currency == "EUR" or not rate.is_finite() or rate <= 0:
                result.rejected += 1
                continue
            rates[currency] = rate
        if not rates:
            del result.days[day]
    if not result.days:
        raise EcbError("parse", "the document holds no reference rates")
    return result


def _local(tag: object) -> str:
    text = tag if isinstance(tag, str) else ""
    return text.rsplit("}", 1)[-1]


async def fetch(client: httpx.AsyncClient, base_url: str, name: str) -> EcbRates:
    url = f"{base_url.rstrip('/')}/{name}"
    try:
        response = await client.get(url)
    except httpx.TimeoutException:
        raise EcbError("timeout", f"GET {url} timed out") from None
    except httpx.HTTPError as exc:
        raise EcbError("network", f"GET {url} failed: {type(exc).__name__}: {exc}") from None
    if response.status_code == 429:
        raise EcbError("rate_limited", f"GET {url}: HTTP 429 (Retry-After {response.headers.get('retry-after')})")
    if response.status_code >= 400:
        raise EcbError("http_status", f"GET {url}: HTTP {response.status_code}")
    if len(response.content) > MAX_BODY_BYTES:
        raise EcbError("parse", f"GET {url}: body of {len(response.content)} bytes is too large for the feed")
    return parse(response.content)
