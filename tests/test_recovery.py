"""The core survives its stores going away: a Redis restart under replayed traffic, a publish that fails after
commit, a task that crashes, a consumer that stalls, a price read long after it was computed."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, Request
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy import text

from services.ingest.app import create_app as ingest_app
from services.pricing.app import create_app as pricing_app
from services.pricing.consumers import tick_consumer
from services.pricing.repository import upsert_prices
from services.pricing.service import PriceCache, PricingService
from shared.db import transaction
from shared.embedded import EmbeddedRedis
from shared.server_versions import UnsupportedServerError, check_versions, ensure_supported_servers
from shared.service_app import build_service_app
from shared.streams import PRICES_STREAM, TICKS_STREAM, StoreUnavailable, StreamConsumer, StreamPublisher
from shared.supervisor import Supervisor
from tests.conftest import eventually, free_port, make_settings, serve_app
from tests.replay import ReplayServer, serve_binance
from tests.test_streams import recorded_ticks

TICKER = "/api/v3/ticker/24hr"


def shifted_tickers(fixtures: Path, seconds: int, factor: str) -> bytes:
    """The recorded 24h tickers, as if recorded ``seconds`` later with every BTC price scaled by ``factor``."""
    rows = json.loads((fixtures / "binance" / "rec_api_v1_ticker_24hr_ALL_2019-08-22.json").read_text())
    for row in rows:
        row["closeTime"] = int(row["closeTime"]) + seconds * 1000
        if row["symbol"] == "BTCUSDT":
            for name in ("lastPrice", "bidPrice", "askPrice"):
                row[name] = str(Decimal(row[name]) * Decimal(factor))
    return json.dumps(rows).encode()


@pytest.fixture
async def own_redis(tmp_path) -> Any:
    """A Redis server of this test alone, so it can be stopped and started without touching other tests."""
    server = EmbeddedRedis(tmp_path / "redis")
    server.start(preferred_port=free_port())
    try:
        yield server
    finally:
        server.stop()


async def test_ticks_flow_again_after_a_redis_restart_without_restarting_any_service(
    own_redis, exchange_fixtures, replay: ReplayServer, clean_db, namespace, db, monkeypatch
):
    serve_binance(replay, exchange_fixtures)
    monkeypatch.setenv("COINLYTICS_SOURCE_BINANCE_REST_URL", replay.base_url)
    settings = make_settings(
        clean_db, own_redis.url(), namespace, sources=["binance"], coins=["BTC"], stream_claim_idle_ms=1000
    )
    direct = Redis.from_url(own_redis.url())
    pricing = pricing_app(settings)
    ingest = ingest_app(settings)
    async with (
        serve_app(pricing) as pricing_url,
        serve_app(ingest) as ingest_url,
        httpx.AsyncClient(timeout=10) as client,
    ):

        async def btc_usd() -> dict[str, Any] | None:
            response = await client.get(f"{pricing_url}/api/v1/prices", params={"symbols": "BTC", "vs": "USD"})
            return response.json()["BTC"]["USD"] if response.status_code == 200 and response.json() else None

        before = await eventually(btc_usd, timeout=20)

        # Entries delivered but not yet acknowledged when Redis goes may legitimately come round again.
        in_flight = (await direct.xpending(f"{namespace}:stream:ticks", "pricing"))["pending"]
        port = own_redis.port
        own_redis.stop()
        # While Redis is down: prices are served from PostgreSQL, nothing answers 500.
        during = await client.get(f"{pricing_url}/api/v1/prices", params={"symbols": "BTC", "vs": "USD"})
        assert during.status_code == 200, during.text
        assert during.json()["BTC"]["USD"]["price"] == before["price"]
        ready = await client.get(f"{pricing_url}/readyz")
        assert ready.status_code == 503
        assert "redis" in ready.json()["error"]["details"]
        ingest_ready = await client.get(f"{ingest_url}/readyz")
        assert ingest_ready.status_code == 503
        # Quotes move while Redis is away; ingest holds what it cannot publish.
        held = shifted_tickers(exchange_fixtures, 60, "1.01")
        held_price = Decimal(next(r for r in json.loads(held) if r["symbol"] == "BTCUSDT")["lastPrice"])
        replay.serve(TICKER, held)

        async def holding() -> bool:
            runner = ingest.state.ingest.runners[0]
            return any(t["base"] == "BTC" and Decimal(t["price"]) == held_price for t in runner.ticks.held)

        await eventually(holding, timeout=20)

        own_redis.start(preferred_port=port)
        assert own_redis.port == port, "Redis came back on another port; the services would not find it"
        after = shifted_tickers(exchange_fixtures, 120, "1.02")
        replay.serve(TICKER, after)
        expected = Decimal(next(r for r in json.loads(after) if r["symbol"] == "BTCUSDT")["lastPrice"])

        async def moved() -> dict[str, Any] | None:
            now = await btc_usd()
            return now if now and Decimal(str(now["price"])) == expected else None

        await eventually(moved, timeout=30)

        async def all_ready() -> bool:
            answers = [await client.get(f"{url}/readyz") for url in (pricing_url, ingest_url)]
            return all(a.status_code == 200 for a in answers)

        await eventually(all_ready, timeout=30)

    # The quotes polled while Redis was away were held and arrived once it was back.
    assert (
        await db.fetchval(
            "SELECT count(*) FROM ticks WHERE source = 'binance' AND base = 'BTC' AND quote = 'USDT' AND price = $1",
            held_price,
        )
        == 1
    )
    # Nothing consumed twice: each stream entry was handled once (apart from those in flight at the outage),
    # every tick on the stream is stored, every price event was published once.
    entries = await direct.xrange(f"{namespace}:stream:ticks")
    processed = pricing.state.tick_consumer.processed
    assert len(entries) <= processed <= len(entries) + in_flight
    stream_ticks = [json.loads(f[b"data"])["tick_id"] for _i, f in entries]
    stored = [r["tick_id"] for r in await db.fetch("SELECT tick_id FROM ticks")]
    assert set(stream_ticks) <= set(stored)
    events = [json.loads(f[b"data"])["event_id"] for _i, f in await direct.xrange(f"{namespace}:stream:prices")]
    assert events and max(Counter(events).values()) == 1
    summary = await direct.xpending(f"{namespace}:stream:ticks", "pricing")
    assert summary["pending"] == 0
    await direct.aclose()


async def test_a_request_that_needs_redis_while_it_is_down_gets_a_503_with_retry_after(own_redis, clean_db, namespace):
    router = APIRouter()

    @router.get("/needs-redis")
    async def needs_redis(request: Request) -> dict[str, Any]:
        return {"value": await request.app.state.resources.redis.get("k")}

    settings = make_settings(clean_db, own_redis.url(), namespace)
    app = build_service_app("pricing", settings, title="t", description="t", routers=[router])
    async with serve_app(app) as url, httpx.AsyncClient(base_url=url) as client:
        assert (await client.get("/needs-redis")).status_code == 200
        own_redis.stop()
        response = await client.get("/needs-redis")
        assert response.status_code == 503
        assert response.headers["retry-after"] == "5"
        assert response.json()["error"]["code"] == "service_unavailable"


class FailingOnce(StreamPublisher):
    """The real publisher, except that the first relay of price events dies with the connection."""

    failures = 1

    async def publish_once(self, stream: str, events: Any, ttl: int) -> int:
        if stream == PRICES_STREAM and self.failures:
            self.failures -= 1
            raise RedisConnectionError("connection lost after commit")
        return await super().publish_once(stream, events, ttl)


async def test_a_price_event_whose_publish_fails_after_commit_arrives_exactly_once(
    settings, redis, sessions, exchange_fixtures, db
):
    publisher = FailingOnce(redis, namespace=settings.redis_namespace, maxlen=settings.stream_maxlen)
    service = PricingService(settings, sessions=sessions, publisher=publisher, cache=PriceCache(redis, settings))
    ticks = recorded_ticks(exchange_fixtures)
    payloads = await service.apply_ticks(ticks)
    assert payloads, "the ticks produced price events"
    assert publisher.failures == 0
    key = publisher.stream_key(PRICES_STREAM)
    assert await redis.xlen(key) == 0
    assert await db.fetchval("SELECT count(*) FROM price_outbox") == len(payloads)
    # Redelivery of the same ticks stores nothing new and produces nothing: the outbox is what carries them.
    assert await service.apply_ticks(ticks) == []
    supervisor = Supervisor("pricing")
    supervisor.start("price-outbox", service.relay_outbox)
    try:

        async def relayed() -> bool:
            return await redis.xlen(key) >= len(payloads)

        await eventually(relayed, timeout=10)
        # Relaying again (a second process, a crash before the delete) adds nothing.
        await db.execute(
            "INSERT INTO price_outbox (event_id, payload) VALUES ($1, $2)",
            payloads[0]["event_id"],
            json.dumps(payloads[0]),
        )
        await service.relay_pending()
    finally:
        await supervisor.stop()
    events = [json.loads(f[b"data"]) for _i, f in await redis.xrange(key)]
    assert sorted(e["event_id"] for e in events) == sorted(p["event_id"] for p in payloads)
    assert {(e["base"], e["vs"]) for e in events} == {(p["base"], p["vs"]) for p in payloads}
    assert await db.fetchval("SELECT count(*) FROM price_outbox") == 0


async def test_a_fresh_price_read_after_its_quorum_expired_says_stale(settings, redis, sessions, exchange_fixtures):
    short = settings.model_copy(
        update={"source_max_age_rest_seconds": 120, "source_max_age_ws_seconds": 30, "min_fresh_sources": 1}
    )
    service = PricingService(
        short, sessions=sessions, publisher=_publisher(redis, short), cache=PriceCache(redis, short)
    )
    await service.apply_ticks(recorded_ticks(exchange_fixtures))
    fresh = await service.read_prices(["BTC"], ["USD"])
    assert fresh[("BTC", "USD")]["status"] == "fresh"
    assert fresh[("BTC", "USD")]["fresh_until"]
    # The same entries, read as if three minutes had passed with no tick and no refresh (PostgreSQL down).
    later = datetime.now(UTC) + timedelta(minutes=3)

    class Later(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> datetime:
            return later

    import services.pricing.service as pricing_service

    original = pricing_service.datetime
    pricing_service.datetime = Later  # type: ignore[misc]
    try:
        cached = await service.read_prices(["BTC"], ["USD"])
    finally:
        pricing_service.datetime = original  # type: ignore[misc]
    assert cached[("BTC", "USD")]["status"] == "stale"
    assert cached[("BTC", "USD")]["price"] == fresh[("BTC", "USD")]["price"]


async def test_an_older_consolidation_never_overwrites_a_newer_price(settings, sessions, db):
    newer = datetime.now(UTC)
    row = {
        "base": "BTC", "vs": "USD", "price": Decimal("100"), "volume_24h": None, "status": "fresh",
        "sources_used": 3, "sources_total": 3, "method": "test", "last_updated": newer, "fresh_until": newer,
    }  # fmt: skip
    async with transaction(sessions) as session:
        assert await upsert_prices(session, [row]) == {("BTC", "USD")}
    async with transaction(sessions) as session:
        older = {**row, "price": Decimal("90"), "last_updated": newer - timedelta(seconds=5)}
        assert await upsert_prices(session, [older]) == set()
    assert await db.fetchval("SELECT price FROM prices WHERE base='BTC' AND vs='USD'") == Decimal("100")


async def test_a_cached_price_copied_under_another_coin_does_not_verify(settings, redis, sessions, exchange_fixtures):
    cache = PriceCache(redis, settings)
    service = PricingService(settings, sessions=sessions, publisher=_publisher(redis, settings), cache=cache)
    await service.apply_ticks(recorded_ticks(exchange_fixtures))
    eth = await redis.hget(settings.key("price", "ETH"), "USD")
    assert eth is not None
    await redis.hset(settings.key("price", "BTC"), "USD", eth)
    assert await cache.get([("BTC", "USD")]) == {}
    # Rebuilt from PostgreSQL: the real BTC price, not ETH's.
    found = await service.read_prices(["BTC", "ETH"], ["USD"])
    assert found[("BTC", "USD")]["price"] != found[("ETH", "USD")]["price"]
    assert found[("BTC", "USD")]["base"] == "BTC"


def _publisher(redis: Redis, settings: Any) -> StreamPublisher:
    return StreamPublisher(redis, namespace=settings.redis_namespace, maxlen=settings.stream_maxlen)


async def test_a_crashing_task_is_restarted_and_readiness_says_why_while_it_is_down(settings):
    runs: list[int] = []

    async def flaky(stop: asyncio.Event) -> None:
        runs.append(1)
        if len(runs) < 3:
            raise RuntimeError(f"boom {len(runs)}")
        await stop.wait()

    async def crashing_for_good(stop: asyncio.Event) -> None:
        raise ValueError("never works")

    cancelled_inside: list[int] = []

    async def cancelled_by_a_library(stop: asyncio.Event) -> None:
        cancelled_inside.append(1)
        if len(cancelled_inside) == 1:
            raise asyncio.CancelledError("a library gave up")  # not the supervisor cancelling it
        await stop.wait()

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: Any, resources: Any) -> Any:
        resources.supervisor.initial_backoff = 0.05
        resources.supervisor.start("flaky", flaky)
        resources.supervisor.start("broken", crashing_for_good)
        resources.supervisor.start("cancelled", cancelled_by_a_library)
        yield

    app = build_service_app("pricing", settings, title="t", description="t", routers=[], lifespan=lifespan)
    async with serve_app(app) as url, httpx.AsyncClient(base_url=url) as client:
        await eventually(lambda: _true(len(runs) >= 3), timeout=10)

        async def reported() -> dict[str, Any] | None:
            response = await client.get("/readyz")
            body = response.json()
            return body if response.status_code == 503 and "broken" in body["error"]["details"]["problems"] else None

        body = await reported() or await eventually(reported, timeout=5)
        problems = body["error"]["details"]["problems"]
        assert "ValueError: never works" in problems["broken"]
        assert "flaky" not in problems
        tasks = {t["name"]: t for t in body["error"]["details"]["tasks"]}
        assert tasks["flaky"]["state"] == "running" and tasks["flaky"]["restarts"] == 2
        assert tasks["broken"]["restarts"] >= 1
        assert tasks["cancelled"]["state"] == "running" and tasks["cancelled"]["restarts"] == 1
        # What a load balancer asks: serving needs PostgreSQL, not every background task.
        traffic = await client.get("/readyz", params={"scope": "traffic"})
        assert traffic.status_code == 200 and traffic.json()["checks"] == {"postgres": "ok"}
        metrics = (await client.get("/metrics")).text
        assert 'supervised_task_restarts_total{task="flaky"} 2.0' in metrics


async def _true(value: bool) -> bool:
    return value


async def test_a_consumer_group_whose_pending_entries_do_not_move_is_reported_stalled(settings, redis):
    async def never(_message: Any) -> None:
        raise RuntimeError("handler keeps failing")

    consumer = StreamConsumer(
        redis, namespace=settings.redis_namespace, stream=TICKS_STREAM, group="g", consumer="c",
        handle_one=never, claim_idle_ms=60_000, stall_seconds=0.3, max_deliveries=100,
    )  # fmt: skip
    await consumer.ensure_group()
    await _publisher(redis, settings).publish(TICKS_STREAM, {"x": 1})
    await consumer.step()
    assert await consumer.stall_reason() is None  # first sight of the pending head
    await asyncio.sleep(0.4)
    await consumer.step()
    reason = await consumer.stall_reason()
    assert reason is not None and "has not moved" in reason


async def test_servers_older_than_the_minimum_are_refused_naming_both_versions(settings, redis, sessions):
    with pytest.raises(UnsupportedServerError) as refused:
        check_versions("14.9", "7.0.15")
    assert "PostgreSQL 14.9" in str(refused.value) and "15.0" in str(refused.value)
    with pytest.raises(UnsupportedServerError) as refused:
        check_versions("16.2", "6.0.9")
    assert "Redis 6.0.9" in str(refused.value) and "6.2" in str(refused.value)
    # The real servers of this run are supported; a higher bar refuses them with their real versions.
    engine = sessions.kw["bind"]
    versions = await ensure_supported_servers(engine, redis)
    with pytest.raises(UnsupportedServerError) as refused:
        await ensure_supported_servers(engine, redis, min_redis=(99, 0))
    assert f"Redis {versions['redis']}" in str(refused.value)


async def test_a_database_outage_does_not_spend_the_entries_delivery_budget(
    settings, redis, sessions, exchange_fixtures, db
):
    from shared.db import create_engine, session_factory

    dead = create_engine(f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere")
    broken = PricingService(
        settings,
        sessions=session_factory(dead),
        publisher=_publisher(redis, settings),
        cache=PriceCache(redis, settings),
    )
    consumer = tick_consumer(redis, settings, broken, consumer="during-outage")
    await consumer.ensure_group()
    ticks = recorded_ticks(exchange_fixtures)
    await _publisher(redis, settings).publish_many(TICKS_STREAM, [t.to_stream() for t in ticks])
    # Many more rounds than the delivery budget (5), each past the claim delay (200 ms in tests).
    for _ in range(3 * settings.stream_max_deliveries):
        with contextlib.suppress(StoreUnavailable):
            await consumer.step()
        await asyncio.sleep(settings.stream_claim_idle_ms / 1000 + 0.05)
    await dead.dispose()
    key = f"{settings.redis_namespace}:stream:ticks"
    assert await redis.xlen(f"{key}:dlq") == 0
    pending = await redis.xpending_range(key, "pricing", min="-", max="+", count=1000)
    assert len(pending) == len(ticks)
    assert max(int(p["times_delivered"]) for p in pending) <= 1
    # PostgreSQL is back (a working service): every entry is applied.
    healthy = PricingService(
        settings, sessions=sessions, publisher=_publisher(redis, settings), cache=PriceCache(redis, settings)
    )
    survivor = tick_consumer(redis, settings, healthy, consumer="after-outage")

    async def applied() -> bool:
        await survivor.step()
        return await db.fetchval("SELECT count(*) FROM ticks") == len(ticks)

    await eventually(applied, timeout=15, interval=0.1)


async def test_a_request_that_needs_an_unreachable_database_gets_a_503(server_redis_url, namespace):
    router = APIRouter()

    @router.get("/needs-db")
    async def needs_db(request: Request) -> dict[str, Any]:
        async with transaction(request.app.state.resources.sessions) as session:
            return {"value": (await session.execute(text("SELECT 1"))).scalar_one()}

    settings = make_settings(f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere", server_redis_url, namespace)
    app = build_service_app("pricing", settings, title="t", description="t", routers=[router])
    async with serve_app(app) as url, httpx.AsyncClient(base_url=url) as client:
        response = await client.get("/needs-db")
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "5"
        assert "database" in response.json()["error"]["message"]
        ready = await client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["error"]["details"]["postgres"].startswith("unavailable")
