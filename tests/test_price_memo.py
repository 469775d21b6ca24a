"""Pricing's in-process copy of the price cache (services/pricing/service.py PriceMemo), against real
PostgreSQL and Redis: two pricing processes share the stores, one consolidates, the other answers reads
from its copy, which the prices stream keeps current and which never takes a price from the stream itself."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from services.pricing import service as pricing_service
from services.pricing.service import PriceCache, PricingService
from shared.db import create_engine, session_factory
from shared.streams import PRICES_STREAM, StreamPublisher, encode
from tests.conftest import eventually
from tests.test_consolidation import recorded_btc_usd, tick


@pytest.fixture
async def replicas(settings, redis) -> AsyncIterator[tuple[PricingService, PricingService]]:
    """Two pricing services on the same stores, each with its memo reader running."""
    engines, services = [], []
    for _ in range(2):
        engine = create_engine(settings.database_url)
        engines.append(engine)
        services.append(
            PricingService(
                settings,
                sessions=session_factory(engine),
                publisher=StreamPublisher(redis, namespace=settings.redis_namespace, maxlen=10_000),
                cache=PriceCache(redis, settings),
            )
        )
    stop = asyncio.Event()
    readers = [asyncio.create_task(s.cache.memo.run(stop)) for s in services]
    await eventually(lambda: _all_live(services))
    try:
        yield services[0], services[1]
    finally:
        stop.set()
        for reader in readers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(reader, timeout=5)
        for engine in engines:
            await engine.dispose()


async def _all_live(services: list[PricingService]) -> bool:
    return all(s.cache.memo.live() for s in services)


def _ticks(quotes: dict[str, tuple[Decimal, Decimal]], factor: Decimal = Decimal(1)) -> list:
    return [tick(name, p * factor, v) for name, (p, v) in quotes.items()]


async def test_a_replica_answers_from_its_copy_and_the_stream_replaces_it(
    replicas, exchange_fixtures, monkeypatch
) -> None:
    # Copies never expire on their own here: only the stream can make the reader see the new price.
    monkeypatch.setattr(pricing_service, "MEMO_SECONDS", 3600.0)
    owner, reader = replicas
    quotes = recorded_btc_usd(exchange_fixtures)
    first = {p["price"] for p in await owner.apply_ticks(_ticks(quotes)) if p["vs"] == "USD"}
    assert len(first) == 1
    assert (await reader.read_prices(["BTC"], ["USD"]))[("BTC", "USD")]["price"] in first
    assert ("BTC", "USD") in reader.cache.memo.copies  # the next read costs no Redis round trip

    moved = {p["price"] for p in await owner.apply_ticks(_ticks(quotes, Decimal("1.01"))) if p["vs"] == "USD"}
    assert moved and moved != first

    async def reader_sees_the_new_price() -> bool:
        return (await reader.read_prices(["BTC"], ["USD"]))[("BTC", "USD")]["price"] in moved

    await eventually(reader_sees_the_new_price)
    # The owner's own copy came from its relay, not a cache read.
    assert owner.cache.memo.copies[("BTC", "USD")][1]["price"] in moved


async def test_a_forged_stream_entry_only_drops_the_copy(replicas, redis, exchange_fixtures, monkeypatch) -> None:
    monkeypatch.setattr(pricing_service, "MEMO_SECONDS", 3600.0)
    owner, reader = replicas
    quotes = recorded_btc_usd(exchange_fixtures)
    await owner.apply_ticks(_ticks(quotes))
    true_price = (await reader.read_prices(["BTC"], ["USD"]))[("BTC", "USD")]["price"]
    assert ("BTC", "USD") in reader.cache.memo.copies
    forged = {"base": "BTC", "vs": "USD", "price": "1", "status": "fresh", "event_id": "forged",
              "last_updated": datetime.now(UTC).isoformat(), "sources_used": 9,
              "fresh_until": (datetime.now(UTC) + timedelta(hours=1)).isoformat()}  # fmt: skip
    await redis.xadd(owner.settings.key("stream", PRICES_STREAM), encode(forged))
    await redis.xadd(owner.settings.key("stream", PRICES_STREAM), {"data": "not json"})

    async def copy_dropped() -> bool:
        return ("BTC", "USD") not in reader.cache.memo.copies

    await eventually(copy_dropped)
    found = await reader.read_prices(["BTC"], ["USD"])
    assert found[("BTC", "USD")]["price"] == true_price
    assert reader.cache.memo.copies[("BTC", "USD")][1]["price"] == true_price


async def test_a_copy_is_re_checked_against_the_clock(replicas, redis, exchange_fixtures) -> None:
    owner, _ = replicas
    await owner.apply_ticks(_ticks(recorded_btc_usd(exchange_fixtures)))
    assert (await owner.read_prices(["BTC"], ["USD"]))[("BTC", "USD")]["status"] == "fresh"
    # The copy says fresh, but its quorum expired a second ago: the read says stale, as a cache read would.
    _, payload = owner.cache.memo.copies[("BTC", "USD")]
    assert payload["status"] == "fresh"
    payload["fresh_until"] = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    assert (await owner.read_prices(["BTC"], ["USD"]))[("BTC", "USD")]["status"] == "stale"
    # And the copy handed out is not the stored one: the status set on it did not leak back.
    assert owner.cache.memo.copies[("BTC", "USD")][1]["status"] == "fresh"


async def test_without_its_reader_the_memo_is_not_used(settings, redis, exchange_fixtures) -> None:
    engine = create_engine(settings.database_url)
    try:
        service = PricingService(
            settings,
            sessions=session_factory(engine),
            publisher=StreamPublisher(redis, namespace=settings.redis_namespace, maxlen=10_000),
            cache=PriceCache(redis, settings),
        )
        await service.apply_ticks(_ticks(recorded_btc_usd(exchange_fixtures)))
        await service.read_prices(["BTC"], ["USD"])
        assert service.cache.memo.copies == {}
        # A tampered cache entry is still caught on every read.
        key = settings.key("price", "BTC")
        signature, _, blob = (await redis.hget(key, "USD")).partition(b".")
        forged = json.loads(blob)
        forged["price"] = "1"
        await redis.hset(key, "USD", signature + b"." + json.dumps(forged, sort_keys=True).encode())
        assert (await service.read_prices(["BTC"], ["USD"]))[("BTC", "USD")]["price"] != "1"
    finally:
        await engine.dispose()
