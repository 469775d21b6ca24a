"""The rate graph: currencies are nodes, known rates are edges, a conversion is the best path between two
nodes, and amounts are rounded to a stated precision.

How a path is chosen (documented in the OpenAPI description of /convert):
1. only usable edges count: a consolidated price that pricing marks ``fresh`` and that is younger than
   ``CRYPTO_MAX_AGE``; ECB rates while the ECB job keeps confirming them (``FIAT_MAX_FETCH_AGE``) or while
   the published day is recent; measured stablecoin/USD rates like the prices they come from;
2. fewest hops first, so a direct consolidated pair (BTC/EUR from EUR markets) always beats triangulation;
3. among paths of equal length, the lowest penalty: older prices and thinner markets cost more, and passing
   through a crypto currency between two others costs more than passing through fiat or a stablecoin;
4. the path is searched from the alphabetically smaller currency, and the other direction uses the same
   path reversed with the exact reciprocal rate, so A->B->A returns the amount within the rounding.
"""

from __future__ import annotations

import heapq
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Context, Decimal, InvalidOperation
from typing import Any

from services.conversion.ecb import published_at
from shared.messages import effective_status
from shared.timeparse import iso_z

CALC = Context(prec=34, rounding=ROUND_HALF_EVEN)
RATE_SIGNIFICANT_DIGITS = 18
CRYPTO_SIGNIFICANT_DIGITS = 10
MAX_PRECISION = 30
MAX_HOPS = 4
CRYPTO_MAX_AGE = timedelta(minutes=15)
FIAT_MAX_FETCH_AGE = timedelta(days=4)
FIAT_MAX_DAY_AGE = timedelta(days=5)

# Quoted as if they were USD by pricing; each gets its measured rate here.
STABLECOINS = frozenset({"USDT", "USDC", "BUSD", "TUSD", "USDP", "DAI", "FDUSD", "PAX"})

# ISO 4217 minor units. Every ECB currency is listed (also those it stopped publishing); anything fiat not
# listed uses 2.
ISO_MINOR_UNITS: dict[str, int] = {
    "EUR": 2, "USD": 2, "JPY": 0, "BGN": 2, "CYP": 2, "CZK": 2, "DKK": 2, "EEK": 2, "GBP": 2, "HUF": 2,
    "LTL": 2, "LVL": 2, "MTL": 2, "PLN": 2, "ROL": 2, "RON": 2, "SEK": 2, "SIT": 2, "SKK": 2, "CHF": 2,
    "ISK": 0, "NOK": 2, "HRK": 2, "RUB": 2, "TRL": 0, "TRY": 2, "AUD": 2, "BRL": 2, "CAD": 2, "CNY": 2,
    "HKD": 2, "IDR": 2, "ILS": 2, "INR": 2, "KRW": 0, "MXN": 2, "MYR": 2, "NZD": 2, "PHP": 2, "SGD": 2,
    "THB": 2, "ZAR": 2, "CLP": 0, "VND": 0, "KWD": 3, "BHD": 3, "JOD": 3, "OMR": 3, "TND": 3, "UAH": 2,
    "ARS": 2, "AED": 2, "SAR": 2, "TWD": 2, "NGN": 2, "PKR": 2, "EGP": 2, "COP": 2, "PEN": 2,
}  # fmt: skip


def utcnow() -> datetime:
    return datetime.now(UTC)


def parse_iso(value: str) -> datetime:
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def plain(value: Decimal) -> Decimal:
    """The same number without an exponent, so JSON shows 12000000 rather than 1.2E+7."""
    return Decimal(format(value, "f"))


def rate_out(value: Decimal) -> Decimal:
    """A rate as shown: 18 significant digits, without padding zeros (9912.33, not 9912.33000000000000)."""
    return plain(significant(value, RATE_SIGNIFICANT_DIGITS).normalize(CALC))


def significant(value: Decimal, digits: int) -> Decimal:
    if value == 0:
        return value
    exponent = value.adjusted() - (digits - 1)
    return value.quantize(Decimal(1).scaleb(exponent), rounding=ROUND_HALF_EVEN, context=CALC)


@dataclass(frozen=True, slots=True)
class Edge:
    """``rate`` units of ``b`` per 1 ``a``."""

    a: str
    b: str
    rate: Decimal
    as_of: datetime
    source: str  # consolidated, ecb, measured, candle
    usable: bool
    penalty: float
    detail: tuple[tuple[str, Any], ...] = ()

    def leg(self, forward: bool, rate: Decimal) -> dict[str, Any]:
        out: dict[str, Any] = {
            "from": self.a if forward else self.b,
            "to": self.b if forward else self.a,
            "rate": rate_out(rate),
            "source": self.source,
            "as_of": iso_z(self.as_of),
        }
        out.update(dict(self.detail))
        return out


