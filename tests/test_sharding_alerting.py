"""Alert evaluation sharded by coin (issue 14): two alerting replicas, shards 0 and 1 of 2, through the real
alerting service (its evaluator, the prices stream, PostgreSQL) and gateway.

- On the same price sequence the two shards store exactly the alert events one replica stores (same ids,
  same rows), each holding only its own coins' rules.
- A stopped shard's prices wait for it in its own consumer group (read-but-unacknowledged ones included, as
  a killed replica leaves them); restarted, it fires the missed crossings once, and the other shard fires
  nothing for its coins meanwhile.
- A rule edited onto another shard's coin leaves the one shard and arrives at the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest

from services.alerting.app import create_app as alerting_app
from services.alerting.evaluation import EvaluationService, evaluator_group, evaluator_shard, lease_name
from services.gateway.app import create_app as gateway_app
from shared.jobs import JobQueue
from shared.settings import ConfigurationError, Settings
from shared.sharding import shard_of
from shared.streams import PRICES_STREAM, StreamPublisher
from tests.conftest import eventually, serve_app
from tests.test_alert_delivery import FAST_RETRIES, Receiver, user

SHARDS = 2
CANDIDATES = ("BTC", "ETH", "SOL", "ADA", "XRP", "DOGE", "DOT", "LTC", "AVAX", "LINK", "ATOM", "XLM")


def coins_by_shard() -> list[list[str]]:
    """Two coins of each shard, chosen by the same hash the services use."""
    found: list[list[str]] = [[] for _ in range(SHARDS)]
    for symbol in CANDIDATES:
        shard = shard_of(symbol, SHARDS)
        if len(found[shard]) < 2:
            found[shard].append(symbol)
    assert all(len(c) == 2 for c in found), f"the candidates do not give two coins per shard: {found}"
    return found


@dataclass
class Replica:
    app: Any
    url: str

    @property
    def evaluation(self) -> EvaluationService:
        service: EvaluationService = self.app.state.evaluation
        return service


@contextlib.asynccontextmanager
async def replica(settings: Settings, shard: int | None) -> AsyncIterator[Replica]:
    """An alerting replica: unsharded (``shard`` None) or shard ``shard`` of SHARDS."""
    if shard is not None:
        settings = settings.model_copy(update={"alerting_shards": SHARDS, "shard": str(shard)})
    app = alerting_app(settings)
    async with serve_app(app) as url:
        yield Replica(app, url)


@contextlib.asynccontextmanager
async def gateway(settings: Settings, alerting: Replica) -> AsyncIterator[httpx.AsyncClient]:
    gw = settings.model_copy(update={"alerting_url": alerting.url})
    async with serve_app(gateway_app(gw)) as url, httpx.AsyncClient(base_url=url, timeout=20) as client:
        yield client


def common_settings(settings: Settings, namespace: str | None = None) -> Settings:
    update: dict[str, Any] = {
        "internal_auth_required": True,
        "webhook_allow_private": True,
        "alert_retry_schedule": FAST_RETRIES,
    }
    if namespace is not None:
        # Under the test's namespace, so the redis fixture still cleans it up.
        update["redis_namespace"] = f"{settings.redis_namespace}:{namespace}"
    return settings.model_copy(update=update)


async def add_coins(db: Any, symbols: list[str]) -> None:
    for symbol in symbols:
        await db.execute("INSERT INTO coins (symbol, name, active) VALUES ($1, $1, true)", symbol)


async def create_rule(client: httpx.AsyncClient, headers: dict[str, str], url: str, **body: Any) -> str:
    payload = {"vs": "USD", "cooldown_seconds": 0, "channels": [{"type": "webhook", "url": url}], **body}
    response = await client.post("/api/v1/alerts", json=payload, headers=headers)
    assert response.status_code == 201, response.text
    alert_id: str = response.json()["id"]
    return alert_id


async def holds(replica: Replica, alert_id: str, present: bool = True) -> bool:
    evaluation = replica.evaluation
    return evaluation.leading and (alert_id in evaluation.engine.rules) == present


def price(symbol: str, value: str, at: datetime, *, status: str = "fresh", spread: str = "0.1") -> dict[str, Any]:
    return {
        "event_id": f"{symbol}-{at.isoformat()}",
        "base": symbol,
        "vs": "USD",
        "price": value,
        "volume_24h": None,
        "status": status,
        "sources_used": 3,
        "sources_total": 3,
        "method": "median",
        "last_updated": at.isoformat().replace("+00:00", "Z"),
        "fresh_until": (at + timedelta(seconds=30)).isoformat().replace("+00:00", "Z"),
        "spread_pct": spread,
    }


def _entry_id(raw: bytes | str) -> tuple[int, int]:
    text = raw.decode() if isinstance(raw, bytes) else raw
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


async def group_state(redis: Any, settings: Settings, group: str) -> dict[str, Any] | None:
    stream = settings.key("stream", PRICES_STREAM)
    for info in await redis.xinfo_groups(stream):
        if info["name"].decode() == group:
            return {"last": _entry_id(info["last-delivered-id"]), "pending": int(info["pending"])}
    return None


async def drained(redis: Any, settings: Settings, group: str) -> bool:
    """True once ``group`` has read and acknowledged every entry of the prices stream."""
    newest = await redis.xrevrange(settings.key("stream", PRICES_STREAM), count=1)
    state = await group_state(redis, settings, group)
    return bool(newest and state and state["last"] >= _entry_id(newest[0][0]) and state["pending"] == 0)


async def idle_past(redis: Any, stream: str, group: str, idle_ms: int) -> bool:
    pending = await redis.xpending_range(stream, group, min="-", max="+", count=100)
    return bool(pending) and all(int(p["time_since_delivered"]) > idle_ms for p in pending)


async def stored_events(db: Any) -> list[tuple[Any, ...]]:
    """Every stored alert event as a comparable row (the payload without its storage time)."""
    rows = await db.fetch("SELECT id, alert_id, user_id, price, payload FROM alert_events ORDER BY id")
    found = []
    for row in rows:
        payload = json.loads(row["payload"])
        payload.pop("created_at")
        found.append((row["id"], row["alert_id"], row["user_id"], row["price"], json.dumps(payload, sort_keys=True)))
    return found


async def events_by_symbol(db: Any) -> dict[str, list[Decimal]]:
    rows = await db.fetch("SELECT a.symbol, e.price FROM alert_events e JOIN alerts a ON a.id = e.alert_id")
    found: dict[str, list[Decimal]] = {}
    for row in rows:
        found.setdefault(row["symbol"], []).append(row["price"])
    return {symbol: sorted(prices) for symbol, prices in found.items()}


# Crosses 100 up and back, 90 down, the spread above 0.5, and +5% on the stored candles' 100 twice.
WALK = ["95", "101", "102", "99.5", "100.5", "89", "89.5", "92", "106", "95", "107"]
SPREADS = ["0.1", "0.6", "0.2", "0.7", "0.3", "0.1", "0.9", "0.2", "0.6", "0.1", "0.2"]
STALE_STEP = 6  # a stale price fires nothing and moves no reference


def sequence(symbols: list[str], t0: datetime) -> list[dict[str, Any]]:
    events = []
    for step, (value, spread) in enumerate(zip(WALK, SPREADS, strict=True)):
        for offset, symbol in enumerate(symbols):
            at = t0 + timedelta(seconds=step, milliseconds=offset)
            status = "stale" if step == STALE_STEP else "fresh"
            events.append(price(symbol, value, at, status=status, spread=spread))
    return events


async def test_two_shards_store_exactly_the_events_one_replica_stores(settings, db, redis):
    shards = coins_by_shard()
    symbols = [s for coins in shards for s in coins]
    await add_coins(db, symbols)
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    for symbol in (shards[0][0], shards[1][0]):  # percent-change rules' window start, one coin of each shard
        for minutes in range(45, 0, -1):
            await db.execute(
                "INSERT INTO candles (base, vs, interval, t, open, high, low, close) "
                "VALUES ($1, 'USD', '1m', $2, 100, 100, 100, 100)",
                symbol,
                now - timedelta(minutes=minutes),
            )
    t0 = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=5)
    prices = sequence(symbols, t0)
    receiver = Receiver()
    await receiver.start()
    one = common_settings(settings, "one")
    try:
        # One replica: the reference.
        async with replica(one, None) as single, gateway(one, single) as client:
            assert single.evaluation.group == "alerting"
            headers = await user(client, "shards@example.com")
            rule_ids: dict[str, list[str]] = {}
            for symbol in symbols:
                rules = [
                    dict(condition="above", threshold="100"),
                    dict(condition="below", threshold="90"),
                    dict(condition="spread_above", threshold="0.5"),
                ]
                if symbol in (shards[0][0], shards[1][0]):
                    rules.append(dict(condition="pct_change_up", threshold="5", window_minutes=30))
                rule_ids[symbol] = [await create_rule(client, headers, receiver.url, symbol=symbol, **r) for r in rules]
            last = rule_ids[symbols[-1]][-1]
            await eventually(lambda: holds(single, last))
            await StreamPublisher(redis, namespace=one.redis_namespace, maxlen=10_000).publish_many(
                PRICES_STREAM, prices
            )
            await eventually(lambda: drained(redis, one, "alerting"), timeout=30)
            assert single.evaluation.engine.counts()["rules"] == sum(len(v) for v in rule_ids.values())
            assert evaluated(single.app) == len(prices)
        reference = await stored_events(db)
        by_symbol = await events_by_symbol(db)
        assert set(by_symbol) == set(symbols), f"every coin fires in the reference run: {by_symbol}"

        # The same rules as stored, fired afresh, and the same prices, in a namespace of their own.
        await db.execute("DELETE FROM alert_deliveries")
        await db.execute("DELETE FROM alert_events")
        await db.execute("UPDATE alerts SET last_fired_at = NULL")
        two = common_settings(settings, "two")
        async with replica(two, 0) as first, replica(two, 1) as second:
            replicas = (first, second)
            await eventually(lambda: _all(r.evaluation.leading for r in replicas))
            # Each shard holds exactly its own coins' rules, under its own group and lease.
            for index, r in enumerate(replicas):
                evaluation = r.evaluation
                expected = {i for s in shards[index] for i in rule_ids[s]}
                assert set(evaluation.engine.rules) == expected
                assert {rule.symbol for rule in evaluation.engine.rules.values()} == set(shards[index])
                assert evaluation.engine.counts()["rules"] == len(expected)
                assert evaluation.group == f"alerting.{index}"
                assert (await redis.get(two.key("alerting", "evaluator", f"lease.{index}"))).decode() == (
                    evaluation.name
                )
                async with httpx.AsyncClient(base_url=r.url, timeout=10) as direct:
                    ready = await direct.get("/readyz")
                assert ready.status_code == 200, ready.text
            await StreamPublisher(redis, namespace=two.redis_namespace, maxlen=10_000).publish_many(
                PRICES_STREAM, prices
            )
            for index in range(SHARDS):
                await eventually(lambda i=index: drained(redis, two, f"alerting.{i}"), timeout=30)
            fired = [r.evaluation.fired for r in replicas]
            counted = [evaluated(r.app) for r in replicas]
        sharded = await stored_events(db)
    finally:
        await receiver.stop()
    assert sharded == reference
    assert len(reference) == len({row[0] for row in reference}), "no event stored twice"
    assert sum(fired) == len(reference) and all(fired), fired
    # Each shard evaluated only its own coins' prices (the others' were acknowledged unread): each price once.
    assert counted == [len(prices) // SHARDS] * SHARDS, counted


async def _all(values: Any) -> bool:
    return all(values)


def evaluated(app: Any) -> float:
    """The replica's alert_evaluations_total, as its /metrics reports it."""
    value = app.state.resources.registry.get_sample_value("alert_evaluations_total")
    return float(value or 0)


