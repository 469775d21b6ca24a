"""Four misbehaving sources next to three healthy ones, through the real ingest, pricing and gateway processes.

Healthy: Coinbase, Bitstamp and Gemini replay their recorded BTC/USD tickers of 2017-10-03 (the only three
recordings of one market on one day), each answer re-stamped with the time of the request so the quotes are
current and every poll is a new tick. Misbehaving, each derived from a recording:

- garbage (kraken): its recorded market list, and for tickers its recorded ticker cut in half, with bytes
  flipped, reversed, or gzip-compressed without saying so, in turn;
- hang (kucoin): a server that accepts the connection, reads the request and never answers;
- flood (okx websocket): its recorded BTC-USDT ticker frames replayed in a loop as fast as the socket takes
  them, re-stamped, with a 1.8 MB frame (Binance's recorded market list) every few hundred;
- 10x off (binance REST): its recorded 24 h ticker list with the BTC rows re-priced to ten times Coinbase's
  recorded price.

Checked: the bad ones show it (garbage and hang down with the right error kind; the flood's huge frames counted
as malformed; the 10x quote and the flood's quotes marked ``outlier``), every consolidated price read during the
run lies within the healthy quotes' range and the last one equals their volume-weighted mean computed here from
the fixtures, the healthy sources' stored tick counts keep rising, and no service exits or answers a 5xx.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import itertools
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Context, Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import WSMsgType, web

from tests.accounts import bearer, register, tokens
from tests.reliability.platform import Platform, by_scale, samples
from tests.replay import ReplayServer
from tests.ws_replay import ndjson

HEALTHY = ("coinbase", "bitstamp", "gemini")
GARBAGE, HANG, FLOOD, TENX = "kraken", "kucoin", "okx", "binance"
SOURCES = (*HEALTHY, GARBAGE, HANG, FLOOD, TENX)


def _load(path: Path) -> Any:
    return json.loads(path.read_text())


def _iso_ms(now: datetime) -> str:
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}000Z"


@dataclass
class HealthyQuote:
    source: str
    price: Decimal
    volume: Decimal


def healthy_quotes(fixtures: Path) -> list[HealthyQuote]:
    """The three recorded BTC/USD quotes (last price and 24 h base volume, as the adapters read them)."""
    coinbase = _load(fixtures / "coinbase/rec_products_btc-usd_ticker_2017-10-03.json")
    bitstamp = _load(fixtures / "bitstamp/rec_api_v2_ticker_btcusd_2017-10-03.json")
    gemini = _load(fixtures / "gemini/rec_v1_pubticker_BTCUSD_2017-10-03.json")
    return [
        HealthyQuote("coinbase", Decimal(coinbase["price"]), Decimal(coinbase["volume"])),
        HealthyQuote("bitstamp", Decimal(bitstamp["last"]), Decimal(bitstamp["volume"])),
        HealthyQuote("gemini", Decimal(gemini["last"]), Decimal(gemini["volume"]["BTC"])),
    ]


def healthy_price(quotes: list[HealthyQuote]) -> Decimal:
    """The healthy sources' price alone, by the documented method (volume-weighted mean, 15 significant
    digits, half-even), computed here rather than by the platform's code."""
    weighted = sum((q.price * q.volume for q in quotes), Decimal(0))
    mean = Context(prec=28).divide(weighted, sum((q.volume for q in quotes), Decimal(0)))
    return Context(prec=15, rounding=ROUND_HALF_EVEN).plus(mean)


