"""Pricing sharded by coin: the hash that assigns coins, the settings that name a replica's shard, and two
pricing replicas on replayed recorded traffic (Binance's and KuCoin's recorded tickers, fetched through the
real ingest adapters) against one replica on the same traffic, and a stopped replica whose ticks wait for it."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis

from services.ingest.publishing import TickPublisher
from services.ingest.rest import CcxtRestSource
from services.pricing.app import create_app as pricing_app
from services.pricing.consumers import GROUP
from shared.messages import TickMessage
from shared.settings import ConfigurationError, Settings, load_settings
from shared.sharding import hostname_ordinal, owned, shard_of, ticks_stream, ticks_streams
from shared.streams import StreamPublisher
from tests.conftest import ROOT, eventually, make_settings, serve_app
from tests.replay import ReplayServer

# Coins both recordings quote against USDT: two sources per coin, so consolidation has votes to weigh.
COINS = ["BTC", "ETH", "LTC", "XRP", "EOS", "ETC", "NEO", "TRX", "XLM", "VET"]
ROUNDS = 4
ROUTES = {
    "binance": {
        "/api/v3/exchangeInfo": "binance/rec_api_v3_exchangeInfo_FULL_2021-10-12.json",
        "/api/v3/ticker/24hr": "binance/rec_api_v1_ticker_24hr_ALL_2019-08-22.json",
    },
    "kucoin": {
        "/api/v1/symbols": "kucoin/rec_api_v1_symbols_2021-04-25.json",
        "/api/v1/market/allTickers": "kucoin/rec_api_v1_market_allTickers_2019-02-21.json",
    },
}


# --- (a) the hash ----------------------------------------------------------------------------------------


def test_shard_of_is_blake2b_of_the_upper_cased_symbol():
    for symbol in ("btc", "BTC", "Eth", "DOGE", "A", "USDT0"):
        digest = hashlib.blake2b(symbol.upper().encode(), digest_size=8).digest()
        for shards in (2, 3, 7, 16):
            assert shard_of(symbol, shards) == int.from_bytes(digest, "big") % shards
    assert shard_of("btc", 5) == shard_of("BTC", 5)
    assert all(shard_of(s, 1) == 0 for s in COINS)
    with pytest.raises(ValueError):
        shard_of("BTC", 0)


def test_shard_of_is_the_same_in_another_process():
    """Python's own hash() is salted per process; the shard must not be, or ingest and pricing would disagree."""
    script = f"from shared.sharding import shard_of; print([shard_of(c, 4) for c in {COINS!r}])"
    seen = set()
    for seed in ("1", "2", "random"):
        out = subprocess.run(
            [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        )  # fmt: skip
        seen.add(out.stdout.strip())
    assert seen == {str([shard_of(c, 4) for c in COINS])}


@pytest.mark.parametrize("shards", [2, 3, 4, 8])
def test_shard_of_spreads_symbols_evenly(shards):
    symbols = [f"C{i}X" for i in range(4000)]
    counts = Counter(shard_of(s, shards) for s in symbols)
    expected = len(symbols) / shards
    assert set(counts) == set(range(shards))
    assert all(abs(n - expected) < expected * 0.1 for n in counts.values()), counts
    # Every symbol in exactly one shard.
    assert sum(len(owned(symbols, i, shards)) for i in range(shards)) == len(symbols)


def test_stream_names():
    assert ticks_streams(1) == ["ticks"]
    assert ticks_streams(3) == ["ticks.0", "ticks.1", "ticks.2"]
    with pytest.raises(ValueError):
        ticks_stream(2, 2)


# --- (d) settings ----------------------------------------------------------------------------------------


def _settings(**values: Any) -> Settings:
    return load_settings(env="development", **values)


def test_shard_index_from_a_number_or_the_hostname():
    assert _settings().shard_index(1) == 0
    assert _settings(shard="1", pricing_shards=2).shard_index(2) == 1
    auto = _settings(shard="AUTO")
    assert auto.shard == "auto"
    assert auto.shard_index(3, hostname="pricing-2") == 2
    assert auto.shard_index(3, hostname="coinlytics-alerting-0") == 0
    assert hostname_ordinal("pricing-12") == 12
    assert hostname_ordinal("pricing") is None


def test_environment_names_the_shard(env):
    env.setenv("COINLYTICS_SHARD", "1")
    env.setenv("COINLYTICS_PRICING_SHARDS", "2")
    env.setenv("COINLYTICS_ALERTING_SHARDS", "3")
    settings = _settings()
    assert (settings.pricing_shards, settings.alerting_shards, settings.shard_index(2)) == (2, 3, 1)


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"pricing_shards": 0}, "COINLYTICS_PRICING_SHARDS"),
        ({"alerting_shards": -1}, "COINLYTICS_ALERTING_SHARDS"),
        ({"shard": "one"}, "COINLYTICS_SHARD"),
        ({"shard": "-1"}, "COINLYTICS_SHARD"),
    ],
)
def test_bad_shard_settings_are_refused(values, named):
    with pytest.raises(ConfigurationError) as caught:
        _settings(**values)
    assert named in str(caught.value)


