"""Consolidation: many sources' latest quotes become one price per coin and currency."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Context, Decimal
from typing import Any

import structlog
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.pricing import repository
from shared.db import transaction
from shared.hmac_sign import pack_signed, unpack_signed
from shared.messages import TickMessage
from shared.models import Price, SourceQuote
from shared.settings import Settings
from shared.streams import PRICES_STREAM, StreamPublisher

log = structlog.get_logger("pricing")

# Stablecoin quotes count toward USD. Until a measured stablecoin/USD rate is stored (a tracked
# USDT/USD market), parity is assumed and the method string says so.
USD_STABLECOINS = frozenset({"USDT", "USDC", "BUSD", "TUSD", "USDP", "DAI", "FDUSD"})
MAD_THRESHOLD = Decimal("2.5")
MAD_SCALE = Decimal("1.4826")  # makes MAD a consistent estimator of the standard deviation
PRICE_CONTEXT = Context(prec=28)
METHOD = "vwap-mad2.5"


@dataclass(slots=True)
class QuoteView:
    source: str
    base: str
    quote: str
    vs: str
    price: Decimal
    volume: Decimal | None
    exchange_ts: datetime
    received_at: datetime
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
    quote_statuses: dict[tuple[str, str, str], str]

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
        }


def vs_of(quote: str) -> str:
    return "USD" if quote in USD_STABLECOINS else quote


def median(values: Sequence[Decimal]) -> Decimal:
    ordered = sorted(values)
    mid = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[mid]
    return (ordered[mid - 1] + ordered[mid]) / 2


def is_fresh(q: QuoteView, now: datetime, settings: Settings) -> bool:
    if (now - q.received_at).total_seconds() > settings.source_max_age_seconds:
        return False
    skew = settings.max_clock_skew_seconds
    return not (skew > 0 and abs((q.received_at - q.exchange_ts).total_seconds()) > skew)


def consolidate(quotes: Sequence[QuoteView], now: datetime, settings: Settings) -> Consolidated | None:
    """Volume-weighted mean of the fresh quotes left after a median-absolute-deviation outlier test.

    Below ``min_fresh_sources`` fresh quotes the result is marked ``stale`` (and, with no fresh quote at
    all, computed from the stale ones so a last known value is still served)."""
    if not quotes:
        return None
    base, vs = quotes[0].base, quotes[0].vs
    fresh = [q for q in quotes if is_fresh(q, now, settings)]
    for q in quotes:
        q.status = "used" if q in fresh else "stale"
    pool = fresh or list(quotes)
    prices = [q.price for q in pool]
    centre = median(prices)
    mad = median([abs(p - centre) for p in prices])
    if mad > 0 and len(pool) >= 3:
        kept = [q for q in pool if abs(q.price - centre) / (MAD_SCALE * mad) <= MAD_THRESHOLD]
    elif len(pool) >= 3:
        # MAD is 0 when most quotes agree exactly: anything off that common value by >10% is an outlier.
        kept = [q for q in pool if abs(q.price - centre) <= centre / 10]
    else:
        kept = pool
    for q in pool:
        if q not in kept:
            q.status = "outlier"
    weights = [q.volume if q.volume is not None and q.volume > 0 else Decimal(0) for q in kept]
    if sum(weights) <= 0:
        weights = [Decimal(1)] * len(kept)
    total = sum(weights, Decimal(0))
    price = PRICE_CONTEXT.divide(sum((q.price * w for q, w in zip(kept, weights, strict=True)), Decimal(0)), total)
    volumes = [q.volume for q in kept if q.volume is not None]
    used = len(kept) if fresh else 0
    status = "fresh" if used >= settings.min_fresh_sources else "stale"
    method = METHOD + (";stablecoin=parity" if any(q.quote in USD_STABLECOINS for q in kept) else "")
    return Consolidated(
        base=base,
        vs=vs,
        price=price,
        volume_24h=sum(volumes, Decimal(0)) if volumes else None,
        status=status,
        sources_used=used,
        sources_total=len(quotes),
        method=method,
        last_updated=max(q.received_at for q in kept),
        quote_statuses={(q.source, q.base, q.quote): q.status for q in quotes},
    )


def group_quotes(rows: Iterable[SourceQuote]) -> dict[tuple[str, str], list[QuoteView]]:
    """Quotes per (coin, currency), one per source: a source quoting BTC against USD, USDT and USDC
    gets one vote, its direct fiat market if it has one, else its most liquid stablecoin market."""
    best: dict[tuple[str, str, str], QuoteView] = {}
    for r in rows:
        view = QuoteView(
            source=r.source,
            base=r.base,
            quote=r.quote,
            vs=vs_of(r.quote),
            price=r.price,
            volume=r.volume_24h,
            exchange_ts=r.exchange_ts,
            received_at=r.received_at,
        )
        key = (view.base, view.vs, view.source)
        current = best.get(key)
        if current is None or _rank(view) > _rank(current):
            if current is not None:
                current.status = "unused"
            best[key] = view
    groups: dict[tuple[str, str], list[QuoteView]] = {}
    for view in best.values():
        groups.setdefault((view.base, view.vs), []).append(view)
    return groups


def _rank(view: QuoteView) -> tuple[bool, Decimal]:
    return (view.quote == view.vs, view.volume or Decimal(0))


def price_payload(row: Price | Consolidated) -> dict[str, Any]:
    return {
        "base": row.base,
        "vs": row.vs,
        "price": str(row.price),
        "volume_24h": None if row.volume_24h is None else str(row.volume_24h),
        "status": row.status,
        "sources_used": row.sources_used,
        "sources_total": row.sources_total,
        "method": row.method,
        "last_updated": row.last_updated.astimezone(UTC).isoformat(),
    }


class PriceCache:
    """Latest consolidated prices in Redis, each entry HMAC-signed; a tampered entry is dropped."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.key_bytes = settings.hmac_key_bytes()

    def _key(self, base: str) -> str:
        return self.settings.key("price", base)

    async def put(self, payloads: Sequence[dict[str, Any]]) -> None:
        if not payloads:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for p in payloads:
                blob = json.dumps(p, separators=(",", ":"), sort_keys=True).encode()
                pipe.hset(self._key(p["base"]), p["vs"], pack_signed(self.key_bytes, blob))
            await pipe.execute()

    async def get(self, pairs: Sequence[tuple[str, str]]) -> dict[tuple[str, str], dict[str, Any]]:
        if not pairs:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for base, vs in pairs:
                pipe.hget(self._key(base), vs)
            blobs = await pipe.execute()
        found: dict[tuple[str, str], dict[str, Any]] = {}
        for (base, vs), blob in zip(pairs, blobs, strict=True):
            if blob is None:
                continue
            payload = unpack_signed(self.key_bytes, blob)
            if payload is None:
                log.error("price_cache_signature_invalid", base=base, vs=vs, action="discarded; rebuilt from db")
                await self.redis.hdel(self._key(base), vs)
                continue
            try:
                found[(base, vs)] = json.loads(payload)
            except ValueError:
                await self.redis.hdel(self._key(base), vs)
        return found


