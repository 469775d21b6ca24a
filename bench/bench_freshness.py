"""Freshness and memory under websocket load.

Four local websocket servers replay the recorded ticker traffic of Binance, Coinbase, OKX and Kraken in a
loop at 1,000 messages/s in all (each frame's exchange time restamped to the moment it is sent, so the
replayed quotes are new). The real ingest and pricing services run as their own processes, as under
`make run`. A reader asks pricing for the consolidated prices every 50 ms and records their age at read
time (read time minus the arrival time of the newest quote used).

Baselines in the same run: for freshness, the age of the same frames at a bare websocket client in the
bench process (the transport's floor); for memory, each service's resident size right after startup.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psutil
from aiohttp import ClientSession, WSMsgType, web

from bench.common import Figure, scratch_database
from shared.embedded import free_port
from shared.timeparse import iso_z

FIXTURES = Path(
    os.environ.get("COINLYTICS_FIXTURES_DIR", Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "exchanges")
)
RECORDINGS = {
    "binance": "binance/rec_ws_combined_bookTicker_all.ndjson",
    "coinbase": "coinbase/rec_ws_ticker_all.ndjson",
    "okx": "okx/rec_ws_v5_public_tickers_all.ndjson",
    "kraken": "kraken/rec_ws_v1_ticker_all.ndjson",
}
COINS = ["BTC", "SKL", "NKN", "XMR", "DASH", "BAND"]
TOTAL_RATE = 1000.0


def restamp(source: str, frame: str, now: datetime) -> str:
    """The recorded frame with its exchange time moved to ``now`` (other fields untouched)."""
    message = json.loads(frame)
    if source == "coinbase" and isinstance(message, dict) and "time" in message:
        message["time"] = iso_z(now)
    elif source == "okx" and isinstance(message, dict):
        for item in message.get("data", []):
            item["ts"] = str(int(now.timestamp() * 1000))
    return json.dumps(message, separators=(",", ":"))


class LoopingFeed:
    """Plays one exchange's recorded frames forever at ``rate`` frames/s to every subscriber."""

    def __init__(self, source: str, frames: list[str], rate: float) -> None:
        self.source = source
        self.frames = [f for f in frames if f.strip()]
        self.rate = rate
        self.sent = 0
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        player = asyncio.create_task(self._play(ws))
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT and msg.data in ("ping", '{"event":"ping"}'):
                    await ws.send_str("pong" if msg.data == "ping" else '{"event":"pong"}')
        finally:
            player.cancel()
        return ws

    async def _play(self, ws: web.WebSocketResponse) -> None:
        # Paced by the clock, not by sleep counts: a busy loop oversleeps, and the rate must still hold.
        started = time.monotonic()
        played = 0
        index = 0
        while not ws.closed:
            due = int((time.monotonic() - started) * self.rate)
            while played < due and not ws.closed:
                frame = self.frames[index % len(self.frames)]
                index += 1
                await ws.send_str(restamp(self.source, frame, datetime.now(UTC)))
                self.sent += 1
                played += 1
            await asyncio.sleep(0.005)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"ws://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()


async def transport_floor(feed: LoopingFeed, seconds: float) -> list[float]:
    """Ages of Coinbase frames (they carry their send time) at a bare client: the floor of freshness."""
    ages: list[float] = []
    async with ClientSession() as session, session.ws_connect(feed.url + "/") as ws:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            msg = await ws.receive(timeout=seconds)
            if msg.type != WSMsgType.TEXT:
                break
            sent = json.loads(msg.data).get("time")
            if sent:
                ages.append((datetime.now(UTC) - datetime.fromisoformat(sent.replace("Z", "+00:00"))).total_seconds())
    return ages


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def _wait_ready(url: str, limit_seconds: float = 60.0) -> None:
    deadline = time.monotonic() + limit_seconds
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(url + "/readyz")).status_code == 200:
                    return
            await asyncio.sleep(0.25)
    raise RuntimeError(f"{url} did not become ready")


