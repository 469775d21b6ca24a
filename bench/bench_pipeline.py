"""Pipeline throughput: ticks per second from a parsed exchange message to a stored tick, an updated
consolidation (and candle, where the history hook is present) and a published price event.

Baseline, measured in the same run on the same rows: redis-py pipelined XADD, XREADGROUP, XACK, and an
asyncpg COPY of the rows into a plain table, with no logic at all.

Also, in the same run: two pricing shards (COINLYTICS_PRICING_SHARDS=2), each its own process reading its own
``ticks.<shard>`` stream with its half of the coins, against the same database, started together; the figure is
their summed rate. The gain over one shard is bounded by the machine's cores (reported with the figure), since
PostgreSQL, Redis and the bench share them.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
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
from shared.sharding import owned, ticks_stream
from shared.streams import StreamPublisher, encode

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
    redis: Redis,
    database_url: str,
    redis_url: str,
    rows: list[dict[str, Any]],
    seconds: float,
    *,
    shard: int = 0,
    shards: int = 1,
    namespace: str | None = None,
    start_at: float | None = None,
) -> float:
    """One pricing shard's rate: publish a batch of its coins' ticks to its stream, consume it, repeat."""
    overrides: dict[str, object] = {"stream_batch_size": BATCH, "coins": COINS, "pricing_shards": shards}
    if namespace is not None:
        overrides["redis_namespace"] = namespace
    settings = bench_settings(database_url, redis_url, shard=str(shard), **overrides)
    mine = set(owned(COINS, shard, shards))
    rows = [r for r in rows if r["base"] in mine]
    stream = ticks_stream(shard, shards)
    engine = create_engine(database_url)
    publisher = StreamPublisher(redis, namespace=settings.redis_namespace, maxlen=200_000)
    service = PricingService(
        settings, sessions=session_factory(engine), publisher=publisher, cache=PriceCache(redis, settings)
    )
    consumer = tick_consumer(redis, settings, service, consumer=f"bench-{shard}")
    consumer.block_ms = 50
    await consumer.ensure_group()
    if start_at is not None:
        # Shards in other processes start on the same wall-clock instant, so their rates add up.
        await asyncio.sleep(max(start_at - time.time(), 0.0))
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
        await publisher.publish_many(stream, batch)
        await consumer.step()
    elapsed = time.perf_counter() - started
    processed = consumer.processed
    await engine.dispose()
    return processed / elapsed


def _shard_process(
    database_url: str, redis_url: str, rows: list[dict[str, Any]], seconds: float, shard: int, shards: int,
    namespace: str, start_at: float,
) -> float:  # fmt: skip
    async def main() -> float:
        redis = Redis.from_url(redis_url)
        try:
            return await pipeline(
                redis, database_url, redis_url, rows, seconds, shard=shard, shards=shards, namespace=namespace,
                start_at=start_at,
            )  # fmt: skip
        finally:
            await redis.aclose()

    return asyncio.run(main())


async def sharded_pipeline(database_url: str, redis_url: str, rows: list[dict[str, Any]], seconds: float) -> float:
    """Two pricing shards, one process each, on one database: their summed ticks/s."""
    import multiprocessing

    shards = 2
    namespace = f"bench-shards-{time.time_ns()}"
    # Time for both processes to start and connect before the common start.
    start_at = time.time() + 5.0
    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(max_workers=shards, mp_context=multiprocessing.get_context("spawn")) as pool:
        rates = await asyncio.gather(
            *(
                loop.run_in_executor(
                    pool, _shard_process, database_url, redis_url, rows, seconds, i, shards, namespace, start_at
                )
                for i in range(shards)
            )
        )
    redis = Redis.from_url(redis_url)
    try:
        keys = [k async for k in redis.scan_iter(match=f"{namespace}:*")]
        if keys:
            await redis.delete(*keys)
    finally:
        await redis.aclose()
    return sum(rates)


async def run(*, database_url: str, redis_url: str, quick: bool) -> list[Figure]:
    seconds = 5.0 if quick else 60.0
    rows = make_ticks(50_000, datetime.now(UTC))
    redis = Redis.from_url(redis_url)
    try:
        async with scratch_database(database_url) as db_url:
            dsn = make_url(db_url).set(drivername="postgresql").render_as_string(hide_password=False)
            base_rate = await baseline(redis, dsn, rows, seconds, ns=f"bench-baseline-{time.time_ns()}")
            rate = await pipeline(redis, db_url, redis_url, rows, seconds)
        # A fresh database, so the two shards start from the same empty tables the one shard did.
        async with scratch_database(database_url) as db_url:
            two_rate = await sharded_pipeline(db_url, redis_url, rows, seconds)
    finally:
        await redis.aclose()
    cores = os.cpu_count() or 1
    return [
        Figure(
            name=f"pipeline ticks/s (sustained {seconds:.0f}s)",
            value=rate,
            unit="ticks/s",
            baseline_name="XADD+XREADGROUP+COPY, no logic",
            baseline_value=base_rate,
            target=">= 30,000/s and >= 0.4 x baseline",
        ),
        Figure(
            name=f"pipeline ticks/s, two pricing shards (2 processes, {cores} cores)",
            value=two_rate,
            unit="ticks/s",
            baseline_name="one pricing shard, same run",
            baseline_value=rate,
            target=f"reported; the gain is bounded by {cores} cores shared with PostgreSQL and Redis",
        ),
    ]


if __name__ == "__main__":
    import sys

    from bench.common import servers

    with servers(Path("/tmp/coinlytics-bench")) as (db, rd):
        figures = asyncio.run(run(database_url=db, redis_url=rd, quick="--quick" in sys.argv))
    for f in figures:
        print(f)
