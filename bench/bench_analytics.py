"""Comparing 20 coins over one year of 1-minute candles (about 10.5 million rows, generated into the benchmark
database with the hourly and daily roll-ups the platform keeps), at daily and at hourly resolution.

Each figure is the endpoint's wall time (the analytics app over HTTP in this process: validation, one query,
pandas statistics, JSON) beside the bare SQL read of the same aggregated rows with asyncpg in the same run;
and the cached repeat.

Targets (issue 11): under 1.5 s, at most 2x the bare read; a cached repeat under 20 ms.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import numpy as np
from sqlalchemy.engine import make_url

from bench.common import Figure, bench_settings, scratch_database
from services.analytics.app import create_app
from services.pricing.history.repository import candle_floats_sql

COINS = ["BTC", "ETH", "SOL", "XRP", "ADA", "DOGE", "LTC", "DOT", "LINK", "AVAX",
         "BNB", "TRX", "MATIC", "ATOM", "XLM", "ETC", "FIL", "APT", "NEAR", "UNI"]  # fmt: skip
END = datetime(2026, 11, 1, tzinfo=UTC)
COLUMNS = ["base", "vs", "interval", "t", "open", "high", "low", "close", "volume", "source"]


def _walk(minutes: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return 100.0 * np.exp(np.cumsum(rng.normal(0, 0.0008, minutes)))


def _rows(symbol: str, interval: str, times: list[datetime], closes: np.ndarray, source: str) -> list[tuple[Any, ...]]:
    return [
        (symbol, "USD", interval, t, float(c), float(c) * 1.0005, float(c) * 0.9995, float(c), 1.0, source)
        for t, c in zip(times, closes, strict=True)
    ]


async def _generate(url: str, days: int) -> int:
    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    conn = await asyncpg.connect(dsn)
    total = 0
    try:
        await conn.executemany("INSERT INTO coins (symbol, name, active) VALUES ($1, $1, true)", [(c,) for c in COINS])
        start = END - timedelta(days=days)
        minutes = days * 1440
        minute_times = [start + timedelta(minutes=i) for i in range(minutes)]
        hour_times = minute_times[::60]
        day_times = minute_times[::1440]
        for index, symbol in enumerate(COINS):
            closes = _walk(minutes, index)
            await conn.copy_records_to_table(
                "candles", records=_rows(symbol, "1m", minute_times, closes, "consolidated"), columns=COLUMNS
            )
            # What the roll-up job keeps (services/pricing/history): hourly and daily candles.
            hourly = closes.reshape(-1, 60)[:, -1]
            daily = closes.reshape(-1, 1440)[:, -1]
            await conn.copy_records_to_table(
                "candles", records=_rows(symbol, "1h", hour_times, hourly, "rollup"), columns=COLUMNS
            )
            await conn.copy_records_to_table(
                "candles", records=_rows(symbol, "1d", day_times, daily, "rollup"), columns=COLUMNS
            )
            total += minutes
        await conn.execute("ANALYZE candles")
    finally:
        await conn.close()
    return total


async def _bare(url: str, interval: str, lo: datetime, hi: datetime) -> float:
    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    # The platform's own connection settings (shared/db.py create_engine: no JIT).
    conn = await asyncpg.connect(dsn, server_settings={"jit": "off"})
    try:
        # The same statement the endpoint runs.
        sql = candle_floats_sql(interval)
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            await conn.fetch(sql, COINS, "USD", lo, hi)
            best = min(best, time.perf_counter() - started)
        return best
    finally:
        await conn.close()


async def run(*, database_url: str, redis_url: str, quick: bool, **_: Any) -> list[Figure]:
    days = 30 if quick else 365
    figures: list[Figure] = []
    async with scratch_database(database_url) as url:
        started = time.perf_counter()
        rows = await _generate(url, days)
        print(f"   generated {rows:,} 1-minute candles in {time.perf_counter() - started:.0f}s", flush=True)
        settings = bench_settings(url, redis_url, analytics_max_points=20_000, internal_auth_required=False)
        app = create_app(settings)
        lo, hi = END - timedelta(days=days), END
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://analytics", timeout=120) as client:
                for interval in ("1d", "1h"):
                    params = {"symbols": ",".join(COINS), "vs": "USD", "start": lo.isoformat(),
                              "end": hi.isoformat(), "interval": interval}  # fmt: skip
                    walls = []
                    for attempt in range(3):
                        # A different risk-free rate each time: the same computation, never a cache hit.
                        started = time.perf_counter()
                        response = await client.get(
                            "/api/v1/analytics/compare", params={**params, "risk_free_rate": str(attempt / 100)}
                        )
                        walls.append(time.perf_counter() - started)
                        if response.status_code != 200 or response.headers["x-cache"] != "miss":
                            raise RuntimeError(f"compare failed: {response.status_code} {response.text[:300]}")
                    started = time.perf_counter()
                    cached = await client.get("/api/v1/analytics/compare", params={**params, "risk_free_rate": "0.0"})
                    hit = time.perf_counter() - started
                    if cached.headers["x-cache"] != "hit":
                        raise RuntimeError("the repeat was not served from the cache")
                    bare = await _bare(url, interval, lo, hi)
                    label = f"compare 20 coins, {days} days, {interval}"
                    figures += [
                        Figure(
                            label, min(walls) * 1000, "ms", baseline_name="bare SQL read of the same rows",
                            baseline_value=bare * 1000, target="< 1500 ms and <= 2x the bare read",
                        ),
                        Figure(f"{label}, cached repeat", hit * 1000, "ms", target="< 20 ms"),
                    ]  # fmt: skip
    return figures