def test_shard_beyond_the_count_is_refused():
    with pytest.raises(ConfigurationError, match=r"shard 2, but there are only 2 \(0 to 1\)"):
        _settings(shard="2", pricing_shards=2).shard_index(2)
    with pytest.raises(ConfigurationError, match="hostname 'pricing-4' names shard 4"):
        _settings(shard="auto").shard_index(2, hostname="pricing-4")
    with pytest.raises(ConfigurationError, match="at least 1"):
        _settings().shard_index(0)


def test_auto_without_an_ordinal_is_refused():
    with pytest.raises(ConfigurationError, match="'pricing' has none: set COINLYTICS_SHARD"):
        _settings(shard="auto").shard_index(2, hostname="pricing")


def test_pricing_refuses_to_start_as_a_shard_that_does_not_exist():
    with pytest.raises(ConfigurationError, match="COINLYTICS_SHARD=3 names shard 3"):
        pricing_app(_settings(shard="3", pricing_shards=2))


# --- replayed traffic ------------------------------------------------------------------------------------


async def recorded_traffic(replay: ReplayServer, fixtures: Any) -> list[TickMessage]:
    """ROUNDS minutes of traffic: the recorded tickers as the ingest adapters parse them, each round a minute
    later and a little off the recording (so candles have an open, a high, a low and a close)."""
    for routes in ROUTES.values():
        for path, file in routes.items():
            replay.serve(path, fixtures / file)
    recorded: list[TickMessage] = []
    for name in ROUTES:
        source = CcxtRestSource(name, rest_url=replay.base_url, timeout_seconds=10)
        await source.open(COINS)
        try:
            ticks, _rejected = await source.poll()
        finally:
            await source.close()
        recorded.extend(t for t in ticks if t.base in COINS)
    assert {t.base for t in recorded} == set(COINS)
    start = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=ROUNDS + 1)
    traffic = []
    for round_ in range(ROUNDS):
        factor = 1 + Decimal((-1) ** round_ * (round_ + 1)) / 1000
        for i, tick in enumerate(recorded):
            at = start + timedelta(minutes=round_, seconds=i % 50)
            traffic.append(
                tick.model_copy(
                    update={
                        "tick_id": f"{tick.tick_id}:r{round_}",
                        "price": tick.price * factor,
                        "bid": tick.bid * factor if tick.bid else None,
                        "ask": tick.ask * factor if tick.ask else None,
                        "exchange_ts": at,
                        "received_at": at,
                    }
                )
            )
    return traffic


@pytest.fixture
async def traffic(replay, exchange_fixtures) -> list[TickMessage]:
    return await recorded_traffic(replay, exchange_fixtures)


def round_of(tick: TickMessage) -> int:
    return int(tick.tick_id.rsplit(":r", 1)[1])