@dataclass
class Route:
    path: list[str]
    legs: list[tuple[Edge, bool]]
    rate: Decimal  # exact to CALC precision
    _leg_dicts: list[dict[str, Any]] | None = field(default=None, repr=False, compare=False)
    _rate_shown: Decimal | None = field(default=None, repr=False, compare=False)

    @property
    def as_of(self) -> datetime:
        return min(edge.as_of for edge, _ in self.legs)

    def reversed(self) -> Route:
        return Route(
            path=list(reversed(self.path)),
            legs=[(edge, not forward) for edge, forward in reversed(self.legs)],
            rate=CALC.divide(Decimal(1), self.rate),
        )

    def leg_dicts(self) -> list[dict[str, Any]]:
        # Memoised with the route (a table memoises its routes): the same legs are shown on every conversion
        # until the table is rebuilt. Read-only for callers: the body is encoded as it is.
        if self._leg_dicts is None:
            self._leg_dicts = [
                edge.leg(forward, edge.rate if forward else CALC.divide(Decimal(1), edge.rate))
                for edge, forward in self.legs
            ]
        return self._leg_dicts

    def rate_shown(self) -> Decimal:
        """``rate_out(rate)``, memoised like the legs."""
        if self._rate_shown is None:
            self._rate_shown = rate_out(self.rate)
        return self._rate_shown


class NoRoute(Exception):
    """No usable path; ``stale_route`` tells whether one exists through unusable (stale) edges."""

    def __init__(self, stale_route: bool) -> None:
        super().__init__("no usable route")
        self.stale_route = stale_route


def _liquidity_penalty(quote_volume: Decimal | None) -> float:
    if quote_volume is None or quote_volume <= 0:
        return 0.4
    return 0.4 / (1.0 + math.log10(1.0 + float(quote_volume)))


@dataclass
class RateTable:
    """One consistent view of every known rate, built from the cached table (or a snapshot, or history)."""

    kinds: dict[str, str] = field(default_factory=dict)  # currency -> crypto, fiat, stablecoin
    adjacency: dict[str, list[tuple[str, Edge, bool]]] = field(default_factory=dict)
    edges: dict[tuple[str, str], Edge] = field(default_factory=dict)
    version: str = ""
    updated_at: datetime | None = None
    fiat_day: date | None = None
    fiat_source: str | None = None  # ecb, or sim-ecb for the demo's simulated rates
    _routes: dict[tuple[str, str], Route | NoRoute] = field(default_factory=dict)

    def add_node(self, currency: str, kind: str) -> None:
        current = self.kinds.get(currency)
        # fiat and stablecoin are facts about the currency; "crypto" is only the default guess.
        if current is None or current == "crypto":
            self.kinds[currency] = kind

    def add_edge(self, edge: Edge) -> None:
        key = (edge.a, edge.b) if edge.a < edge.b else (edge.b, edge.a)
        current = self.edges.get(key)
        if current is not None and (current.usable, current.as_of) >= (edge.usable, edge.as_of):
            return
        self.edges[key] = edge
        self.adjacency = {}

    def _build_adjacency(self) -> None:
        adjacency: dict[str, list[tuple[str, Edge, bool]]] = {}
        for edge in self.edges.values():
            adjacency.setdefault(edge.a, []).append((edge.b, edge, True))
            adjacency.setdefault(edge.b, []).append((edge.a, edge, False))
        for neighbours in adjacency.values():
            neighbours.sort(key=lambda item: item[0])
        self.adjacency = adjacency

    def kind(self, currency: str) -> str:
        return self.kinds.get(currency, "crypto")

    def knows(self, currency: str) -> bool:
        return currency in self.kinds

    def route(self, src: str, dst: str) -> Route:
        """The best usable route; raises NoRoute. Memoised: a table is rebuilt whenever its data changes."""
        key = (src, dst)
        found = self._routes.get(key)
        if found is None:
            if src > dst:
                # The reverse direction is the same path reversed; memoised too, so its exact reciprocal
                # rate and legs are computed once per table, not per conversion.
                try:
                    found = self.route(dst, src).reversed()
                except NoRoute as exc:
                    found = exc
            else:
                found = self._search(src, dst)
            self._routes[key] = found
        if isinstance(found, NoRoute):
            raise found
        return found

    def _search(self, src: str, dst: str) -> Route | NoRoute:
        if not self.adjacency:
            self._build_adjacency()
        best = self._dijkstra(src, dst, usable_only=True)
        if best is not None:
            return best
        return NoRoute(stale_route=self._dijkstra(src, dst, usable_only=False) is not None)

    def _dijkstra(self, src: str, dst: str, *, usable_only: bool) -> Route | None:
        counter = 0
        heap: list[tuple[int, float, tuple[str, ...], int, tuple[tuple[Edge, bool], ...]]] = [(0, 0.0, (src,), 0, ())]
        settled: set[str] = set()
        while heap:
            hops, penalty, nodes, _, legs = heapq.heappop(heap)
            node = nodes[-1]
            if node in settled:
                continue
            settled.add(node)
            if node == dst:
                rate = Decimal(1)
                for edge, forward in legs:
                    rate = CALC.multiply(rate, edge.rate) if forward else CALC.divide(rate, edge.rate)
                return Route(path=list(nodes), legs=list(legs), rate=rate)
            if hops >= MAX_HOPS:
                continue
            for neighbour, edge, forward in self.adjacency.get(node, ()):
                if neighbour in settled or (usable_only and not edge.usable):
                    continue
                extra = edge.penalty
                if neighbour != dst and self.kind(neighbour) == "crypto":
                    extra += 1.0
                counter += 1
                heapq.heappush(
                    heap, (hops + 1, round(penalty + extra, 9), (*nodes, neighbour), counter, (*legs, (edge, forward)))
                )
        return None


