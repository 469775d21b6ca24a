"""The consolidation method: how many sources' latest quotes become one price per coin and currency.

1. Each source gets one vote per coin and currency: its market quoted directly in that currency if it has
   one, else its most liquid stablecoin market, converted at the measured stablecoin/USD rate (parity
   only while no rate has been measured, and the method string then says so).
2. A quote is stale when it arrived longer ago than its transport's maximum age (websocket sources must
   keep talking; REST polls are slower), or when its exchange timestamp is further from its arrival than
   the allowed clock skew. Stale quotes do not vote.
3. Outliers are rejected with the median absolute deviation: a quote further than 2.5 scaled MADs from
   the median is dropped, the scale never counting below 0.25% of the median (so quotes within 0.625% of
   it are never outliers). When MAD is 0 (most quotes identical) a quote more than 10% off the median is
   dropped instead. With fewer than three quotes no rejection is possible.
4. The price is the mean of the remaining quotes weighted by their 24h base volume (equal weights when
   no volume is known), published with 15 significant digits (half-even). Fewer fresh votes than the
   quorum makes the result ``stale``.
5. Currencies with no market of their own (most fiat) are derived from the USD price through the latest
   ECB reference rates.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import ROUND_HALF_EVEN, Context, Decimal
from typing import Any

from shared.messages import price_event
from shared.models import SourceQuote
from shared.settings import Settings

USD_STABLECOINS = frozenset({"USDT", "USDC", "BUSD", "TUSD", "USDP", "DAI", "FDUSD", "PAX"})
MAD_THRESHOLD = Decimal("2.5")
MAD_SCALE = Decimal("1.4826")  # makes the MAD a consistent estimator of the standard deviation
ZERO_MAD_TOLERANCE = Decimal("0.1")
# The MAD's scale never counts below 0.25% of the median: with three venues, two nearly identical quotes
# would otherwise make an honest third one 0.1% away an "outlier".
MIN_SCALE_FRACTION = Decimal("0.0025")
PRICE_CONTEXT = Context(prec=28)
# Published prices keep 15 significant digits (half-even): far below any market's tick size.
OUTPUT_CONTEXT = Context(prec=15, rounding=ROUND_HALF_EVEN)
# Spreads are published to 6 significant digits: alert thresholds are percentages, not prices.
SPREAD_CONTEXT = Context(prec=6, rounding=ROUND_HALF_EVEN)
METHOD = "vwap-mad2.5"


@dataclass(slots=True, eq=False)
class QuoteView:
    source: str
    base: str
    quote: str
    vs: str
    pair: str
    price: Decimal  # in ``vs``
    raw_price: Decimal  # as the source quoted it, in ``quote``
    bid: Decimal | None
    ask: Decimal | None
    volume: Decimal | None
    exchange_ts: datetime
    received_at: datetime
    transport: str
    status: str = "used"


@dataclass(slots=True)
class Consolidated:
    base: str
    vs: str
    price: Decimal
    volume_24h: Decimal | None
    status: str  # fresh or stale
    sources_used: int
    sources_total: int
    method: str
    last_updated: datetime
    quotes: list[QuoteView]
    # When the quorum of fresh votes runs out if nothing new arrives: a reader after it sees "stale".
    fresh_until: datetime | None = None
    spread_pct: Decimal | None = None

    def row(self) -> dict[str, object]:
        return {
            "base": self.base,
            "vs": self.vs,
            "price": self.price,
            "volume_24h": self.volume_24h,
            "status": self.status,
            "sources_used": self.sources_used,
            "sources_total": self.sources_total,
            "method": self.method,
            "last_updated": self.last_updated,
            "fresh_until": self.fresh_until,
        }

    def payload(self) -> dict[str, Any]:
        return price_event(self)


def vs_of(quote: str) -> str:
    return "USD" if quote in USD_STABLECOINS else quote


def median(values: Sequence[Decimal]) -> Decimal:
    ordered = sorted(values)
    mid = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[mid]
    return (ordered[mid - 1] + ordered[mid]) / 2


def max_age(settings: Settings, transport: str) -> float:
    if transport == "rest":
        return settings.source_max_age_rest_seconds
    return settings.source_max_age_ws_seconds


def is_fresh(q: QuoteView, now: datetime, settings: Settings) -> bool:
    if (now - q.received_at).total_seconds() > max_age(settings, q.transport):
        return False
    skew = settings.max_clock_skew_seconds
    return not (skew > 0 and abs((q.received_at - q.exchange_ts).total_seconds()) > skew)


def consolidate(
    quotes: Sequence[QuoteView], now: datetime, settings: Settings, *, parity: bool = False
) -> Consolidated:
    """One coin in one currency from its sources' votes (see the module docstring)."""
    base, vs = quotes[0].base, quotes[0].vs
    fresh = [q for q in quotes if is_fresh(q, now, settings)]
    for q in quotes:
        q.status = "stale"
    # With no fresh vote at all the last known value is still served, marked stale.
    pool = fresh or list(quotes)
    centre = median([q.price for q in pool])
    mad = median([abs(q.price - centre) for q in pool])
    if len(pool) < 3:
        kept = list(pool)
    elif mad > 0:
        scale = max(MAD_SCALE * mad, centre * MIN_SCALE_FRACTION)
        kept = [q for q in pool if abs(q.price - centre) / scale <= MAD_THRESHOLD]
    else:
        kept = [q for q in pool if abs(q.price - centre) <= centre * ZERO_MAD_TOLERANCE]
    for q in pool:
        q.status = ("used" if q in kept else "outlier") if fresh else ("stale" if q in kept else "outlier")
    weights = [q.volume if q.volume is not None and q.volume > 0 else Decimal(0) for q in kept]
    if sum(weights) <= 0:
        weights = [Decimal(1)] * len(kept)
    weighted = sum((q.price * w for q, w in zip(kept, weights, strict=True)), Decimal(0))
    # A weighted mean lies within its inputs; clamping removes rounding residue (equal quotes give that quote).
    kept_prices = [q.price for q in kept]
    mean = PRICE_CONTEXT.divide(weighted, sum(weights, Decimal(0)))
    price = OUTPUT_CONTEXT.plus(min(max(mean, min(kept_prices)), max(kept_prices)))
    volumes = [q.volume for q in kept if q.volume is not None]
    used = len(kept) if fresh else 0
    status = "fresh" if used >= settings.min_fresh_sources else "stale"
    fresh_until = None
    if status == "fresh":
        # The k-th latest expiry of the used votes, k being the quorum: past it fewer than k are fresh.
        expiries = sorted(
            (q.received_at + timedelta(seconds=max_age(settings, q.transport)) for q in kept), reverse=True
        )
        fresh_until = expiries[settings.min_fresh_sources - 1]
    used_prices = [q.price for q in kept] if fresh else []
    spread_pct = None
    if len(used_prices) >= 2 and min(used_prices) > 0:
        low, high = min(used_prices), max(used_prices)
        spread_pct = SPREAD_CONTEXT.divide((high - low) * 100, low)
    return Consolidated(
        base=base,
        vs=vs,
        price=price,
        volume_24h=sum(volumes, Decimal(0)) if volumes else None,
        status=status,
        sources_used=used,
        sources_total=len(quotes),
        method=METHOD + (";stablecoin=parity" if parity else ""),
        last_updated=max(q.received_at for q in kept),
        quotes=list(quotes),
        fresh_until=fresh_until,
        spread_pct=spread_pct,
    )