async def publish(redis: Redis, settings: Settings, ticks: list[TickMessage]) -> None:
    """As ingest does: one publisher per source, routing by coin to the shards' streams."""
    publisher = StreamPublisher(redis, namespace=settings.redis_namespace, maxlen=settings.stream_maxlen)
    by_source: dict[str, TickPublisher] = {}
    for tick in ticks:
        if tick.source not in by_source:
            by_source[tick.source] = TickPublisher(publisher, tick.source, shards=settings.pricing_shards)
        assert await by_source[tick.source].publish([tick]) == 1


async def group_state(redis: Redis, settings: Settings, stream: str) -> dict[str, int]:
    key = settings.key("stream", stream)
    if not await redis.exists(key):
        return {"pending": 0, "unread": 0, "length": 0}
    groups = {
        (g["name"].decode() if isinstance(g["name"], bytes) else g["name"]): g for g in await redis.xinfo_groups(key)
    }
    length = await redis.xlen(key)
    group = groups.get(GROUP)
    if group is None:
        return {"pending": 0, "unread": length, "length": length}
    read = group.get("entries-read")
    unread = group.get("lag") if group.get("lag") is not None else length - int(read or 0)
    return {"pending": int(group["pending"]), "unread": int(unread), "length": length}


async def drained(redis: Redis, settings: Settings, db: asyncpg.Connection, expected_ticks: int) -> bool:
    for stream in ticks_streams(settings.pricing_shards):
        state = await group_state(redis, settings, stream)
        if state["pending"] or state["unread"]:
            return False
    stored = await db.fetchval("SELECT count(*) FROM ticks")
    outbox = await db.fetchval("SELECT count(*) FROM price_outbox")
    return stored == expected_ticks and outbox == 0


def replica_settings(base: Settings, shard: int, shards: int, **updates: Any) -> Settings:
    return base.model_copy(update={"shard": str(shard), "pricing_shards": shards, **updates})


@contextlib.asynccontextmanager
async def replicas(settings: list[Settings]) -> AsyncIterator[list[str]]:
    async with contextlib.AsyncExitStack() as stack:
        urls = [await stack.enter_async_context(serve_app(pricing_app(s))) for s in settings]
        yield urls


async def snapshot(db: asyncpg.Connection, redis: Redis, settings: Settings) -> dict[str, Any]:
    """What pricing stored and published, without ids and processing times."""
    prices = await db.fetch(
        "SELECT base, vs, price, volume_24h, status, sources_used, sources_total, method, last_updated, "
        "fresh_until FROM prices ORDER BY base, vs"
    )
    candles = await db.fetch(
        "SELECT base, vs, interval, t, open, high, low, close, volume, source, first_ts, last_ts FROM candles "
        "ORDER BY base, vs, interval, t"
    )
    ticks = await db.fetch(
        "SELECT tick_id, source, base, quote, price, bid, ask, volume_24h, exchange_ts, received_at FROM ticks "
        "ORDER BY tick_id"
    )
    quotes = await db.fetch("SELECT source, base, quote, price, tick_id, status FROM source_quotes ORDER BY 1, 2, 3")
    events: dict[tuple[str, str], list[tuple[Any, ...]]] = {}
    for _id, fields in await redis.xrange(settings.key("stream", "prices")):
        data = json.loads(fields[b"data"])
        events.setdefault((data["base"], data["vs"]), []).append(
            (data["price"], data["status"], data["last_updated"], data["sources_used"])
        )
    return {
        "prices": [dict(r) for r in prices],
        "candles": [dict(r) for r in candles],
        "ticks": [dict(r) for r in ticks],
        "quotes": [dict(r) for r in quotes],
        # Per coin and currency, in order: the shards interleave differently, each coin's sequence may not.
        "events": events,
    }


async def truncate(db: asyncpg.Connection) -> None:
    tables = await db.fetch(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'alembic_version'"
    )
    await db.execute("TRUNCATE " + ", ".join(f'"{t["tablename"]}"' for t in tables) + " RESTART IDENTITY CASCADE")


@pytest.fixture
def base_settings(settings: Settings) -> Settings:
    # One tick per read: each coin's consolidations then follow its ticks one by one, so one replica's result
    # is a fixed function of the traffic and the comparison is exact (batches would make it timing-dependent
    # for one replica as much as for two). The refresh loop stays out of the way of the stored prices.
    return make_settings(
        settings.require_database_url(), settings.require_redis_url(), settings.redis_namespace,
        sources=list(ROUTES), coins=COINS, stream_batch_size=1, consolidation_refresh_seconds=3600,
    )  # fmt: skip