async def test_a_stopped_shard_fires_its_missed_crossings_once_on_restart(settings, db, redis):
    shards = coins_by_shard()
    mine, theirs = shards[0][0], shards[1][0]  # shard 0 is stopped
    await add_coins(db, [mine, theirs])
    common = common_settings(settings)
    receiver = Receiver()
    await receiver.start()
    publisher = StreamPublisher(redis, namespace=common.redis_namespace, maxlen=10_000)
    stream = common.key("stream", PRICES_STREAM)
    t0 = datetime.now(UTC).replace(microsecond=0)
    try:
        async with replica(common, 1) as survivor, gateway(common, survivor) as client:
            headers = await user(client, "restart@example.com")
            async with replica(common, 0) as stopped:
                ids = {s: await create_rule(client, headers, receiver.url, symbol=s, condition="above", threshold="100")
                       for s in (mine, theirs)}  # fmt: skip
                await eventually(lambda: holds(stopped, ids[mine]))
                await eventually(lambda: holds(survivor, ids[theirs]))
                assert ids[mine] not in survivor.evaluation.engine.rules
                assert ids[theirs] not in stopped.evaluation.engine.rules
                await publisher.publish_many(PRICES_STREAM, [price(s, "95", t0) for s in (mine, theirs)])
                await eventually(lambda: drained(redis, common, "alerting.0"))
            # Shard 0 is down. Crossings on both shards' coins: 101 (fires), 99 (re-arms), 102 (fires again).
            missed = []
            for n, value in enumerate(("101", "99", "102"), start=1):
                at = t0 + timedelta(seconds=n)
                missed.append(await publisher.publish(PRICES_STREAM, price(mine, value, at)))
                await publisher.publish(PRICES_STREAM, price(theirs, value, at))
            # What a replica killed between reading and acknowledging leaves: entries pending for a consumer
            # that is gone (the first three missed entries, read in shard 0's group and never acknowledged).
            grabbed = await redis.xreadgroup("alerting.0", "killed-replica", {stream: ">"}, count=3)
            assert len(grabbed[0][1]) == 3
            await eventually(lambda: drained(redis, common, "alerting.1"))
            assert await events_by_symbol(db) == {theirs: [Decimal(101), Decimal(102)]}
            assert survivor.evaluation.fired == 2, "the other shard fired nothing for the stopped shard's coin"
            state = await group_state(redis, common, "alerting.0")
            assert state is not None and state["pending"] == 3
            assert state["last"] < _entry_id(missed[-1]), "the rest wait unread in the stopped shard's group"

            # Idle past the claim delay, as a dead consumer's entries are once a replacement starts.
            await eventually(lambda: idle_past(redis, stream, "alerting.0", common.stream_claim_idle_ms))
            async with replica(common, 0) as restarted:
                await eventually(lambda: drained(redis, common, "alerting.0"), timeout=30)
                assert restarted.evaluation.fired == 2
            assert await events_by_symbol(db) == {
                mine: [Decimal(101), Decimal(102)],
                theirs: [Decimal(101), Decimal(102)],
            }
            rows = await db.fetch("SELECT id FROM alert_events WHERE alert_id = $1", uuid.UUID(ids[mine]))
            assert len(rows) == 2
    finally:
        await receiver.stop()


