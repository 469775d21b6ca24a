"""Redis Streams delivery guarantees, against a real Redis and a real PostgreSQL.

Ticks are built from Binance's recorded 24h ticker list; the pricing service that stores them is built
the way services/pricing/app.py builds it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from services.pricing.consumers import GROUP, tick_consumer
from services.pricing.service import PriceCache, PricingService
from shared.db import create_engine, session_factory
from shared.messages import TickMessage
from shared.settings import Settings
from shared.streams import PRICES_STREAM, TICKS_STREAM, StreamConsumer, StreamMessage, StreamPublisher
from tests.conftest import eventually, make_settings

BINANCE_TICKERS = Path("binance") / "rec_api_v1_ticker_24hr_ALL_2019-08-22.json"
# Binance pair ids of the recorded list and the coin/currency each one quotes.
RECORDED_PAIRS = {
    "BTCUSDT": ("BTC", "USDT"),
    "ETHUSDT": ("ETH", "USDT"),
    "ETHBTC": ("ETH", "BTC"),
    "LTCUSDT": ("LTC", "USDT"),
    "BNBUSDT": ("BNB", "USDT"),
    "XRPUSDT": ("XRP", "USDT"),
}


def recorded_rows(fixtures: Path) -> dict[str, dict[str, Any]]:
    rows = json.loads((fixtures / BINANCE_TICKERS).read_text())
    return {row["symbol"]: row for row in rows}


def tick_from_row(row: dict[str, Any], base: str, quote: str, received: datetime) -> TickMessage:
    """A recorded Binance 24h ticker row mapped straight to a tick (no ccxt in between)."""
    price = Decimal(row["lastPrice"])
    return TickMessage(
        tick_id=f"binance:{row['symbol']}:{row['closeTime']}:{price.normalize()}",
        source="binance",
        base=base,
        quote=quote,
        pair=row["symbol"],
        price=row["lastPrice"],
        bid=row["bidPrice"],
        ask=row["askPrice"],
        volume_24h=row["volume"],
        quote_volume_24h=row["quoteVolume"],
        exchange_ts=datetime.fromtimestamp(row["closeTime"] / 1000, tz=UTC),
        received_at=received,
    )


def recorded_ticks(fixtures: Path) -> list[TickMessage]:
    rows = recorded_rows(fixtures)
    received = datetime.now(UTC)
    return [tick_from_row(rows[symbol], base, quote, received) for symbol, (base, quote) in RECORDED_PAIRS.items()]


@dataclass
class Pricing:
    settings: Settings
    redis: Redis
    service: PricingService
    publisher: StreamPublisher

    @property
    def ticks_key(self) -> str:
        return self.publisher.stream_key(TICKS_STREAM)

    @property
    def dlq_key(self) -> str:
        return f"{self.ticks_key}:dlq"

    def consumer(self, name: str) -> StreamConsumer:
        consumer = tick_consumer(self.redis, self.settings, self.service, consumer=name)
        consumer.block_ms = 20  # keep idle reads short; nothing here depends on it
        return consumer

    async def publish(self, ticks: list[TickMessage]) -> None:
        await self.publisher.publish_many(TICKS_STREAM, [t.to_stream() for t in ticks])

    async def pending(self) -> int:
        summary = await self.redis.xpending(self.ticks_key, GROUP)
        return int(summary["pending"])

    async def dead_letters(self) -> list[dict[str, str]]:
        entries = await self.redis.xrange(self.dlq_key)
        return [{k.decode(): v.decode() for k, v in fields.items()} for _id, fields in entries]

    async def last_delivered(self) -> str:
        groups = await self.redis.xinfo_groups(self.ticks_key)
        group = next(g for g in groups if g["name"] in (GROUP, GROUP.encode()))
        value = group["last-delivered-id"]
        return value.decode() if isinstance(value, bytes) else str(value)

    async def last_entry_id(self) -> str:
        entries = await self.redis.xrevrange(self.ticks_key, count=1)
        return entries[0][0].decode()


@pytest.fixture
async def pricing(settings: Settings, redis: Redis) -> AsyncIterator[Pricing]:
    configured = make_settings(
        settings.database_url,
        settings.redis_url,
        settings.redis_namespace,
        stream_claim_idle_ms=100,
        stream_max_deliveries=3,
    )
    engine = create_engine(configured.require_database_url())
    publisher = StreamPublisher(redis, namespace=configured.redis_namespace, maxlen=configured.stream_maxlen)
    service = PricingService(
        configured,
        sessions=session_factory(engine),
        publisher=publisher,
        cache=PriceCache(redis, configured),
    )
    try:
        yield Pricing(settings=configured, redis=redis, service=service, publisher=publisher)
    finally:
        await engine.dispose()


async def stored_tick_ids(db) -> list[str]:
    return [row["tick_id"] for row in await db.fetch("SELECT tick_id FROM ticks ORDER BY tick_id")]


async def test_entries_left_pending_by_a_dead_consumer_are_reclaimed_and_applied_once(pricing, exchange_fixtures, db):
    ticks = recorded_ticks(exchange_fixtures)
    survivor = pricing.consumer("survivor")
    await survivor.ensure_group()
    await pricing.publish(ticks)

    # A consumer reads everything and dies before acking.
    response = await pricing.redis.xreadgroup(GROUP, "dead", {pricing.ticks_key: ">"}, count=100)
    assert len(response[0][1]) == len(ticks)
    summary = await pricing.redis.xpending(pricing.ticks_key, GROUP)
    assert summary["pending"] == len(ticks)
    assert [(c["name"], c["pending"]) for c in summary["consumers"]] == [(b"dead", len(ticks))]
    assert await stored_tick_ids(db) == []

    async def reclaimed() -> bool:
        await survivor.step()
        return await pricing.pending() == 0

    await eventually(reclaimed, timeout=10, interval=0.05)
    assert sorted(await stored_tick_ids(db)) == sorted(t.tick_id for t in ticks)
    quotes = await db.fetch("SELECT source, base, quote, price, tick_id FROM source_quotes")
    assert {(q["base"], q["quote"]): q["price"] for q in quotes} == {(t.base, t.quote): t.price for t in ticks}
    prices_announced = await pricing.redis.xlen(pricing.publisher.stream_key(PRICES_STREAM))
    assert prices_announced > 0

    # The same ticks arrive again (an ingest re-poll or a replay): stored once, nothing re-announced.
    await pricing.publish(ticks)
    last_id = await pricing.last_entry_id()

    async def caught_up() -> bool:
        await survivor.step()
        return await pricing.pending() == 0 and await pricing.last_delivered() == last_id

    await eventually(caught_up, timeout=10, interval=0.05)
    assert survivor.processed == 2 * len(ticks)
    assert survivor.dead_lettered == 0
    assert sorted(await stored_tick_ids(db)) == sorted(t.tick_id for t in ticks)
    assert await db.fetchval("SELECT count(*) FROM ticks") == len(ticks)
    assert await pricing.redis.xlen(pricing.publisher.stream_key(PRICES_STREAM)) == prices_announced
    assert await pricing.dead_letters() == []


async def test_handler_dying_after_commit_but_before_ack_is_redelivered_without_double_apply(
    pricing, exchange_fixtures, db
):
    ticks = recorded_ticks(exchange_fixtures)
    crashed: set[str] = set()
    applied: list[int] = []

    async def handle_one(message: StreamMessage) -> None:
        payloads = await pricing.service.apply_ticks([TickMessage.from_stream(message.payload())])
        applied.append(len(payloads))
        if message.id not in crashed:
            crashed.add(message.id)
            raise RuntimeError("worker died after the commit, before the ack")

    consumer = StreamConsumer(
        pricing.redis,
        namespace=pricing.settings.redis_namespace,
        stream=TICKS_STREAM,
        group=GROUP,
        consumer="flaky",
        handle_one=handle_one,
        block_ms=20,
        claim_idle_ms=100,
        max_deliveries=5,
    )
    await consumer.ensure_group()
    await pricing.publish(ticks)

    async def settled() -> bool:
        await consumer.step()
        return len(crashed) == len(ticks) and await pricing.pending() == 0

    await eventually(settled, timeout=10, interval=0.05)
    assert consumer.failed == len(ticks)
    assert consumer.processed == len(ticks)
    assert consumer.dead_lettered == 0
    assert len(applied) == 2 * len(ticks)
    # Every redelivery found its tick already stored and announced nothing.
    assert applied[len(ticks) :] == [0] * len(ticks)
    assert sorted(await stored_tick_ids(db)) == sorted(t.tick_id for t in ticks)


async def test_entry_that_always_fails_is_dead_lettered_after_max_deliveries(pricing, exchange_fixtures, db):
    ticks = recorded_ticks(exchange_fixtures)
    doomed = next(t for t in ticks if t.pair == "ETHBTC")
    attempts: dict[str, int] = {}

    def check(message: StreamMessage) -> TickMessage:
        tick = TickMessage.from_stream(message.payload())
        if tick.tick_id == doomed.tick_id:
            raise RuntimeError("downstream rejects this tick")
        return tick

    async def handle_one(message: StreamMessage) -> None:
        # Once per delivery: a failed batch is retried one by one within the same delivery.
        attempts[message.id] = attempts.get(message.id, 0) + 1
        await pricing.service.apply_ticks([check(message)])

    async def handle_batch(messages: list[StreamMessage]) -> None:
        await pricing.service.apply_ticks([check(m) for m in messages])

    consumer = StreamConsumer(
        pricing.redis,
        namespace=pricing.settings.redis_namespace,
        stream=TICKS_STREAM,
        group=GROUP,
        consumer="worker",
        handle_one=handle_one,
        handle_batch=handle_batch,
        block_ms=20,
        claim_idle_ms=pricing.settings.stream_claim_idle_ms,
        max_deliveries=pricing.settings.stream_max_deliveries,
    )
    await consumer.ensure_group()
    await pricing.publish(ticks)
    entry_ids = [entry_id.decode() for entry_id, _ in await pricing.redis.xrange(pricing.ticks_key)]
    doomed_id = entry_ids[ticks.index(doomed)]

    async def dead_lettered() -> bool:
        await consumer.step()
        return len(await pricing.dead_letters()) == 1 and await pricing.pending() == 0

    await eventually(dead_lettered, timeout=10, interval=0.05)
    [letter] = await pricing.dead_letters()
    max_deliveries = pricing.settings.stream_max_deliveries
    assert letter["dlq_source_id"] == doomed_id
    assert letter["dlq_group"] == GROUP
    assert letter["dlq_deliveries"] == str(max_deliveries)
    assert letter["dlq_reason"] == f"failed {max_deliveries} deliveries"
    # The original entry travels with it, so it can be inspected and replayed.
    assert TickMessage.from_stream(json.loads(letter["data"])) == doomed
    assert letter["cid"]
    assert attempts[doomed_id] == max_deliveries
    assert all(n == 1 for entry_id, n in attempts.items() if entry_id != doomed_id)
    assert consumer.dead_lettered == 1
    stored = await stored_tick_ids(db)
    assert sorted(stored) == sorted(t.tick_id for t in ticks if t is not doomed)


def broken_entries(good: TickMessage) -> dict[str, tuple[dict[str, str], str]]:
    """Entries that can never be processed, each with a word its dead-letter reason must contain."""
    payload = good.to_stream()
    missing_price = {k: v for k, v in payload.items() if k != "price"}
    negative = {**payload, "tick_id": good.tick_id + ":neg", "price": "-" + payload["price"]}
    not_a_number = {**payload, "tick_id": good.tick_id + ":nan", "price": "NaN"}
    text = json.dumps(payload)
    return {
        "no data field": ({"cid": "c-no-data"}, "data"),
        "truncated json": ({"data": text[: len(text) // 2], "cid": "c-json"}, "json"),
        "json array": ({"data": json.dumps([payload]), "cid": "c-array"}, "object"),
        "missing price": ({"data": json.dumps(missing_price), "cid": "c-missing"}, "price"),
        "negative price": ({"data": json.dumps(negative), "cid": "c-negative"}, "price"),
        "NaN price": ({"data": json.dumps(not_a_number), "cid": "c-nan"}, "price"),
    }


async def test_malformed_entries_are_dead_lettered_at_once_and_valid_ones_in_the_batch_are_stored(
    pricing, exchange_fixtures, db
):
    ticks = recorded_ticks(exchange_fixtures)
    broken = broken_entries(ticks[0])
    consumer = pricing.consumer("pricing-1")
    await consumer.ensure_group()
    # Valid and broken entries interleaved in one stream, read as one batch.
    expected_reasons: dict[str, str] = {}
    for tick, (fields, phrase) in zip(ticks, broken.values(), strict=True):
        await pricing.publisher.publish(TICKS_STREAM, tick.to_stream())
        entry_id = await pricing.redis.xadd(pricing.ticks_key, fields)
        expected_reasons[entry_id.decode()] = phrase

    handled = await consumer.step()

    assert handled == len(ticks) + len(broken)
    assert await pricing.pending() == 0
    letters = await pricing.dead_letters()
    assert {letter["dlq_source_id"] for letter in letters} == set(expected_reasons)
    for letter in letters:
        phrase = expected_reasons[letter["dlq_source_id"]]
        assert phrase in letter["dlq_reason"].lower(), (phrase, letter["dlq_reason"])
        assert letter["dlq_deliveries"] == "1"
        assert letter["dlq_group"] == GROUP
    assert consumer.dead_lettered == len(broken)
    assert sorted(await stored_tick_ids(db)) == sorted(t.tick_id for t in ticks)
    prices = await db.fetch("SELECT base, vs, price FROM prices")
    assert all(row["price"] > 0 for row in prices)
    assert {row["base"] for row in prices} == {t.base for t in ticks}


async def stream_node_max_entries(redis: Redis) -> int:
    config = await redis.config_get("stream-node-max-entries")
    value = config.get("stream-node-max-entries") or config.get(b"stream-node-max-entries")
    return int(value) if value else 100


async def test_publishing_beyond_maxlen_keeps_the_stream_bounded(redis, namespace, exchange_fixtures):
    maxlen = 100
    publisher = StreamPublisher(redis, namespace=namespace, maxlen=maxlen)
    key = publisher.stream_key(TICKS_STREAM)
    payload = recorded_ticks(exchange_fixtures)[0].to_stream()
    for _ in range(10):
        await publisher.publish_many(TICKS_STREAM, [payload] * 100)
    last_id = ""
    for _ in range(50):
        last_id = await publisher.publish(TICKS_STREAM, payload)

    length = await redis.xlen(key)
    # Approximate trimming drops whole stream nodes only, so up to one node's worth above maxlen remains.
    assert maxlen <= length <= maxlen + await stream_node_max_entries(redis)
    newest = await redis.xrevrange(key, count=1)
    assert newest[0][0].decode() == last_id


async def test_pending_entries_trimmed_away_before_reclaim_do_not_stall_the_group(pricing, exchange_fixtures, db):
    ticks = recorded_ticks(exchange_fixtures)
    small = StreamPublisher(pricing.redis, namespace=pricing.settings.redis_namespace, maxlen=100)
    survivor = pricing.consumer("survivor")
    await survivor.ensure_group()
    await small.publish_many(TICKS_STREAM, [t.to_stream() for t in ticks])
    response = await pricing.redis.xreadgroup(GROUP, "dead", {pricing.ticks_key: ">"}, count=100)
    lost_ids = [entry_id for entry_id, _ in response[0][1]]
    # Many more entries push the dead consumer's entries out of the capped stream.
    await small.publish_many(TICKS_STREAM, [t.to_stream() for t in ticks] * 60)
    assert await pricing.redis.xrange(pricing.ticks_key, min=lost_ids[0], max=lost_ids[-1]) == []
    last_id = await pricing.last_entry_id()

    async def caught_up() -> bool:
        await survivor.step()
        return await pricing.pending() == 0 and await pricing.last_delivered() == last_id

    await eventually(caught_up, timeout=10, interval=0.05)
    assert await pricing.dead_letters() == []
    # Counted as lost, not silently dropped; the same on Redis 6.2, 7.x and Valkey.
    assert survivor.lost == len(lost_ids)
    assert sorted(await stored_tick_ids(db)) == sorted(t.tick_id for t in ticks)