class PricingService:
    def __init__(
        self,
        settings: Settings,
        *,
        sessions: async_sessionmaker[AsyncSession],
        publisher: StreamPublisher,
        cache: PriceCache,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.publisher = publisher
        self.cache = cache

    async def apply_ticks(self, ticks: Sequence[TickMessage]) -> list[dict[str, Any]]:
        """Store ticks and re-consolidate the coins they touch. Idempotent: a tick seen before is skipped."""
        now = datetime.now(UTC)
        async with transaction(self.sessions) as session:
            new_ids = await repository.insert_ticks(session, ticks)
            fresh_ticks = [t for t in ticks if t.tick_id in new_ids]
            if not fresh_ticks:
                return []
            await repository.upsert_source_quotes(session, fresh_ticks)
            payloads = await self._reconsolidate(session, {t.base for t in fresh_ticks}, now)
        # Only after commit: readers and subscribers must never see what the database does not hold.
        await self._announce(payloads)
        return payloads

    async def refresh(self, bases: Iterable[str]) -> list[dict[str, Any]]:
        """Re-evaluate freshness without new ticks (a silent source ages out)."""
        async with transaction(self.sessions) as session:
            payloads = await self._reconsolidate(session, set(bases), datetime.now(UTC))
        await self._announce(payloads)
        return payloads

    async def _reconsolidate(self, session: AsyncSession, bases: set[str], now: datetime) -> list[dict[str, Any]]:
        rows = await repository.load_quotes(session, bases)
        results = [c for quotes in group_quotes(rows).values() if (c := consolidate(quotes, now, self.settings))]
        statuses: dict[tuple[str, str, str], str] = {}
        for c in results:
            statuses.update(c.quote_statuses)
        await repository.set_quote_statuses(session, statuses)
        await repository.upsert_prices(session, [c.row() for c in results])
        return [price_payload(c) for c in results]

    async def _announce(self, payloads: list[dict[str, Any]]) -> None:
        if not payloads:
            return
        await self.cache.put(payloads)
        await self.publisher.publish_many(PRICES_STREAM, payloads)

    async def read_prices(self, bases: Sequence[str], vs: Sequence[str]) -> dict[tuple[str, str], dict[str, Any]]:
        pairs = [(b, v) for b in bases for v in vs]
        found = await self.cache.get(pairs)
        missing = [p for p in pairs if p not in found]
        if missing:
            async with transaction(self.sessions) as session:
                rows = await repository.get_prices(session, {b for b, _ in missing}, {v for _, v in missing})
            rebuilt = [price_payload(r) for r in rows if (r.base, r.vs) in set(missing)]
            await self.cache.put(rebuilt)
            found.update({(p["base"], p["vs"]): p for p in rebuilt})
        return found