async def test_a_rule_moved_to_another_shards_coin_moves_between_shards(settings, db, redis):
    shards = coins_by_shard()
    (first_coin, other_coin), (far_coin, _) = shards
    await add_coins(db, [first_coin, other_coin, far_coin])
    common = common_settings(settings)
    receiver = Receiver()
    await receiver.start()
    publisher = StreamPublisher(redis, namespace=common.redis_namespace, maxlen=10_000)
    t0 = datetime.now(UTC).replace(microsecond=0)
    try:
        async with (
            replica(common, 0) as zero,
            replica(common, 1) as one,
            gateway(common, one) as client,
        ):
            headers = await user(client, "move@example.com")
            alert_id = await create_rule(
                client, headers, receiver.url, symbol=first_coin, condition="above", threshold="100"
            )
            await eventually(lambda: holds(zero, alert_id))
            assert alert_id not in one.evaluation.engine.rules

            moved = await client.patch(f"/api/v1/alerts/{alert_id}", json={"symbol": far_coin}, headers=headers)
            assert moved.status_code == 200, moved.text
            await eventually(lambda: holds(zero, alert_id, present=False))
            await eventually(lambda: holds(one, alert_id))
            assert one.evaluation.engine.rules[alert_id].symbol == far_coin

            steps = [
                price(s, v, t0 + timedelta(seconds=n))
                for n, v in enumerate(("95", "101"))
                for s in (first_coin, far_coin)
            ]
            await publisher.publish_many(PRICES_STREAM, steps)
            for group in ("alerting.0", "alerting.1"):
                await eventually(lambda g=group: drained(redis, common, g))
            assert await events_by_symbol(db) == {far_coin: [Decimal(101)]}
            assert (zero.evaluation.fired, one.evaluation.fired) == (0, 1)

            # And back, onto the first shard's other coin.
            back = await client.patch(f"/api/v1/alerts/{alert_id}", json={"symbol": other_coin}, headers=headers)
            assert back.status_code == 200, back.text
            await eventually(lambda: holds(one, alert_id, present=False))
            await eventually(lambda: holds(zero, alert_id))
            assert zero.evaluation.engine.rules[alert_id].symbol == other_coin
            assert not one.evaluation.engine.rules
    finally:
        await receiver.stop()