def votes(
    rows: Iterable[SourceQuote], stable_rates: Mapping[str, Decimal]
) -> tuple[dict[tuple[str, str], list[QuoteView]], set[tuple[str, str]]]:
    """Quotes per (coin, currency), one vote per source; also the groups that assumed stablecoin parity."""
    best: dict[tuple[str, str, str], QuoteView] = {}
    parity: set[tuple[str, str]] = set()
    for r in rows:
        vs = vs_of(r.quote)
        factor = Decimal(1)
        if r.quote != vs:
            factor = stable_rates.get(r.quote, Decimal(1))
        view = QuoteView(
            source=r.source,
            base=r.base,
            quote=r.quote,
            vs=vs,
            pair=r.pair,
            price=r.price * factor,
            raw_price=r.price,
            bid=r.bid,
            ask=r.ask,
            volume=r.volume_24h,
            exchange_ts=r.exchange_ts,
            received_at=r.received_at,
            transport=r.transport,
        )
        key = (view.base, view.vs, view.source)
        current = best.get(key)
        if current is None or _rank(view) > _rank(current):
            best[key] = view
    groups: dict[tuple[str, str], list[QuoteView]] = {}
    for view in best.values():
        groups.setdefault((view.base, view.vs), []).append(view)
        if view.quote != view.vs and view.quote not in stable_rates:
            parity.add((view.base, view.vs))
    return groups, parity


def _rank(view: QuoteView) -> tuple[bool, Decimal]:
    return (view.quote == view.vs, view.volume or Decimal(0))


def derive_fiat(usd: Consolidated, vs: str, fiat_per_eur: Mapping[str, Decimal]) -> Consolidated | None:
    """``usd`` restated in fiat ``vs`` through ECB reference rates (EUR-based, so USD->vs is a cross rate)."""
    usd_per_eur = fiat_per_eur.get("USD")
    vs_per_eur = Decimal(1) if vs == "EUR" else fiat_per_eur.get(vs)
    if usd_per_eur is None or vs_per_eur is None or usd_per_eur <= 0:
        return None
    factor = PRICE_CONTEXT.divide(vs_per_eur, usd_per_eur)
    return Consolidated(
        base=usd.base,
        vs=vs,
        price=OUTPUT_CONTEXT.plus(PRICE_CONTEXT.multiply(usd.price, factor)),
        volume_24h=usd.volume_24h,
        status=usd.status,
        sources_used=usd.sources_used,
        sources_total=usd.sources_total,
        method=usd.method + ";via=USD*ECB",
        last_updated=usd.last_updated,
        quotes=[],
        fresh_until=usd.fresh_until,
        # A ratio between sources: the same in any currency it is restated in.
        spread_pct=usd.spread_pct,
    )


def consolidate_all(
    rows: Iterable[SourceQuote],
    now: datetime,
    settings: Settings,
    *,
    stable_rates: Mapping[str, Decimal],
    fiat_per_eur: Mapping[str, Decimal],
) -> list[Consolidated]:
    groups, parity = votes(rows, stable_rates)
    results: dict[tuple[str, str], Consolidated] = {}
    for key, quotes in groups.items():
        results[key] = consolidate(quotes, now, settings, parity=key in parity)
    bases = {base for base, _ in groups}
    for base in bases:
        usd = results.get((base, "USD"))
        for vs in settings.vs_currencies:
            direct = results.get((base, vs))
            if direct is not None and direct.status == "fresh":
                continue
            if usd is None or (usd.status != "fresh" and direct is not None):
                continue
            derived = derive_fiat(usd, vs, fiat_per_eur) if vs != "USD" else None
            if derived is not None:
                results[(base, vs)] = derived
    return list(results.values())
