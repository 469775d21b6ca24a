"""Pricing: stores ticks, keeps each source's latest quote, and republishes consolidated prices.

The method itself is in consolidation.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from itertools import product
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Histogram
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.pricing import repository
from services.pricing.coins.service import CoinsService
from services.pricing.consolidation import USD_STABLECOINS, consolidate_all
from services.pricing.consolidation import votes as source_votes
from services.pricing.history.service import record_consolidated
from shared.backoff import jittered_backoff
from shared.db import transaction
from shared.errors import NoFreshData, UnknownCurrency, UnknownSymbol, store_unavailable
from shared.hmac_sign import sign, verify
from shared.messages import TickMessage, effective_status, price_event, seconds_until_stale
from shared.responses import MemoHint
from shared.settings import Settings
from shared.streams import PRICES_STREAM, PoisonMessage, StreamMessage, StreamPublisher, decode_text

log = structlog.get_logger("pricing")

FIAT_RATES_TTL_SECONDS = 60.0
OUTBOX_BATCH = 1000
# The relay's own pace when nothing wakes it (a failed publish does): bounds how long a leftover waits.
OUTBOX_POLL_SECONDS = 1.0
# How long a relayed event id is remembered on the stream side. A duplicate can only come from a relay whose
# outbox delete failed to commit after its publish; the next relay runs as soon as PostgreSQL answers again,
# so minutes are plenty, and a day of markers (one key per event) would cost Redis hundreds of MB.
PUBLISHED_MARKER_TTL_SECONDS = 900
# From a websocket frame's few milliseconds to a REST poll's interval plus a slow transaction.
CONSOLIDATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class PriceCache:
    """Latest consolidated prices in Redis. Each entry is HMAC-signed over its key, field and value with the
    cache's own key, so a tampered entry, or a valid one copied under another coin or currency, is dropped."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.key_bytes = settings.purpose_key("cache")
        # Filled only while its reader runs (PriceMemo.run, started by the app): without it every read asks Redis.
        self.memo = PriceMemo(redis, settings)

    def _key(self, base: str) -> str:
        return self.settings.key("price", base)

    def _signed_part(self, base: str, vs: str, blob: bytes) -> bytes:
        return f"{self._key(base)}\n{vs}\n".encode() + blob

    async def put(self, payloads: Sequence[dict[str, Any]], *, only_missing: bool = False) -> None:
        """Store prices. ``only_missing`` is for rebuilds from PostgreSQL: the relay may have cached a newer
        price since the row was read, and a rebuild must not put the older one back over it."""
        if not payloads:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for p in payloads:
                blob = json.dumps(p, separators=(",", ":"), sort_keys=True).encode()
                signature = sign(self.key_bytes, self._signed_part(p["base"], p["vs"], blob))
                value = signature.encode() + b"." + blob
                if only_missing:
                    pipe.hsetnx(self._key(p["base"]), p["vs"], value)
                else:
                    pipe.hset(self._key(p["base"]), p["vs"], value)
            await pipe.execute()

    def _verified(self, base: str, vs: str, value: bytes) -> dict[str, Any] | None:
        signature, sep, blob = value.partition(b".")
        if not sep or not verify(self.key_bytes, self._signed_part(base, vs, blob), signature):
            return None
        try:
            payload = json.loads(blob)
        except ValueError:
            return None
        if not isinstance(payload, dict) or payload.get("base") != base or payload.get("vs") != vs:
            return None
        return payload

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
            payload = self._verified(base, vs, blob)
            if payload is None:
                log.error("price_cache_entry_invalid", base=base, vs=vs, action="discarded; rebuilt from db")
                await self.redis.hdel(self._key(base), vs)
                continue
            found[(base, vs)] = payload
        return found


