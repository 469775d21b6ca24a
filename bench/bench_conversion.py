"""Conversions per second through the gateway, and p99 latency at 500 requests/s, beside the gateway's bare
/healthz measured the same way in the same run (target: at least 0.5 of its throughput).

The gateway and the conversion service run as separate processes on real uvicorn on 127.0.0.1 (as in
production, each has its own core to use); the load generator is this process (aiohttp, bounded
concurrency for throughput, an open-loop schedule for latency so slow answers are not hidden).
Rates come from recorded Binance tickers and the recorded ECB daily file, stored directly in PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import aiohttp
import asyncpg
from sqlalchemy.engine import make_url

from bench.common import Figure, scratch_database, service_process, wait_ok
from shared.embedded import free_port

ROOT = Path(__file__).resolve().parents[1]
QUERIES = [
    "/api/v1/convert?from=BTC&to=EUR&amount=1.5",
    "/api/v1/convert?from=USD&to=JPY&amount=250",
    "/api/v1/convert?from=ETH&to=GBP&amount=3",
    "/api/v1/convert?from=JPY&to=ETH&amount=10000",
    "/api/v1/convert?from=ETH&to=BTC&amount=2",
    "/api/v1/convert?from=EUR&to=USD&amount=99.99",
]
CONCURRENCY = 64
TARGET_RATE = 500


def _fixtures() -> Path:
    configured = os.environ.get("COINLYTICS_FIXTURES_DIR")
    return Path(configured) if configured else ROOT.parent / "shared" / "fixtures" / "exchanges"


async def _seed(database_url: str) -> None:
    from services.conversion.ecb import parse

    fixtures = _fixtures()
    rows = json.loads((fixtures / "binance" / "rec_api_v1_ticker_24hr_ALL_2019-08-22.json").read_text())
    wanted = {"BTCUSDT": ("BTC", "USD"), "ETHUSDT": ("ETH", "USD"), "ETHBTC": ("ETH", "BTC")}
    ecb = parse((fixtures / "ecb" / "eurofxref-daily_2025-05-09.xml").read_bytes())
    now = datetime.now(UTC)
    conn = await asyncpg.connect(make_url(database_url).set(drivername="postgresql").render_as_string(False))
    try:
        for row in rows:
            if row["symbol"] in wanted:
                base, vs = wanted[row["symbol"]]
                await conn.execute(
                    # Fresh for the whole run: no source feeds these, so nothing else would vouch for them, and
                    # a price past its fresh_until reads as stale (a conversion then answers 503).
                    "INSERT INTO prices (base, vs, price, volume_24h, status, sources_used, sources_total, method,"
                    " last_updated, fresh_until) VALUES ($1, $2, $3, $4, 'fresh', 1, 1, 'vwap-mad2.5', $5, $6)",
                    base, vs, Decimal(row["lastPrice"]), Decimal(row["volume"]), now, now + timedelta(days=1),
                )  # fmt: skip
        for day, rates in ecb.days.items():
            for currency, rate in rates.items():
                await conn.execute(
                    "INSERT INTO fiat_rates (currency, day, per_eur, source, fetched_at)"
                    " VALUES ($1, $2, $3, 'ecb', $4)",
                    currency, day, rate, now,
                )  # fmt: skip
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def _platform(database_url: str, redis_url: str) -> AsyncIterator[str]:
    conversion_port, gateway_port = free_port(), free_port()
    env = {
        **os.environ,
        "COINLYTICS_ENV": "test",
        "COINLYTICS_DATABASE_URL": database_url,
        "COINLYTICS_REDIS_URL": redis_url,
        "COINLYTICS_REDIS_NAMESPACE": f"bench-{secrets.token_hex(4)}",
        "COINLYTICS_JWT_SECRET": secrets.token_urlsafe(48),
        "COINLYTICS_HMAC_KEY": secrets.token_urlsafe(48),
        "COINLYTICS_SOURCES": "binance",  # no ECB fetch: its rates are seeded
        "COINLYTICS_CONVERSION_URL": f"http://127.0.0.1:{conversion_port}",
        "COINLYTICS_GATEWAY_PORT": str(gateway_port),
        "COINLYTICS_LOG_LEVEL": "WARNING",
        # Anonymous per-IP limits would throttle a one-client load test; the limiter's cost is still paid.
        "COINLYTICS_RATE_LIMIT_ANONYMOUS": "1000000000",
        "COINLYTICS_RATE_LIMIT_USER": "1000000000",
    }
    gateway_url = f"http://127.0.0.1:{gateway_port}"
    with service_process("services.conversion", env) as conversion, service_process("services.gateway", env) as gateway:
        async with aiohttp.ClientSession() as session:
            await wait_ok(session, f"http://127.0.0.1:{conversion_port}/healthz", conversion)
            await wait_ok(session, gateway_url + "/healthz", gateway)
            await wait_ok(session, gateway_url + QUERIES[0], gateway)
        yield gateway_url


async def _throughput(base: str, paths: list[str], seconds: float) -> tuple[float, int]:
    """Requests per second with CONCURRENCY requests in flight; also the count of non-200 answers."""
    done = 0
    failed = 0
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(base_url=base, connector=connector) as session:
        deadline = time.perf_counter() + seconds

        async def worker(offset: int) -> None:
            nonlocal done, failed
            i = offset
            while time.perf_counter() < deadline:
                async with session.get(paths[i % len(paths)]) as response:
                    await response.read()
                    if response.status == 200:
                        done += 1
                    else:
                        failed += 1
                i += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(CONCURRENCY)))
        elapsed = time.perf_counter() - started
    return done / elapsed, failed


async def _latency_at(base: str, paths: list[str], rate: int, seconds: float) -> tuple[float, float, int]:
    """Open loop: requests start on a fixed schedule; latency counts from the scheduled start, so a stalled
    server cannot hide its queue. Returns p50 and p99 in ms and the count of non-200 answers."""
    latencies: list[float] = []
    failed = 0
    connector = aiohttp.TCPConnector(limit=1000)
    async with aiohttp.ClientSession(base_url=base, connector=connector) as session:

        async def one(path: str, scheduled: float) -> None:
            nonlocal failed
            async with session.get(path) as response:
                await response.read()
                if response.status != 200:
                    failed += 1
            latencies.append(time.perf_counter() - scheduled)

        tasks = []
        start = time.perf_counter()
        total = int(rate * seconds)
        for i in range(total):
            scheduled = start + i / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(paths[i % len(paths)], scheduled)))
        await asyncio.gather(*tasks)
    latencies.sort()
    p50 = latencies[len(latencies) // 2] * 1000
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000
    return p50, p99, failed


async def run(*, database_url: str, redis_url: str, quick: bool) -> list[Figure]:
    seconds = 3.0 if quick else 15.0
    async with scratch_database(database_url) as db:
        await _seed(db)
        async with _platform(db, redis_url) as gateway:
            # Warm both paths (connection pools, route memo) before measuring.
            await _throughput(gateway, ["/healthz"], 1.0)
            await _throughput(gateway, QUERIES, 1.0)
            health_rps, health_failed = await _throughput(gateway, ["/healthz"], seconds)
            convert_rps, convert_failed = await _throughput(gateway, QUERIES, seconds)
            h50, h99, h_failed = await _latency_at(gateway, ["/healthz"], TARGET_RATE, seconds)
            c50, c99, c_failed = await _latency_at(gateway, QUERIES, TARGET_RATE, seconds)
    if health_failed or convert_failed or h_failed or c_failed:
        print(f"   non-200 answers: healthz {health_failed}+{h_failed}, convert {convert_failed}+{c_failed}")
    print(f"   p50 at {TARGET_RATE}/s: convert {c50:.1f} ms, healthz {h50:.1f} ms")
    return [
        Figure(
            "conversion: conversions/s through the gateway",
            convert_rps,
            "req/s",
            baseline_name="gateway bare /healthz, same run",
            baseline_value=health_rps,
            target=">= 0.5 x baseline",
        ),
        Figure(
            f"conversion: p99 latency at {TARGET_RATE} req/s",
            c99,
            "ms",
            baseline_name=f"gateway /healthz p99 at {TARGET_RATE} req/s",
            baseline_value=h99,
        ),
    ]
