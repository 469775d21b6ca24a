"""Pipeline throughput: ticks per second from a parsed exchange message to a stored tick, an updated
consolidation (and candle, where the history hook is present) and a published price event.

Baseline, measured in the same run on the same rows: redis-py pipelined XADD, XREADGROUP, XACK, and an
asyncpg COPY of the rows into a plain table, with no logic at all.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
from redis.asyncio import Redis
from sqlalchemy.engine import make_url

from bench.common import Figure, bench_settings, scratch_database
from services.pricing.consumers import tick_consumer
from services.pricing.service import PriceCache, PricingService
from shared.db import create_engine, session_factory
from shared.messages import TickMessage
from shared.streams import TICKS_STREAM, StreamPublisher, encode

BATCH = 1000
COINS = ["BTC", "ETH", "LTC", "XRP", "ADA", "DOGE", "LINK", "DOT", "SOL", "AVAX"]
SOURCES = ["binance", "kraken", "coinbase", "bitstamp", "okx", "kucoin", "gemini"]


def _recorded_prices() -> dict[str, Decimal]:
    """Starting prices from the recorded Binance ticker list, where the fixtures are present."""
    root = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "exchanges"
    path = root / "binance" / "rec_api_v1_ticker_24hr_ALL_2019-08-22.json"
    prices = {c: Decimal(1) for c in COINS}
    if path.exists():
        for row in json.loads(path.read_text()):
            base = row["symbol"].removesuffix("USDT")
            if row["symbol"].endswith("USDT") and base in prices:
                prices[base] = Decimal(row["lastPrice"])
    return prices


def make_ticks(count: int, start: datetime) -> list[dict[str, Any]]:
    prices = _recorded_prices()
    ticks = []
    for i in range(count):
        coin = COINS[i % len(COINS)]
        source = SOURCES[(i // len(COINS)) % len(SOURCES)]
        ts = start + timedelta(milliseconds=i)
        price = prices[coin] * (1 + Decimal((i % 17) - 8) / 10_000)
        ticks.append(
            TickMessage(
                tick_id=f"{source}:{coin}USDT:{i}",
                source=source,
                base=coin,
                quote="USD",
                pair=f"{coin}USD",
                price=price,
                bid=price,
                ask=price,
                volume_24h=Decimal(1000 + i % 100),
                exchange_ts=ts,
                received_at=ts,
                transport="ws",
            ).to_stream()
        )
    return ticks


async def baseline(redis: Redis, dsn: str, rows: list[dict[str, Any]], seconds: float, ns: str) -> float:
    stream = f"{ns}:baseline"
    await redis.xgroup_create(stream, "g", id="0", mkstream=True)
    conn = await asyncpg.connect(dsn)
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS bench_baseline (tick_id text, source text, base text, quote text, "
        "price numeric, volume numeric, exchange_ts timestamptz, received_at timestamptz)"
    )
    done = 0
    offset = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        batch = [rows[(offset + j) % len(rows)] for j in range(BATCH)]
        offset += BATCH
        async with redis.pipeline(transaction=False) as pipe:
            for row in batch:
                pipe.xadd(stream, encode(row), maxlen=200_000, approximate=True)
            await pipe.execute()
        response = await redis.xreadgroup("g", "c", {stream: ">"}, count=BATCH)
        entries = response[0][1]
        records = []
        for _entry_id, fields in entries:
            data = json.loads(fields[b"data"])
            records.append(
                (
                    data["tick_id"],
                    data["source"],
                    data["base"],
                    data["quote"],
                    Decimal(data["price"]),
                    Decimal(data["volume_24h"]),
                    datetime.fromisoformat(data["exchange_ts"]),
                    datetime.fromisoformat(data["received_at"]),
                )
            )
        await conn.copy_records_to_table("bench_baseline", records=records)
        await redis.xack(stream, "g", *[e[0] for e in entries])
        done += len(entries)
    elapsed = time.perf_counter() - started
    await conn.close()
    await redis.delete(stream)
    return done / elapsed


async def pipeline(
    redis: Redis, database_url: str, redis_url: str, rows: list[dict[str, Any]], seconds: float
) -> float:
    settings = bench_settings(database_url, redis_url, stream_batch_size=BATCH, coins=COINS)
    engine = create_engine(database_url)
    publisher = StreamPublisher(redis, namespace=settings.redis_namespace, maxlen=200_000)
    service = PricingService(
        settings, sessions=session_factory(engine), publisher=publisher, cache=PriceCache(redis, settings)
    )
    consumer = tick_consumer(redis, settings, service, consumer="bench")
    consumer.block_ms = 50
    await consumer.ensure_group()
    offset = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        # Ids must be new each round, or the idempotent store would (rightly) skip them.
        batch = []
        for j in range(BATCH):
            row = dict(rows[(offset + j) % len(rows)])
            row["tick_id"] = f"{row['tick_id']}:{offset + j}"
            batch.append(row)
        offset += BATCH
        await publisher.publish_many(TICKS_STREAM, batch)
        await consumer.step()
    elapsed = time.perf_counter() - started
    processed = consumer.processed
    await engine.dispose()
    return processed / elapsed


async def run(*, database_url: str, redis_url: str, quick: bool) -> list[Figure]:
    seconds = 5.0 if quick else 60.0
    rows = make_ticks(50_000, datetime.now(UTC))
    redis = Redis.from_url(redis_url)
    try:
        async with scratch_database(database_url) as db_url:
            dsn = make_url(db_url).set(drivername="postgresql").render_as_string(hide_password=False)
            base_rate = await baseline(redis, dsn, rows, seconds, ns=f"bench-baseline-{time.time_ns()}")
            rate = await pipeline(redis, db_url, redis_url, rows, seconds)
    finally:
        await redis.aclose()
    return [
        Figure(
            name=f"pipeline ticks/s (sustained {seconds:.0f}s)",
            value=rate,
            unit="ticks/s",
            baseline_name="XADD+XREADGROUP+COPY, no logic",
            baseline_value=base_rate,
            target=">= 30,000/s and >= 0.4 x baseline",
        )
    ]


if __name__ == "__main__":
    import sys

    from bench.common import servers

    with servers(Path("/tmp/coinlytics-bench")) as (db, rd):
        figures = asyncio.run(run(database_url=db, redis_url=rd, quick="--quick" in sys.argv))
    for f in figures:
        print(f)