# --- (b) two replicas give what one gives ----------------------------------------------------------------


async def test_two_shards_store_and_publish_what_one_replica_does(base_settings, traffic, db, redis):
    assert {shard_of(c, 2) for c in COINS} == {0, 1}  # the traffic really is split
    two = [replica_settings(base_settings, i, 2) for i in range(2)]
    async with replicas(two):
        await publish(redis, two[0], traffic)
        await eventually(lambda: drained(redis, two[0], db, len(traffic)), timeout=120)
    # Each stream carried exactly its own coins.
    for shard in range(2):
        entries = await redis.xrange(two[0].key("stream", ticks_stream(shard, 2)))
        coins = {TickMessage.from_json(fields[b"data"]).base for _id, fields in entries}
        assert coins == set(owned(COINS, shard, 2))
    sharded = await snapshot(db, redis, two[0])

    await truncate(db)
    one = base_settings.model_copy(update={"redis_namespace": base_settings.redis_namespace + "-one"})
    try:
        async with replicas([one]):
            await publish(redis, one, traffic)
            await eventually(lambda: drained(redis, one, db, len(traffic)), timeout=120)
        assert not await redis.exists(one.key("stream", "ticks.0"))  # one shard: the plain stream, as before
        single = await snapshot(db, redis, one)
    finally:
        keys = [k async for k in redis.scan_iter(match=f"{one.redis_namespace}:*")]
        if keys:
            await redis.delete(*keys)

    assert len(single["ticks"]) == len(traffic)
    assert {p["base"] for p in single["prices"]} == set(COINS)
    assert len({c["t"] for c in single["candles"] if c["interval"] == "1m"}) == ROUNDS
    for part in ("prices", "candles", "ticks", "quotes", "events"):
        assert sharded[part] == single[part], part


# --- (c) a stopped replica -------------------------------------------------------------------------------


async def consumers_of(redis: Redis, settings: Settings, stream: str) -> dict[str, int]:
    rows = await redis.xinfo_consumers(settings.key("stream", stream), GROUP)
    return {(r["name"].decode() if isinstance(r["name"], bytes) else r["name"]): int(r["pending"]) for r in rows}


async def quote_rounds(db: asyncpg.Connection, coins: list[str]) -> set[int]:
    """The traffic rounds the coins' latest source quotes come from (each source's newest tick wins)."""
    rows = await db.fetch("SELECT tick_id FROM source_quotes WHERE base = ANY($1)", coins)
    return {int(r["tick_id"].rsplit(":r", 1)[1]) for r in rows}


async def last_updated(db: asyncpg.Connection, coins: list[str]) -> dict[str, datetime]:
    rows = await db.fetch("SELECT base, last_updated FROM prices WHERE vs = 'USD' AND base = ANY($1)", coins)
    return {r["base"]: r["last_updated"] for r in rows}