def test_unsharded_names_stay_and_a_bad_shard_stops_the_service(settings):
    assert evaluator_group(1, 0) == "alerting" and lease_name(1, 0) == "lease"
    assert evaluator_group(3, 2) == "alerting.2" and lease_name(3, 2) == "lease.2"
    # Unsharded, every replica is a standby of shard 0 whatever COINLYTICS_SHARD says.
    assert evaluator_shard(settings.model_copy(update={"shard": "3"})) == 0
    assert evaluator_shard(settings.model_copy(update={"alerting_shards": 4, "shard": "3"})) == 3
    with pytest.raises(ConfigurationError, match="shard 2"):
        alerting_app(settings.model_copy(update={"alerting_shards": 2, "shard": "2"}))


async def test_each_shard_has_its_own_leader_and_a_standby_of_the_same_shard_takes_over(settings, sessions, redis):
    jobs = JobQueue(settings)
    publisher = StreamPublisher(redis, namespace=settings.redis_namespace, maxlen=10_000)
    shard_settings = [settings.model_copy(update={"alerting_shards": SHARDS, "shard": str(i)}) for i in (0, 0, 1)]
    replicas = [
        EvaluationService(s, sessions, redis, publisher, jobs, consumer_name=f"r{n}")
        for n, s in enumerate(shard_settings)
    ]
    stops = [asyncio.Event() for _ in replicas]
    runs = [asyncio.create_task(r.run(s)) for r, s in zip(replicas, stops, strict=True)]
    try:
        # Shard 1's only replica leads although shard 0 has a leader: the leases are per shard.
        await eventually(lambda: _all([replicas[2].leading, replicas[0].leading or replicas[1].leading]))
        assert [r.leading for r in replicas[:2]].count(True) == 1
        assert replicas[2].lease_key == settings.key("alerting", "evaluator", "lease.1")
        leader = 0 if replicas[0].leading else 1
        stops[leader].set()
        await runs[leader]
        standby = replicas[1 - leader]
        await eventually(lambda: _truthy(standby.leading), timeout=15)
        assert (await redis.get(standby.lease_key)).decode() == standby.name
        assert replicas[2].leading, "shard 1 kept its leader throughout"
    finally:
        for stop in stops:
            stop.set()
        await asyncio.gather(*runs, return_exceptions=True)
        await jobs.close()


async def _truthy(value: bool) -> bool:
    return value