async def run(*, database_url: str, redis_url: str, quick: bool) -> list[Figure]:
    if not await asyncio.to_thread(FIXTURES.is_dir):
        print(f"   skipped: recorded fixtures not found at {FIXTURES}")
        return []
    seconds = 20.0 if quick else 600.0
    feeds = {
        name: LoopingFeed(name, (FIXTURES / path).read_text().splitlines(), TOTAL_RATE / len(RECORDINGS))
        for name, path in RECORDINGS.items()
    }
    for feed in feeds.values():
        await feed.start()
    processes: list[asyncio.subprocess.Process] = []
    try:
        async with scratch_database(database_url) as db_url:
            ports = {"ingest": free_port(), "pricing": free_port()}
            env = {k: v for k, v in os.environ.items() if not k.startswith("COINLYTICS_")}
            env.update(
                {
                    "COINLYTICS_ENV": "test",
                    "COINLYTICS_DATABASE_URL": db_url,
                    "COINLYTICS_REDIS_URL": redis_url,
                    "COINLYTICS_REDIS_NAMESPACE": f"bench-fresh-{secrets.token_hex(4)}",
                    "COINLYTICS_JWT_SECRET": secrets.token_urlsafe(48),
                    "COINLYTICS_HMAC_KEY": secrets.token_urlsafe(48),
                    "COINLYTICS_SOURCES": ",".join(RECORDINGS),
                    "COINLYTICS_COINS": ",".join(COINS),
                    "COINLYTICS_INGEST_URL": f"http://127.0.0.1:{ports['ingest']}",
                    "COINLYTICS_PRICING_URL": f"http://127.0.0.1:{ports['pricing']}",
                    "COINLYTICS_LOG_LEVEL": "WARNING",
                    "COINLYTICS_INTERNAL_AUTH_REQUIRED": "false",
                }
            )
            for name, feed in feeds.items():
                env[f"COINLYTICS_SOURCE_{name.upper()}_WS_URL"] = feed.url
                # Markets come from REST; a closed local port makes that fail fast instead of waiting on DNS.
                env[f"COINLYTICS_SOURCE_{name.upper()}_REST_URL"] = "http://127.0.0.1:9"
            for service in ("pricing", "ingest"):
                processes.append(
                    await asyncio.create_subprocess_exec(
                        sys.executable, "-m", f"services.{service}", env=env, stdout=asyncio.subprocess.DEVNULL
                    )
                )
            pricing_url = f"http://127.0.0.1:{ports['pricing']}"
            await _wait_ready(pricing_url)
            await _wait_ready(f"http://127.0.0.1:{ports['ingest']}")
            rss_start = {
                s: psutil.Process(p.pid).memory_info().rss
                for s, p in zip(("pricing", "ingest"), processes, strict=True)
            }
            floor = await transport_floor(feeds["coinbase"], min(10.0, seconds / 2))
            ages: list[float] = []
            rss_samples: dict[str, list[int]] = {"pricing": [], "ingest": []}
            sent_before = sum(f.sent for f in feeds.values())
            started = time.monotonic()
            next_sample = started
            async with httpx.AsyncClient(base_url=pricing_url) as client:
                while time.monotonic() - started < seconds:
                    response = await client.get("/api/v1/prices", params={"symbols": ",".join(COINS), "vs": "USD"})
                    read_at = datetime.now(UTC)
                    if response.status_code == 200:
                        for per_vs in response.json().values():
                            for entry in per_vs.values():
                                updated = datetime.fromisoformat(entry["last_updated"].replace("Z", "+00:00"))
                                ages.append((read_at - updated).total_seconds())
                    if time.monotonic() >= next_sample:
                        for name, process in zip(("pricing", "ingest"), processes, strict=True):
                            rss_samples[name].append(psutil.Process(process.pid).memory_info().rss)
                        next_sample += 10
                    await asyncio.sleep(0.05)
            sent = sum(f.sent for f in feeds.values()) - sent_before
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), timeout=15)
        for feed in feeds.values():
            await feed.stop()
    if not ages:
        raise RuntimeError("no consolidated price was read during the run")
    mib = 1024 * 1024
    figures = [
        Figure("replayed websocket messages/s", sent / seconds, "msg/s", target="1,000"),
        Figure(
            "price age at read, median",
            statistics.median(ages) * 1000,
            "ms",
            "frame age at a bare ws client, median",
            statistics.median(floor) * 1000 if floor else None,
            "< 250 ms",
        ),
        Figure(
            "price age at read, p99",
            percentile(ages, 99) * 1000,
            "ms",
            "frame age at a bare ws client, p99",
            percentile(floor, 99) * 1000 if floor else None,
            "< 1,000 ms",
        ),
    ]
    for name in ("ingest", "pricing"):
        samples = rss_samples[name] or [rss_start[name]]
        first_minute = samples[min(len(samples) - 1, 6)]
        figures.append(
            Figure(
                f"{name} RSS at end of run",
                samples[-1] / mib,
                "MiB",
                "RSS right after startup",
                rss_start[name] / mib,
                "< 200 MiB",
            )
        )
        figures.append(
            Figure(
                f"{name} RSS growth after the first minute",
                (samples[-1] - first_minute) / mib,
                "MiB",
                target="~0 (no growth)",
            )
        )
    return figures