async def test_a_stopped_shard_keeps_its_ticks_pending_and_applies_them_once_on_restart(
    base_settings, traffic, db, redis
):
    settings = [replica_settings(base_settings, i, 2, stream_batch_size=100) for i in range(2)]
    first = [t for t in traffic if round_of(t) == 0]
    later = [t for t in traffic if round_of(t) > 0]
    mine, theirs = owned(COINS, 0, 2), owned(COINS, 1, 2)
    stream1 = ticks_stream(1, 2)

    async with serve_app(pricing_app(settings[0])) as url0:
        async with serve_app(pricing_app(settings[1])):
            await publish(redis, settings[0], first)
            await eventually(lambda: drained(redis, settings[0], db, len(first)), timeout=60)
        before = await last_updated(db, theirs)
        # Shard 1 is down. One more replica of shard 1 reads a batch and dies before acknowledging it:
        # those entries are pending under its name, the rest unread.
        await publish(redis, settings[0], later)
        shard1_later = [t for t in later if shard_of(t.base, 2) == 1]
        crashed = await redis.xreadgroup(GROUP, "pricing.1-crashed", {settings[1].key("stream", stream1): ">"}, count=5)
        assert len(crashed[0][1]) == 5

        async def mine_current() -> bool:
            return await quote_rounds(db, mine) == {ROUNDS - 1}

        await eventually(mine_current, timeout=60)  # shard 0 goes on with its coins
        state = await group_state(redis, settings[1], stream1)
        shard1_total = len([t for t in traffic if shard_of(t.base, 2) == 1])
        assert state == {"pending": 5, "unread": len(shard1_later) - 5, "length": shard1_total}
        # Nobody consolidated shard 1's coins meanwhile.
        assert await last_updated(db, theirs) == before
        assert await quote_rounds(db, theirs) == {0}
        stored_theirs = await db.fetchval(
            "SELECT count(*) FROM ticks WHERE base = ANY($1) AND tick_id NOT LIKE '%:r0'", theirs
        )
        assert stored_theirs == 0
        # Shard 0 never read shard 1's stream, and its readiness is about its own stream only.
        assert all(name.startswith("pricing.1-") for name in await consumers_of(redis, settings[1], stream1))
        assert all(name.startswith("pricing.0-") for name in await consumers_of(redis, settings[0], "ticks.0"))
        async with httpx.AsyncClient(base_url=url0) as client:
            ready = await client.get("/readyz")
        assert ready.status_code == 200, ready.text

        # Shard 1 back (same index): it reclaims the crashed batch and reads the rest.
        async with serve_app(pricing_app(settings[1])):
            await eventually(lambda: drained(redis, settings[0], db, len(traffic)), timeout=60)
    rows = await db.fetch("SELECT tick_id FROM ticks")
    assert Counter(r["tick_id"] for r in rows) == Counter(t.tick_id for t in traffic)
    assert await quote_rounds(db, COINS) == {ROUNDS - 1}
    changed = await last_updated(db, theirs)
    assert all(changed[c] > before[c] for c in theirs)
    for shard in range(2):
        assert await redis.xlen(settings[0].key("stream", ticks_stream(shard, 2)) + ":dlq") == 0
    assert set((await consumers_of(redis, settings[1], stream1)).values()) == {0}  # the crashed batch too


# --- freshness refresh: only the replica's own coins -----------------------------------------------------


async def test_the_freshness_refresh_touches_only_the_replicas_own_coins(base_settings, traffic, db, redis):
    now = datetime.now(UTC)
    ticks = [t.model_copy(update={"exchange_ts": now, "received_at": now}) for t in traffic if round_of(t) == 0]
    fast = {"source_max_age_rest_seconds": 3600, "consolidation_refresh_seconds": 0.2, "min_fresh_sources": 1}
    settings = [replica_settings(base_settings, i, 2, **fast) for i in range(2)]
    mine, theirs = owned(COINS, 0, 2), owned(COINS, 1, 2)

    async def statuses(coins: list[str]) -> set[str]:
        rows = await db.fetch("SELECT DISTINCT status FROM prices WHERE vs = 'USD' AND base = ANY($1)", coins)
        return {r["status"] for r in rows}

    async with serve_app(pricing_app(settings[0])):
        async with serve_app(pricing_app(settings[1])):
            await publish(redis, settings[0], ticks)
            await eventually(lambda: drained(redis, settings[0], db, len(ticks)), timeout=60)
            assert await statuses(COINS) == {"fresh"}
        # Every quote ages past its maximum at once, with nothing new arriving (as if two hours went by).
        # (Prices move back with their quotes, since a price never goes back past its stored time.)
        await db.execute("UPDATE source_quotes SET received_at = received_at - interval '2 hours'")
        await db.execute("UPDATE prices SET last_updated = last_updated - interval '2 hours'")
        # Only shard 0 runs now: its refresh turns its coins stale; had it refreshed every coin, shard 1's
        # would have turned stale in the same transaction.
        await eventually(lambda: _equals(statuses(mine), {"stale"}), timeout=60)
        assert await statuses(theirs) == {"fresh"}