# A verified cache entry is served from this process's copy for at most this long. The prices stream drops a
# copy as soon as another event for its pair is published; the bound only covers an event the reader missed
# (the stream trimmed past it while the reader lagged), so a stale copy can never outlive it.
MEMO_SECONDS = 1.0
# The reader's XREAD blocks this long when nothing is published, then reports in.
MEMO_READ_BLOCK_MS = 1000
MEMO_READ_COUNT = 500
# Copies are used only while the reader has heard from Redis within this long; otherwise every read goes to
# Redis (and on to PostgreSQL) exactly as without the copy.
MEMO_LIVE_SECONDS = 3.0

Pair = tuple[str, str]


class PriceMemo:
    """This process's copy of the price cache, so a price read costs no Redis round trip, HMAC check or JSON
    parse. It holds only payloads this process verified (read through ``PriceCache``) or produced (relayed),
    never a stream entry itself: the stream is unsigned, so an event only ever drops a copy, and a forged
    one costs a cache read, not a wrong price. Every replica reads the whole prices stream, so each answers
    for every coin whichever shard consolidates it."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.stream_key = settings.key("stream", PRICES_STREAM)
        self.copies: dict[Pair, tuple[float, dict[str, Any]]] = {}
        # Bumped on every drop; a read that started before the last drop of its pair stores what it fetched
        # only when that is the very event the drop announced (else it may be the value the drop was about).
        self._clock = 0
        self._dropped: dict[Pair, tuple[int, object]] = {}
        self._epoch_dropped = 0  # the clock at the last drop of everything
        self._heard_at: float | None = None
        self._position: str | None = None

    def live(self) -> bool:
        heard = self._heard_at
        return heard is not None and time.monotonic() - heard < MEMO_LIVE_SECONDS

    def ticket(self) -> int:
        """Taken before a cache read; ``store`` with it keeps only what no drop has overtaken since."""
        return self._clock

    def lookup(self, pairs: Sequence[Pair]) -> dict[Pair, dict[str, Any]]:
        if not self.copies or not self.live():
            return {}
        now = time.monotonic()
        found: dict[Pair, dict[str, Any]] = {}
        for pair in pairs:
            copy = self.copies.get(pair)
            if copy is not None and now - copy[0] < MEMO_SECONDS:
                # A copy: the caller sets the re-checked status on what it gets.
                found[pair] = dict(copy[1])
        return found

    def store(self, payloads: dict[Pair, dict[str, Any]], ticket: int) -> None:
        if not payloads or not self.live() or ticket < self._epoch_dropped:
            return
        now = time.monotonic()
        for pair, payload in payloads.items():
            dropped = self._dropped.get(pair)
            announced = dropped is not None and dropped[1] is not None and dropped[1] == payload.get("event_id")
            if dropped is None or dropped[0] < ticket or announced:
                self.copies[pair] = (now, dict(payload))

    def relayed(self, payloads: Sequence[dict[str, Any]]) -> None:
        """What this process just wrote to the cache (the newest per pair, in commit order)."""
        now = time.monotonic()
        self._clock += 1
        for p in payloads:
            pair = (p["base"], p["vs"])
            self._dropped[pair] = (self._clock, p.get("event_id"))
            if self.live():
                self.copies[pair] = (now, dict(p))

    def drop(self, pair: Pair | None, event_id: object = None) -> None:
        """Another event for ``pair`` was published (None: unreadable entry, drop everything). The copy of
        the very event announced stays: it is what the cache holds."""
        if pair is None:
            self.clear()
            return
        copy = self.copies.get(pair)
        if copy is not None and event_id is not None and copy[1].get("event_id") == event_id:
            return
        self._clock += 1
        self._dropped[pair] = (self._clock, event_id)
        self.copies.pop(pair, None)

    def clear(self) -> None:
        self._clock += 1
        self._epoch_dropped = self._clock
        self._dropped.clear()
        self.copies.clear()

    async def run(self, stop: asyncio.Event) -> None:
        """Supervised loop: tails the prices stream (a plain XREAD, no group: every replica sees every
        event). A Redis outage clears the copies; the reader starts again from the stream's end."""
        outages = 0
        while not stop.is_set():
            try:
                if self._position is None:
                    last = await self.redis.xrevrange(self.stream_key, count=1)
                    self._position = decode_text(last[0][0]) if last else "0-0"
                response = await self.redis.xread(
                    {self.stream_key: self._position}, count=MEMO_READ_COUNT, block=MEMO_READ_BLOCK_MS
                )
            except (RedisError, OSError) as exc:
                outages += 1
                self._heard_at, self._position = None, None
                self.clear()
                delay = jittered_backoff(outages, base=0.5, cap=10.0, jitter="equal")
                log.warning("price_memo_waiting", error=f"{type(exc).__name__}: {exc}", retry_in=round(delay, 2))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=delay)
                continue
            outages = 0
            self._apply(response)
            self._heard_at = time.monotonic()
        self._heard_at = None
        self.clear()

    def _apply(self, response: Any) -> None:
        streams: Iterable[Any] = response.items() if isinstance(response, dict) else response or []
        for _, entries in streams:
            for raw_id, fields in entries:
                self._position = decode_text(raw_id)
                self.drop(*_announced(fields))


