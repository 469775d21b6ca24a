"""From a price entering the prices stream to the webhook it fires arriving at a local receiver, with
100,000 active rules loaded, through the real alerting service (evaluator, stored event, arq delivery job,
signed POST).

Baseline, in the same run over the same Redis and receiver: the floor of that path with no logic: a bare
consumer-group reader that takes each entry off the stream and POSTs it to the receiver.

Target (issue 10): p50 under 20 ms, p99 under 100 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
from aiohttp import web
from redis.asyncio import Redis
from sqlalchemy.engine import make_url

from bench.common import Figure, bench_settings, scratch_database
from services.alerting.app import create_app
from services.alerting.evaluation import EvaluationService
from shared.streams import PRICES_STREAM, StreamPublisher

THRESHOLD = 100_000


class Receiver:
    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}
        self.waiters: dict[str, asyncio.Future[float]] = {}
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def handle(self, request: web.Request) -> web.Response:
        at = time.perf_counter()
        body = await request.json()
        key = str(body.get("data", {}).get("price") or body.get("price"))
        waiter = self.waiters.pop(key, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(at)
        return web.Response(status=204)

    def expect(self, price: str) -> asyncio.Future[float]:
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.waiters[price] = future
        return future

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return f"http://127.0.0.1:{self.port}/hook"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def _price(value: str) -> dict[str, Any]:
    now = datetime.now(UTC)
    return {
        "event_id": uuid.uuid4().hex,
        "base": "BTC",
        "vs": "USD",
        "price": value,
        "status": "fresh",
        "sources_used": 3,
        "sources_total": 3,
        "method": "median",
        "last_updated": now.isoformat(),
        "fresh_until": (now + timedelta(seconds=30)).isoformat(),
        "spread_pct": "0.05",
    }


async def _seed(url: str, hook: str, rules: int) -> None:
    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    conn = await asyncpg.connect(dsn)
    try:
        user = uuid.uuid4()
        await conn.execute("INSERT INTO coins (symbol, name, active) VALUES ('BTC', 'Bitcoin', true)")
        await conn.execute("INSERT INTO users (id, email, password_hash) VALUES ($1, 'bench@example.com', 'x')", user)
        now = datetime.now(UTC)
        channel = f'[{{"type": "webhook", "url": "{hook}", "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}}]'
        # One probe the walk crosses every round; the rest far away (other users' levels), never crossed.
        rows = [(uuid.uuid4(), user, "BTC", "USD", "above", THRESHOLD, channel, 0, now, now)]
        for i in range(rules - 1):
            level = 20_000 + (i % 60_000) if i % 2 else 150_000 + (i % 90_000)
            rows.append((uuid.uuid4(), user, "BTC", "USD", "above" if i % 3 else "below", level, channel, 0, now, now))
        await conn.copy_records_to_table(
            "alerts",
            records=rows,
            columns=[
                "id", "user_id", "symbol", "vs", "condition", "threshold", "channels", "cooldown_seconds",
                "created_at", "updated_at",
            ],
        )  # fmt: skip
    finally:
        await conn.close()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _through_alerting(url: str, redis_url: str, rounds: int, rules: int) -> list[float]:
    receiver = Receiver()
    hook = await receiver.start()
    await _seed(url, hook, rules)
    settings = bench_settings(url, redis_url, webhook_allow_private=True)
    app = create_app(settings)
    redis = Redis.from_url(redis_url)
    publisher = StreamPublisher(redis, namespace=settings.redis_namespace, maxlen=100_000)
    latencies: list[float] = []
    try:
        async with app.router.lifespan_context(app):
            evaluation: EvaluationService = app.state.evaluation
            for _ in range(600):
                if evaluation.leading and len(evaluation.engine.rules) == rules:
                    break
                await asyncio.sleep(0.1)
            await publisher.publish(PRICES_STREAM, _price("99000"))
            for i in range(rounds):
                await publisher.publish(PRICES_STREAM, _price("99000"))  # below again: re-arms the probe
                await asyncio.sleep(0.02)
                value = f"{101_000 + i}"
                arrival = receiver.expect(value)
                sent = time.perf_counter()
                await publisher.publish(PRICES_STREAM, _price(value))
                latencies.append((await asyncio.wait_for(arrival, timeout=30) - sent) * 1000)
    finally:
        await redis.aclose()
        await receiver.stop()
    return latencies


async def _floor(redis_url: str, rounds: int) -> list[float]:
    """The same trip with no logic: XADD, a bare XREADGROUP reader, a POST to the receiver."""
    receiver = Receiver()
    hook = await receiver.start()
    redis = Redis.from_url(redis_url)
    stream = f"bench-floor-{uuid.uuid4().hex[:8]}"
    await redis.xgroup_create(stream, "g", id="0", mkstream=True)
    stop = asyncio.Event()

    async def reader(session: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            reply = await redis.xreadgroup("g", "c", {stream: ">"}, count=100, block=200)
            for _name, entries in reply or []:
                for entry_id, fields in entries:
                    async with session.post(hook, data=fields[b"data"]) as response:
                        await response.read()
                    await redis.xack(stream, "g", entry_id)

    latencies: list[float] = []
    async with aiohttp.ClientSession() as session:
        task = asyncio.create_task(reader(session))
        try:
            for i in range(rounds):
                value = f"{101_000 + i}"
                arrival = receiver.expect(value)
                sent = time.perf_counter()
                await redis.xadd(stream, {"data": json.dumps({"price": value})})
                latencies.append((await asyncio.wait_for(arrival, timeout=30) - sent) * 1000)
                await asyncio.sleep(0.02)
        finally:
            stop.set()
            with contextlib.suppress(Exception):
                await task
            await redis.delete(stream)
            await redis.aclose()
            await receiver.stop()
    return latencies


async def run(*, database_url: str, redis_url: str, quick: bool, **_: Any) -> list[Figure]:
    rounds = 50 if quick else 300
    rules = 10_000 if quick else 100_000
    async with scratch_database(database_url) as url:
        measured = await _through_alerting(url, redis_url, rounds, rules)
    floor = await _floor(redis_url, rounds)
    label = f"{rules:,} rules"
    return [
        Figure(
            f"price -> webhook received, p50, {label}", _percentile(measured, 0.5), "ms",
            baseline_name="stream -> bare reader -> POST, p50", baseline_value=_percentile(floor, 0.5),
            target="< 20 ms",
        ),
        Figure(
            f"price -> webhook received, p99, {label}", _percentile(measured, 0.99), "ms",
            baseline_name="stream -> bare reader -> POST, p99", baseline_value=_percentile(floor, 0.99),
            target="< 100 ms",
        ),
    ]  # fmt: skip