# --- Building tables --------------------------------------------------------------------------------
#
# The cached table is a Redis hash of JSON documents: ``price:<BASE>/<VS>`` (a consolidation payload),
# ``stable:<COIN>`` (a measured stablecoin/USD rate), ``fiat`` (the latest ECB day), ``coins`` (tracked
# coins). Snapshots store the same fields, so a snapshot rebuilds exactly the table that was live.


def is_derived(payload: Mapping[str, Any]) -> bool:
    """Pricing restates USD prices in other fiat through ECB rates; those are not markets of their own."""
    return "via=" in str(payload.get("method") or "")


def table_from_fields(fields: Mapping[str, Any], now: datetime, *, version: str = "") -> RateTable:
    table = RateTable(version=version)
    fiat = fields.get("fiat")
    if isinstance(fiat, dict):
        _add_fiat(table, fiat, now)
    for coin in fields.get("coins") or []:
        if isinstance(coin, str):
            table.add_node(coin, "stablecoin" if coin in STABLECOINS else "crypto")
    updated: list[datetime] = []
    for name, doc in fields.items():
        if not isinstance(doc, dict):
            continue
        try:
            if name.startswith("price:"):
                edge = _price_edge(doc, now)
            elif name.startswith("stable:"):
                edge = _stable_edge(doc, now)
            else:
                continue
        except (KeyError, ValueError, TypeError, InvalidOperation):
            continue  # one bad entry must not take the table down
        if edge is None:
            continue
        for currency in (edge.a, edge.b):
            table.add_node(currency, _guess_kind(currency, table))
        table.add_edge(edge)
        updated.append(edge.as_of)
    table.updated_at = max(updated) if updated else None
    return table


def _guess_kind(currency: str, table: RateTable) -> str:
    if currency in STABLECOINS:
        return "stablecoin"
    if currency in ISO_MINOR_UNITS or table.kinds.get(currency) == "fiat":
        return "fiat"
    return "crypto"


def _add_fiat(table: RateTable, doc: Mapping[str, Any], now: datetime) -> None:
    day = date.fromisoformat(doc["day"])
    fetched_at = parse_iso(doc["fetched_at"]) if doc.get("fetched_at") else None
    as_of = published_at(day)
    usable = (fetched_at is not None and now - fetched_at <= FIAT_MAX_FETCH_AGE) or now - as_of <= FIAT_MAX_DAY_AGE
    # Snapshots taken before the source was recorded are the ECB's.
    source = str(doc.get("source") or "ecb")
    table.fiat_day = day
    table.fiat_source = source
    table.add_node("EUR", "fiat")
    for currency, raw in (doc.get("rates") or {}).items():
        rate = Decimal(str(raw))
        if not rate.is_finite() or rate <= 0:
            continue
        table.add_node(currency, "fiat")
        table.add_edge(Edge("EUR", currency, rate, as_of, source, usable, 0.05, (("ecb_day", day.isoformat()),)))


