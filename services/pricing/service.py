"""Pricing: stores ticks, keeps each source's latest quote, and republishes consolidated prices.

The method itself is in consolidation.py."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import structlog
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.pricing import repository
from services.pricing.consolidation import USD_STABLECOINS, consolidate_all
from services.pricing.history.service import record_consolidated
from shared.db import transaction
from shared.hmac_sign import pack_signed, unpack_signed
from shared.messages import TickMessage, price_event
from shared.settings import Settings
from shared.streams import PRICES_STREAM, StreamPublisher

log = structlog.get_logger("pricing")

FIAT_RATES_TTL_SECONDS = 60.0


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
        self._fiat: dict[str, Decimal] | None = None
        self._fiat_at = 0.0

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
        """Re-evaluate freshness without new ticks (a silent source ages out); announces what changed."""
        wanted = set(bases)
        async with transaction(self.sessions) as session:
            before = {(p.base, p.vs): p.status for p in await repository.prices_of(session, wanted)}
            payloads = await self._reconsolidate(session, wanted, datetime.now(UTC))
        changed = [p for p in payloads if before.get((p["base"], p["vs"])) != p["status"]]
        await self._announce(changed)
        return changed

    async def _reconsolidate(self, session: AsyncSession, bases: set[str], now: datetime) -> list[dict[str, Any]]:
        rows = await repository.load_quotes(session, bases)
        stable_rates = await repository.stablecoin_usd_rates(session, USD_STABLECOINS)
        fiat = await self._fiat_rates(session)
        results = consolidate_all(rows, now, self.settings, stable_rates=stable_rates, fiat_per_eur=fiat)
        statuses = {(q.source, q.base, q.quote): q.status for c in results for q in c.quotes}
        await repository.set_quote_statuses(session, statuses)
        await repository.upsert_prices(session, [c.row() for c in results])
        await record_consolidated(session, results)  # 1-minute candles, in the same transaction
        return [c.payload() for c in results]

    async def _fiat_rates(self, session: AsyncSession) -> dict[str, Decimal]:
        # ECB publishes once a working day: a minute-old copy is as good as a fresh read.
        now = time.monotonic()
        if self._fiat is None or now - self._fiat_at > FIAT_RATES_TTL_SECONDS:
            self._fiat = await repository.latest_fiat_rates(session)
            self._fiat_at = now
        return self._fiat

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
            wanted = set(missing)
            rebuilt = [price_event(r) for r in rows if (r.base, r.vs) in wanted]
            await self.cache.put(rebuilt)
            found.update({(p["base"], p["vs"]): p for p in rebuilt})
        return found