class Venues:
    """One replay server for every REST source (a path prefix each), whose time-stamped answers are renewed
    by ``refresh`` while the scenario runs."""

    def __init__(self, fixtures: Path) -> None:
        self.fixtures = fixtures
        self.replay = ReplayServer()
        self.coinbase = _load(fixtures / "coinbase/rec_products_btc-usd_ticker_2017-10-03.json")
        self.bitstamp = _load(fixtures / "bitstamp/rec_api_v2_ticker_btcusd_2017-10-03.json")
        self.gemini = _load(fixtures / "gemini/rec_v1_pubticker_BTCUSD_2017-10-03.json")
        self.binance_rows = _load(fixtures / "binance/rec_api_v1_ticker_24hr_ALL_2019-08-22.json")
        self.kraken_ticker = (fixtures / "kraken/rec_public_Ticker_BCHEUR_2017-10-03.json").read_bytes()
        self.tenx_price = Decimal(self.coinbase["price"]) * 10
        self.btc_rows = [r for r in self.binance_rows if r["symbol"].startswith("BTC")]
        self.recorded_btc = {id(r): dict(r) for r in self.btc_rows}
        # Until armed, Binance quotes Coinbase's recorded price (a fourth sound source); then ten times it.
        self._reprice_binance(Decimal(self.coinbase["price"]))
        self.garbage = itertools.cycle(garbled(self.kraken_ticker))
        self.refreshes = 0

    def url(self, name: str) -> str:
        return f"{self.replay.base_url}/{name}"

    def _reprice_binance(self, price: Decimal) -> None:
        """Binance's recorded BTC rows scaled so that BTCUSDT's last price is ``price``."""
        btc = next(r for r in self.btc_rows if r["symbol"] == "BTCUSDT")
        factor = price / Decimal(self.recorded_btc[id(btc)]["lastPrice"])
        price_fields = ("lastPrice", "bidPrice", "askPrice", "openPrice", "highPrice", "lowPrice",
                        "weightedAvgPrice", "prevClosePrice")  # fmt: skip
        for row in self.btc_rows:
            recorded = self.recorded_btc[id(row)]
            for name in price_fields:
                if name in recorded:
                    row[name] = str((Decimal(recorded[name]) * factor).quantize(Decimal("0.00000001")))

    def arm(self) -> None:
        self._reprice_binance(self.tenx_price)
        self.refresh()

    async def start(self) -> None:
        await self.replay.start()
        f = self.fixtures
        self.replay.serve("/coinbase/products", f / "coinbase/rec_products_2021-04-17.json")
        self.replay.serve(
            "/bitstamp/api/v2/trading-pairs-info/", f / "bitstamp/rec_api_v2_trading-pairs-info_2022-01-05.json"
        )
        self.replay.serve("/gemini/v1/symbols", f / "gemini/rec_v1_symbols_2021-06-24.json")
        self.replay.serve("/kraken/0/public/AssetPairs", f / "kraken/rec_public_AssetPairs_FULL_2021-04-17.json")
        self.replay.serve("/binance/api/v3/exchangeInfo", f / "binance/rec_api_v3_exchangeInfo_FULL_2021-10-12.json")
        self.refresh()

    def refresh(self) -> None:
        """Every time-stamped answer as if recorded now; the garbage source's next garbled body."""
        now = datetime.now(UTC)
        ms = int(now.timestamp() * 1000)
        self.replay.serve("/coinbase/products/BTC-USD/ticker", json.dumps({**self.coinbase, "time": _iso_ms(now)}))
        self.replay.serve(
            "/bitstamp/api/v2/ticker/btcusd/", json.dumps({**self.bitstamp, "timestamp": str(ms // 1000)})
        )
        gemini = {**self.gemini, "volume": {**self.gemini["volume"], "timestamp": ms}}
        self.replay.serve("/gemini/v1/pubticker/btcusd", json.dumps(gemini))
        for row in self.btc_rows:
            row["closeTime"] = ms
        self.replay.serve("/binance/api/v3/ticker/24hr", json.dumps(self.binance_rows))
        self.replay.serve("/kraken/0/public/Ticker", next(self.garbage))
        self.refreshes += 1

    async def run(self, stop: asyncio.Event, every: float) -> None:
        while not stop.is_set():
            self.refresh()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=every)

    def served(self, prefix: str) -> int:
        return sum(1 for p in self.replay.requests if p.startswith(prefix))


def garbled(recorded: bytes) -> list[bytes]:
    """Broken versions of a recorded body: cut short, bytes flipped, reversed, compressed without a header."""
    flipped = bytes(b ^ 0x5A if i % 7 == 3 else b for i, b in enumerate(recorded))
    return [recorded[: len(recorded) // 2], flipped, recorded[::-1], gzip.compress(recorded)]


@dataclass
class HangServer:
    """Accepts connections and reads what is sent, never answering."""

    port: int = 0
    connections: int = 0
    _server: asyncio.base_events.Server | None = None
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        with contextlib.suppress(Exception):
            while await reader.read(65536):
                pass

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), timeout=5)


@dataclass
class FloodServer:
    """An OKX public websocket that answers a subscription with the recorded acknowledgement, then sends the
    recorded ticker frames in a loop (re-stamped: each is a new quote) and a huge frame every ``huge_every``."""

    frames: list[dict[str, Any]]
    ack: str
    huge: str
    huge_every: int
    # Frames sent between two yields to the event loop; the socket's own back-pressure bounds the rest.
    burst: int
    pause: float
    sent: int = 0
    huge_sent: int = 0
    connections: int = 0
    base_url: str = ""
    # Until set, a subscription is acknowledged and the socket stays quiet (pings answered).
    armed: asyncio.Event = field(default_factory=asyncio.Event)
    _runner: web.AppRunner | None = None
    _open: set[web.WebSocketResponse] = field(default_factory=set)

    async def _handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True, max_msg_size=0)
        await ws.prepare(request)
        self._open.add(ws)
        self.connections += 1
        flood: asyncio.Task[None] | None = None
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                if msg.data == "ping":
                    await ws.send_str("pong")
                elif flood is None:
                    await ws.send_str(self.ack)
                    flood = asyncio.create_task(self._flood(ws))
        finally:
            self._open.discard(ws)
            if flood is not None:
                flood.cancel()
        return ws

    async def _flood(self, ws: web.WebSocketResponse) -> None:
        await self.armed.wait()
        with contextlib.suppress(ConnectionError, RuntimeError):
            for n, frame in enumerate(itertools.cycle(self.frames), start=1):
                if ws.closed:
                    return
                row = dict(frame["data"][0], ts=str(int(time.time() * 1000)))
                await ws.send_str(json.dumps({**frame, "data": [row]}))
                self.sent += 1
                if n % self.huge_every == 0:
                    await ws.send_str(self.huge)
                    self.huge_sent += 1
                if n % self.burst == 0:
                    await asyncio.sleep(self.pause)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        sockets = site._server.sockets if site._server else []
        self.base_url = f"ws://127.0.0.1:{sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        for ws in list(self._open):
            with contextlib.suppress(Exception):
                await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()


def flood_server(fixtures: Path) -> FloodServer:
    frames = [json.loads(line) for line in ndjson(fixtures / "okx/rec_ws_v5_public_tickers_all.ndjson")]
    spot = [f for f in frames if f["data"][0].get("instId") == "BTC-USDT"]
    return FloodServer(
        frames=spot,
        ack=(fixtures / "okx/rec_ws_v5_subscribe_ack_tickers.json").read_text().strip(),
        huge=(fixtures / "binance/rec_api_v3_exchangeInfo_FULL_2021-10-12.json").read_text(),
        huge_every=by_scale(300, 500),
        burst=by_scale(500, 100),
        pause=by_scale(0.0, 0.02),
    )


@contextlib.asynccontextmanager
async def bad_and_healthy_sources(fixtures: Path) -> AsyncIterator[tuple[Venues, HangServer, FloodServer]]:
    venues, hang, flood = Venues(fixtures), HangServer(), flood_server(fixtures)
    await venues.start()
    await hang.start()
    await flood.start()
    stop = asyncio.Event()
    refresher = asyncio.create_task(venues.run(stop, every=0.25))
    try:
        yield venues, hang, flood
    finally:
        stop.set()
        await refresher
        await flood.stop()
        await hang.stop()
        await venues.replay.stop()


async def _json(
    client: httpx.AsyncClient, path: str, codes: Counter[int], headers: dict[str, str] | None = None, **params: Any
) -> Any:
    response = await client.get(path, params=params or None, headers=headers)
    codes[response.status_code] += 1
    return json.loads(response.text, parse_float=Decimal) if response.status_code == 200 else None


async def _admin(plat: Platform, client: httpx.AsyncClient) -> dict[str, str]:
    await register(client, "ops@example.com")
    conn = await plat.db()
    try:
        await conn.execute("UPDATE users SET role = 'admin' WHERE email = 'ops@example.com'")
    finally:
        await conn.close()
    return bearer((await tokens(client, "ops@example.com"))["access_token"])


async def _stored_ticks(plat: Platform) -> dict[str, int]:
    conn = await plat.db()
    try:
        rows = await conn.fetch("SELECT source, count(*) AS n FROM ticks GROUP BY source")
    finally:
        await conn.close()
    return {r["source"]: int(r["n"]) for r in rows}


async def _server_errors(plat: Platform) -> Counter[str]:
    """5xx answers per service and status (``pricing 503``), from each service's own request counter."""
    found: Counter[str] = Counter()
    for name in plat.services:
        for labels, value in samples(await plat.metrics_text(name), "http_requests_total"):
            if labels.get("status", "").startswith("5") and value:
                found[f"{name} {labels['status']}"] += int(value)
    return found


async def _until(check: Callable[[], Any], timeout: float, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"not reached within {timeout:.0f}s; last: {last!r}")


@pytest.mark.reliability
async def test_bad_sources(platform_factory, reliability_row, exchange_fixtures):
    quotes = healthy_quotes(exchange_fixtures)
    low, high = min(q.price for q in quotes), max(q.price for q in quotes)
    expected = healthy_price(quotes)
    window = by_scale(150.0, 20.0)
    async with bad_and_healthy_sources(exchange_fixtures) as (venues, hang, flood):
        env = {f"COINLYTICS_SOURCE_{name.upper()}_REST_URL": venues.url(name) for name in SOURCES if name != HANG}
        env |= {
            f"COINLYTICS_SOURCE_{HANG.upper()}_REST_URL": hang.url,
            f"COINLYTICS_SOURCE_{FLOOD.upper()}_WS_URL": flood.base_url,
            "COINLYTICS_POLL_INTERVAL_SECONDS": "1",
            # A hung request is cut after this long; shorter at ci scale so several attempts fit the run.
            "COINLYTICS_SOURCE_TIMEOUT_SECONDS": str(by_scale(10, 3)),
            "COINLYTICS_CONSOLIDATION_REFRESH_SECONDS": "1",
        }
        plat = platform_factory(
            services=("pricing", "ingest", "gateway"), sources=",".join(SOURCES), coins="BTC",
            vs_currencies="USD", extra_env=env,
        )  # fmt: skip
        await plat.start()
        codes: Counter[int] = Counter()
        prices: list[Decimal] = []
        async with httpx.AsyncClient(base_url=plat.url("gateway"), timeout=15) as client:
            admin = await _admin(plat, client)
            # Signed in: the per-user request budget, not the anonymous one, covers this polling.
            client.headers.update(admin)

            async def btc_usd() -> dict[str, Any] | None:
                body = await _json(client, "/api/v1/prices", codes, symbols="BTC", vs="USD")
                price = body.get("BTC", {}).get("USD") if isinstance(body, dict) else None
                if price is not None:
                    prices.append(Decimal(price["price"]))
                return price if isinstance(price, dict) else None

            async def isolated() -> dict[str, Any] | None:
                """Once every bad source shows what it is and all three healthy ones are used."""
                await btc_usd()
                status = await _json(client, "/api/v1/status", codes)
                listed = await _json(client, "/api/v1/admin/sources", codes, headers=admin)
                book = await _json(client, "/api/v1/prices/BTC/sources", codes, vs="USD")
                if status is None or listed is None or book is None:
                    return None
                health = {s["name"]: s for s in listed["sources"]}
                states = status["sources"]
                by_source = {q["source"]: q["status"] for q in book["sources"]}
                ready = (
                    all(by_source.get(name) == "used" for name in HEALTHY)
                    and all(states.get(name, {}).get("state") == "connected" for name in HEALTHY)
                    and by_source.get(TENX) == "outlier"
                    and by_source.get(FLOOD) == "outlier"
                    and states.get(GARBAGE, {}).get("state") == "down"
                    and states.get(HANG, {}).get("state") == "down"
                    and health.get(GARBAGE, {}).get("errors", {}).get("bad_response", 0) >= 1
                    and health.get(HANG, {}).get("errors", {}).get("timeout", 0) >= 1
                    and health.get(FLOOD, {}).get("errors", {}).get("malformed", 0) >= 1
                )
                return {"health": health, "states": states, "book": book} if ready else None

            async def sound() -> dict[str, Any] | None:
                """All four sound sources used: the three healthy ones and Binance before it turns bad."""
                await btc_usd()
                book = await _json(client, "/api/v1/prices/BTC/sources", codes, vs="USD")
                used = {q["source"] for q in (book or {}).get("sources", []) if q["status"] == "used"}
                return book if used >= {*HEALTHY, TENX} else None

            before = await _until(sound, timeout=by_scale(90.0, 40.0))
            # Before the first price a read is a documented 503 (no_fresh_data); from here on none may fail.
            startup_errors = await _server_errors(plat)
            startup_codes = dict(codes)
            codes.clear()
            # The platform has a sound price; now the flood starts and Binance's price goes 10x off.
            venues.arm()
            flood.armed.set()
            started = time.monotonic()
            first = await _until(isolated, timeout=by_scale(90.0, 30.0))
            isolated_after = time.monotonic() - started
            ticks_before = await _stored_ticks(plat)
            flood_before = int(first["health"][FLOOD]["messages_total"])
            deadline = time.monotonic() + window
            while time.monotonic() < deadline:
                await btc_usd()
                await asyncio.sleep(1.0)
            ticks_after = await _stored_ticks(plat)
            final = await _until(isolated, timeout=30.0)
            final_price = await btc_usd()
        server_errors = await _server_errors(plat) - startup_errors
        exits = plat.unexpected_exits()

    health = final["health"]
    flood_ticks = int(health[FLOOD]["messages_total"]) - flood_before
    outside = [p for p in prices if not low <= p <= high]
    rising = {name: ticks_after.get(name, 0) - ticks_before.get(name, 0) for name in HEALTHY}
    garbage_served = venues.served(f"/{GARBAGE}/0/public/Ticker")
    tenx_served = venues.served(f"/{TENX}/api/v3/ticker/24hr")
    print(
        f"\nhealthy range [{low}, {high}], healthy-only price {expected}; {len(prices)} price reads, "
        f"{len(outside)} outside the range, last {final_price and final_price['price']} "
        f"(book: {final['book']['consolidated']})\n"
        f"before the faults: {before['consolidated']['price']} from {before['consolidated']['sources_used']} "
        f"sources; isolated {isolated_after:.1f}s after they began; "
        f"healthy ticks stored during {window:.0f}s: {rising}\n"
        f"garbage: {garbage_served} garbled answers, health {_brief(health[GARBAGE])}\n"
        f"hang: {hang.connections} connections held, health {_brief(health[HANG])}\n"
        f"flood: {flood.sent} frames + {flood.huge_sent} huge frames sent on {flood.connections} connection(s), "
        f"{flood_ticks} ticks published and {ticks_after.get(FLOOD, 0) - ticks_before.get(FLOOD, 0)} stored by "
        f"pricing in the window, health {_brief(health[FLOOD])}\n"
        f"10x: {tenx_served} answers at {venues.tenx_price}, status {_status_of(final['book'], TENX)}\n"
        f"gateway answers after the faults began {dict(codes)} (before: {startup_codes}); 5xx after the faults "
        f"began {dict(server_errors)} (before: {dict(startup_errors)}); unexpected exits {exits}"
    )
    reliability_row.update(
        checked="garbage, hung, flooding and 10x-off sources beside 3 healthy: isolated, price within the "
        "healthy range, healthy ticks keep flowing, no exit or 5xx",
        sent=flood.sent + flood.huge_sent + garbage_served + tenx_served,
        stored=sum(rising.values()),
        lost=len(outside),
        duplicated=None,
        recover_seconds=isolated_after,
        notes=f"{len(prices)} price reads all in [{low}, {high}] (last {final_price and final_price['price']}, "
        f"healthy-only {expected}); flood {flood.sent} frames, {flood.huge_sent} of 1.8 MB; "
        f"hang {hang.connections} connections; garbage {garbage_served} answers",
    )

    assert exits == [], f"a service exited: {exits}"
    assert not server_errors, f"5xx answers once the faults began: {server_errors}"
    assert not [k for k in startup_errors if k.endswith(" 500")], f"a 500 before the faults: {startup_errors}"
    assert not [c for c in codes if c >= 500], dict(codes)
    assert prices and outside == [], f"consolidated prices outside [{low}, {high}]: {outside[:10]}"
    assert final_price is not None and Decimal(final_price["price"]) == expected, (final_price, expected)
    consolidated = final["book"]["consolidated"]
    assert consolidated["sources_used"] == len(HEALTHY) and consolidated["status"] == "fresh", consolidated
    assert all(n > 0 for n in rising.values()), f"a healthy source stopped flowing: {rising}"
    assert all(health[name]["state"] == "connected" for name in HEALTHY), {n: health[n] for n in HEALTHY}
    assert health[GARBAGE]["state"] == "down" and health[GARBAGE]["last_error_kind"] == "bad_response"
    assert health[HANG]["state"] == "down" and health[HANG]["last_error_kind"] == "timeout"
    assert flood_ticks > 0 and health[FLOOD]["errors"].get("malformed", 0) >= 1


def _brief(health: dict[str, Any]) -> str:
    keys = ("state", "last_error_kind", "messages_total", "rejected_total", "reconnects", "errors")
    return str({k: health.get(k) for k in keys})


def _status_of(book: dict[str, Any], source: str) -> str | None:
    return next((q["status"] for q in book["sources"] if q["source"] == source), None)