def _price_edge(doc: Mapping[str, Any], now: datetime) -> Edge | None:
    if is_derived(doc):
        return None
    price = Decimal(str(doc["price"]))
    if not price.is_finite() or price <= 0:
        return None
    as_of = parse_iso(str(doc["last_updated"]))
    age = now - as_of
    volume = Decimal(str(doc["volume_24h"])) if doc.get("volume_24h") not in (None, "") else None
    penalty = 0.4 * min(max(age / CRYPTO_MAX_AGE, 0.0), 1.0) + _liquidity_penalty(
        volume * price if volume is not None else None
    )
    # Pricing's freshness re-checked against the clock (fresh_until), then conversion's own age bound.
    usable = effective_status(dict(doc), now) == "fresh" and age <= CRYPTO_MAX_AGE
    return Edge(
        str(doc["base"]), str(doc["vs"]), price, as_of, "consolidated", usable, penalty,
        (("status", doc.get("status")), ("sources_used", doc.get("sources_used"))),
    )  # fmt: skip


def _stable_edge(doc: Mapping[str, Any], now: datetime) -> Edge | None:
    rate = Decimal(str(doc["rate"]))
    if not rate.is_finite() or rate <= 0:
        return None
    as_of = parse_iso(str(doc["as_of"]))
    usable = doc.get("status") == "fresh" and now - as_of <= CRYPTO_MAX_AGE
    return Edge(str(doc["coin"]), "USD", rate, as_of, "measured", usable, 0.3, (("method", doc.get("method")),))


def measured_stablecoin_rates(
    quotes: Iterable[Any], usd_prices: Mapping[str, Any], priced_stablecoins: set[str]
) -> dict[str, dict[str, Any]]:
    """Each stablecoin's USD value as the markets imply it: a coin's consolidated USD price divided by its
    price in that stablecoin on each exchange, the median over all such markets.

    Skipped for a stablecoin that pricing already consolidates against USD (its own market is better)."""
    samples: dict[str, list[tuple[Decimal, datetime, str]]] = {}
    for q in quotes:
        coin = q.quote
        if coin in priced_stablecoins or q.price is None or q.price <= 0 or q.status == "outlier":
            continue
        usd = usd_prices.get(q.base)
        if usd is None or is_derived({"method": usd.method}):
            continue
        implied = CALC.divide(usd.price, q.price)
        as_of = min(usd.last_updated, q.received_at)
        samples.setdefault(coin, []).append((implied, as_of, usd.status))
    out: dict[str, dict[str, Any]] = {}
    for coin, values in samples.items():
        values.sort(key=lambda v: v[0])
        mid = len(values) // 2
        rate = values[mid][0] if len(values) % 2 else CALC.divide(values[mid - 1][0] + values[mid][0], Decimal(2))
        out[coin] = {
            "coin": coin,
            "rate": str(rate),
            "as_of": iso_z(max(v[1] for v in values)),
            "status": "fresh" if any(v[2] == "fresh" for v in values) else "stale",
            "method": f"median of {len(values)} market(s): coin USD price / coin {coin} price",
        }
    return out


def dumps(doc: Any) -> str:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True, default=str)


# --- Amounts ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rounding:
    kind: str  # decimal_places or significant_digits
    digits: int

    def apply(self, value: Decimal) -> tuple[Decimal, Decimal]:
        """The rounded value and the unit it was rounded to (half a unit is the largest rounding error)."""
        if self.kind == "decimal_places":
            unit = Decimal(1).scaleb(-self.digits)
            return value.quantize(unit, rounding=ROUND_HALF_EVEN, context=CALC), unit
        rounded = significant(value, self.digits)
        unit = Decimal(1).scaleb(value.adjusted() - (self.digits - 1)) if value != 0 else Decimal(0)
        return rounded, unit

    def describe(self, unit: Decimal) -> dict[str, Any]:
        return {"mode": "ROUND_HALF_EVEN", "kind": self.kind, "digits": self.digits, "unit": plain(unit)}


def rounding_for(currency: str, kind: str, precision: int | None) -> Rounding:
    """Fiat: its ISO 4217 minor units (JPY 0, USD 2, KWD 3); crypto and stablecoins: 10 significant digits.
    ``precision`` replaces the default: decimal places for fiat, significant digits otherwise."""
    if kind == "fiat":
        return Rounding("decimal_places", ISO_MINOR_UNITS.get(currency, 2) if precision is None else precision)
    return Rounding("significant_digits", CRYPTO_SIGNIFICANT_DIGITS if precision is None else max(precision, 1))