async def _equals(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


# --- a foreign tick --------------------------------------------------------------------------------------


async def test_a_tick_of_another_shards_coin_is_dead_lettered_not_applied(base_settings, traffic, db, redis):
    settings = replica_settings(base_settings, 0, 2)
    foreign = next(t for t in traffic if shard_of(t.base, 2) == 1)
    publisher = StreamPublisher(redis, namespace=settings.redis_namespace, maxlen=1000)
    # An ingest that believes in another shard count would put it here.
    await publisher.publish("ticks.0", foreign.to_stream())
    async with serve_app(pricing_app(settings)):
        dlq = settings.key("stream", "ticks.0") + ":dlq"

        async def dead_lettered() -> list[Any]:
            return list(await redis.xrange(dlq))

        letters = await eventually(dead_lettered)
    assert b"belongs to pricing shard 1 of 2" in letters[0][1][b"dlq_reason"]
    assert await db.fetchval("SELECT count(*) FROM ticks") == 0


# --- readiness follows the replica's own stream ----------------------------------------------------------


async def test_readyz_reports_the_replicas_own_shard(base_settings, traffic, redis):
    # A replica of shard 1 read an entry and died; nothing reclaims it here (claim delay of an hour).
    stuck = {"stream_stall_seconds": 3, "stream_claim_idle_ms": 3_600_000}
    settings = [replica_settings(base_settings, i, 2, **stuck) for i in range(2)]
    tick = next(t for t in traffic if shard_of(t.base, 2) == 1)
    key = settings[1].key("stream", "ticks.1")
    await redis.xgroup_create(key, GROUP, id="0", mkstream=True)
    await StreamPublisher(redis, namespace=settings[1].redis_namespace, maxlen=1000).publish(
        "ticks.1", tick.to_stream()
    )
    assert await redis.xreadgroup(GROUP, "pricing.1-crashed", {key: ">"}, count=1)
    async with (
        serve_app(pricing_app(settings[0])) as url0,
        serve_app(pricing_app(settings[1])) as url1,
        httpx.AsyncClient() as client,
    ):

        async def shard1_not_ready() -> httpx.Response | None:
            response = await client.get(f"{url1}/readyz")
            return response if response.status_code == 503 else None

        body = (await eventually(shard1_not_ready, timeout=60)).json()
        ready0 = await client.get(f"{url0}/readyz")
    assert "ticks.1: group pricing stalled" in body["error"]["details"]["problems"]["tick-consumer"]
    # Shard 0's stream is not shard 1's business: its replica stays ready.
    assert ready0.status_code == 200, ready0.text


# --- ingest's routing ------------------------------------------------------------------------------------


async def test_ingest_routes_by_coin_and_resends_only_what_a_stream_refused(base_settings, traffic, redis):
    settings = replica_settings(base_settings, 0, 2)
    ticks = sorted((t for t in traffic if round_of(t) == 0), key=lambda t: shard_of(t.base, 2))  # shard 0 first
    publisher = StreamPublisher(redis, namespace=settings.redis_namespace, maxlen=10_000)
    ticks_publisher = TickPublisher(publisher, "replayed", shards=2, retry_seconds=0)
    # Shard 1's stream refuses writes (a key of the wrong type: Redis answers WRONGTYPE), shard 0's takes them.
    await redis.set(settings.key("stream", "ticks.1"), "not a stream")
    assert await ticks_publisher.publish(ticks) is None
    assert {TickMessage.from_stream(p).base for p in ticks_publisher.held} == set(owned(COINS, 1, 2))
    held = len(ticks_publisher.held)
    await redis.delete(settings.key("stream", "ticks.1"))
    assert await ticks_publisher.publish([]) == held
    assert not ticks_publisher.held
    for shard in range(2):
        entries = await redis.xrange(settings.key("stream", ticks_stream(shard, 2)))
        ids = [TickMessage.from_json(fields[b"data"]).tick_id for _id, fields in entries]
        # Each tick once, in its coin's stream only.
        assert sorted(ids) == sorted(t.tick_id for t in ticks if shard_of(t.base, 2) == shard)