def _announced(fields: Any) -> tuple[Pair | None, object]:
    """The pair and event id a prices-stream entry announces (None when it cannot be read)."""
    try:
        text = {decode_text(k): decode_text(v) for k, v in fields.items()}
        payload = StreamMessage(id="", fields=text).payload()
        base, vs = payload["base"], payload["vs"]
    except (PoisonMessage, KeyError, AttributeError, TypeError):
        return None, None
    if not isinstance(base, str) or not isinstance(vs, str):
        return None, None
    return (base, vs), payload.get("event_id")


class PricingService:
    def __init__(
        self,
        settings: Settings,
        *,
        sessions: async_sessionmaker[AsyncSession],
        publisher: StreamPublisher,
        cache: PriceCache,
        coins: CoinsService | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.publisher = publisher
        self.cache = cache
        # Market cap and 24h change of /api/v1/prices come from the coins overview's definitions.
        self.coins = coins or CoinsService(settings, sessions=sessions)
        self._fiat: dict[str, Decimal] | None = None
        self._fiat_at = 0.0
        # One relay at a time in this process (the database lock orders it across processes).
        self._relay_lock = asyncio.Lock()
        self._relay_wanted = asyncio.Event()
        self.relayed = 0
        self.consolidation_latency = Histogram(
            "pricing_consolidation_seconds",
            "From a tick's receipt by ingest to the consolidated price it moved reaching the prices stream",
            buckets=CONSOLIDATION_BUCKETS,
            registry=registry,
        )

    async def apply_ticks(self, ticks: Sequence[TickMessage]) -> list[dict[str, Any]]:
        """Store ticks and re-consolidate the coins they touch. Idempotent: a tick seen before is skipped.

        The resulting price events are written to the outbox in the same transaction and relayed after
        commit, so a failed publish delays an event but never loses it."""
        now = datetime.now(UTC)
        async with transaction(self.sessions) as session:
            new_ids = await repository.insert_ticks(session, ticks)
            fresh_ticks = [t for t in ticks if t.tick_id in new_ids]
            if not fresh_ticks:
                return []
            await repository.upsert_source_quotes(session, fresh_ticks)
            payloads = await self._reconsolidate(session, {t.base for t in fresh_ticks}, now)
            await self._stage(session, payloads)
        if await self._relay_after_commit() and payloads:
            self._observe_latency(fresh_ticks, {p["base"] for p in payloads})
        return payloads

    def _observe_latency(self, ticks: Sequence[TickMessage], published: set[str]) -> None:
        """One observation per tick whose coin got a published price. A price deferred to the background relay
        is not observed: its delay is the outage's, which the outbox stall check reports."""
        at = datetime.now(UTC)
        for tick in ticks:
            if tick.base in published:
                # Clipped at 0: ingest's clock may run a little ahead of ours.
                self.consolidation_latency.observe(max((at - tick.received_at).total_seconds(), 0.0))

    async def refresh(self, bases: Iterable[str]) -> list[dict[str, Any]]:
        """Re-evaluate freshness without new ticks (a silent source ages out); announces what changed."""
        wanted = set(bases)
        async with transaction(self.sessions) as session:
            before = {(p.base, p.vs): p.status for p in await repository.prices_of(session, wanted)}
            payloads = await self._reconsolidate(session, wanted, datetime.now(UTC))
            changed = [p for p in payloads if before.get((p["base"], p["vs"])) != p["status"]]
            await self._stage(session, changed)
        await self._relay_after_commit()
        return changed

    async def _reconsolidate(self, session: AsyncSession, bases: set[str], now: datetime) -> list[dict[str, Any]]:
        rows = await repository.load_quotes(session, bases)
        stable_rates = await repository.stablecoin_usd_rates(session, USD_STABLECOINS)
        fiat = await self._fiat_rates(session)
        results = consolidate_all(rows, now, self.settings, stable_rates=stable_rates, fiat_per_eur=fiat)
        statuses = {(q.source, q.base, q.quote): q.status for c in results for q in c.quotes}
        await repository.set_quote_statuses(session, statuses)
        written = await repository.upsert_prices(session, [c.row() for c in results])
        await record_consolidated(session, results)  # 1-minute candles, in the same transaction
        # A result older than the stored price was not written: it is not news either.
        return [c.payload() for c in results if (c.base, c.vs) in written]

    async def _fiat_rates(self, session: AsyncSession) -> dict[str, Decimal]:
        # ECB publishes once a working day: a minute-old copy is as good as a fresh read.
        now = time.monotonic()
        if self._fiat is None or now - self._fiat_at > FIAT_RATES_TTL_SECONDS:
            self._fiat = await repository.latest_fiat_rates(session)
            self._fiat_at = now
        return self._fiat

    async def _stage(self, session: AsyncSession, payloads: list[dict[str, Any]]) -> None:
        for payload in payloads:
            payload["event_id"] = str(uuid.uuid4())
        await repository.add_outbox(session, [(p["event_id"], p) for p in payloads])

    async def _relay_after_commit(self) -> bool:
        """Hand the committed events on at once (True); if Redis refuses, the background relay retries (False)."""
        try:
            await self.relay_pending()
        except Exception as exc:
            # Committed either way: whatever stopped the relay, the background relay retries it, and its
            # supervisor (not this consumer) hears about errors that are not a passing outage.
            log.warning("price_events_deferred", error=f"{type(exc).__name__}: {exc}", retry="outbox relay")
            self._relay_wanted.set()
            return False
        return True

    async def relay_pending(self, batch: int = OUTBOX_BATCH) -> int:
        """Publish every staged event in order (cache, then stream, each event id at most once) and remove
        it from the outbox. Returns how many were relayed."""
        relayed = 0
        async with self._relay_lock:
            while True:
                async with transaction(self.sessions) as session:
                    rows = await repository.claim_outbox(session, batch)
                    if not rows:
                        break
                    payloads = [r.payload for r in rows]
                    latest = _latest_per_pair(payloads)
                    await self.cache.put(latest)
                    self.cache.memo.relayed(latest)
                    await self.publisher.publish_once(
                        PRICES_STREAM, [(r.event_id, r.payload) for r in rows], ttl=PUBLISHED_MARKER_TTL_SECONDS
                    )
                    await repository.delete_outbox(session, [r.id for r in rows])
                relayed += len(rows)
                if len(rows) < batch:
                    break
        self.relayed += relayed
        return relayed

    async def relay_outbox(self, stop: asyncio.Event) -> None:
        """Supervised loop: relays what a failed publish left in the outbox (and what other processes left)."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._relay_wanted.wait(), timeout=OUTBOX_POLL_SECONDS)
            self._relay_wanted.clear()
            if stop.is_set():
                return
            try:
                relayed = await self.relay_pending()
            except Exception as exc:
                store = store_unavailable(exc)
                if store is None:
                    raise  # not an outage: the supervisor logs it with its traceback and restarts the relay
                log.warning("outbox_relay_waiting", store=store, error=f"{type(exc).__name__}: {exc}")
                continue
            if relayed:
                log.info("outbox_relayed", count=relayed)

    async def outbox_stall(self) -> str | None:
        """The relay's health check: events that have waited in the outbox longer than the stall limit."""
        async with transaction(self.sessions) as session:
            age = await repository.oldest_outbox_age(session)
        if age is not None and age > self.settings.stream_stall_seconds:
            return f"price events waiting in the outbox for {age:.0f}s (not reaching the prices stream)"
        return None

    async def read_prices(self, bases: Sequence[str], vs: Sequence[str]) -> dict[tuple[str, str], dict[str, Any]]:
        """Latest prices from the cache, else PostgreSQL (also while Redis is down), each with its status
        re-checked against the clock: a cached "fresh" is only as good as its ``fresh_until``."""
        pairs = [(b, v) for b in bases for v in vs]
        memo = self.cache.memo
        found = memo.lookup(pairs)
        cache_up = True
        unread = [p for p in pairs if p not in found] if found else pairs
        if unread:
            ticket = memo.ticket()
            try:
                cached = await self.cache.get(unread)
            except (RedisError, OSError) as exc:
                log.warning("price_cache_unavailable", error=f"{type(exc).__name__}: {exc}", fallback="postgres")
                cached, cache_up = {}, False
            memo.store(cached, ticket)
            found.update(cached)
        missing = [p for p in pairs if p not in found]
        if missing:
            async with transaction(self.sessions) as session:
                rows = await repository.get_prices(session, {b for b, _ in missing}, {v for _, v in missing})
            wanted = set(missing)
            rebuilt = [price_event(r) for r in rows if (r.base, r.vs) in wanted]
            if cache_up:
                with contextlib.suppress(RedisError, OSError):
                    await self.cache.put(rebuilt, only_missing=True)
            found.update({(p["base"], p["vs"]): p for p in rebuilt})
        now = datetime.now(UTC)
        for payload in found.values():
            payload["status"] = effective_status(payload, now)
        return found

    async def price_table(
        self, bases: Sequence[str], currencies: Sequence[str], extras: Sequence[str]
    ) -> tuple[dict[str, dict[str, Any]], MemoHint]:
        """The body of /api/v1/prices: coin -> currency -> price and the requested ``extras``. A coin or
        currency nobody knows is a 404; known ones with no price yet leave a gap (503 when all are gaps).
        Also how long the gateway may reuse the body: until an event for one of its pairs (gaps included),
        the first of its fresh prices turning stale, or MEMO_SECONDS."""
        found = await self.read_prices(bases, currencies)
        found_bases = {b for b, _ in found}
        found_vs = {v for _, v in found}
        missing_bases = [b for b in bases if b not in found_bases]
        missing_vs = [v for v in currencies if v not in found_vs]
        if missing_bases or missing_vs:
            async with transaction(self.sessions) as session:
                known = await repository.known_symbols(session, missing_bases) if missing_bases else set()
                known_vs = await repository.known_currencies(session) if missing_vs else set()
            unknown = [b for b in missing_bases if b not in known]
            if unknown:
                raise UnknownSymbol(f"unknown coin: {', '.join(unknown)}", details={"unknown": unknown})
            configured = set(self.settings.vs_currencies)
            unknown_vs = [v for v in missing_vs if v not in known_vs and v not in configured]
            if unknown_vs:
                raise UnknownCurrency(f"unknown currency: {', '.join(unknown_vs)}", details={"unknown": unknown_vs})
        if not found:
            raise NoFreshData(
                "no price yet for the requested coins and currencies; sources may still be starting",
                retry_after=5,
            )
        market: dict[tuple[str, str], dict[str, Decimal | None]] = {}
        if "market_cap" in extras or "change_24h" in extras:
            current = {key: Decimal(entry["price"]) for key, entry in found.items()}
            market = await self.coins.price_extras(current, extras)
        body: dict[str, dict[str, Any]] = {}
        for base in bases:
            for currency in currencies:
                entry = found.get((base, currency))
                if entry is None:
                    continue
                out: dict[str, Any] = {
                    "price": Decimal(entry["price"]),
                    "last_updated": entry["last_updated"].replace("+00:00", "Z"),
                    "status": entry["status"],
                    "sources_used": entry["sources_used"],
                }
                for extra in extras:
                    if extra in ("market_cap", "change_24h"):
                        out[extra] = market.get((base, currency), {}).get(extra)
                        continue
                    value = entry.get(extra)
                    out[extra] = Decimal(value) if value is not None else None
                body.setdefault(base, {})[currency] = out
        return body, self._memo_hint(found, bases, currencies)

    @staticmethod
    def _memo_hint(found: dict[Pair, dict[str, Any]], bases: Sequence[str], currencies: Sequence[str]) -> MemoHint:
        now = datetime.now(UTC)
        ttl = MEMO_SECONDS
        for payload in found.values():
            left = seconds_until_stale(payload, now)
            if left is not None:
                ttl = min(ttl, left)
        events = {pair: found[pair].get("event_id") if pair in found else None for pair in product(bases, currencies)}
        return MemoHint(ttl=ttl, pairs={pair: str(e) if e else None for pair, e in events.items()})

    async def source_comparison(self, base: str, currency: str) -> dict[str, Any]:
        """The body of /api/v1/prices/{symbol}/sources: each source's vote beside the consolidated price."""
        async with transaction(self.sessions) as session:
            known = await repository.known_symbols(session, [base])
            if base not in known:
                raise UnknownSymbol(f"unknown coin: {base}", details={"unknown": [base]})
            quotes = await repository.quotes_for(session, base)
            consolidated = await repository.get_price(session, base, currency)
            stable = await repository.stablecoin_usd_rates(session, USD_STABLECOINS)
        if consolidated is None and currency not in self.settings.vs_currencies:
            raise UnknownCurrency(f"unknown currency: {currency}", details={"unknown": [currency]})
        # One vote per source, chosen as consolidation chooses (direct market first, else most liquid).
        groups, _ = source_votes(quotes, stable)
        chosen = {(v.source, v.quote) for v in groups.get((base, currency), [])}
        votes = [q for q in quotes if (q.source, q.quote) in chosen]
        body: dict[str, Any] = {
            "symbol": base,
            "vs": currency,
            "consolidated": None
            if consolidated is None
            else {
                "price": consolidated.price,
                "status": consolidated.status,
                "sources_used": consolidated.sources_used,
                "sources_total": consolidated.sources_total,
                "method": consolidated.method,
                "last_updated": consolidated.last_updated,
            },
            "sources": [
                {
                    "source": q.source,
                    "pair": q.pair,
                    "quote": q.quote,
                    "price": q.price * stable.get(q.quote, Decimal(1)) if q.quote != currency else q.price,
                    "quoted_price": q.price,
                    "bid": q.bid,
                    "ask": q.ask,
                    "volume_24h": q.volume_24h,
                    "timestamp": q.exchange_ts,
                    "received_at": q.received_at,
                    "transport": q.transport,
                    "status": q.status,
                }
                for q in votes
            ],
        }
        return body


def _latest_per_pair(payloads: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Payloads are in commit order: the last one per (base, vs) is what the cache should hold.
    latest = {(p["base"], p["vs"]): p for p in payloads}
    return list(latest.values())
