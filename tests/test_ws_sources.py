"""Websocket sources against local websocket servers replaying the recorded exchange sessions.

The parsers are checked on every recorded ticker frame of binance, kraken, coinbase and okx, with the expected
values read here from the same fixture files. The connection loop runs against tests/ws_replay.py (a real
aiohttp websocket server on 127.0.0.1) and publishes to the real Redis ticks stream; REST markets, fallback and
backfill go to tests/replay.py. Faulty frames are derived from recorded ones."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from services.ingest.exchanges.binance import BinanceProtocol
from services.ingest.exchanges.coinbase import CoinbaseProtocol
from services.ingest.exchanges.kraken import KrakenProtocol
from services.ingest.exchanges.okx import OkxProtocol
from services.ingest.rest import CcxtRestSource
from services.ingest.service import IngestService
from services.ingest.ws import (
    WebsocketRunner,
    WebsocketSource,
    build_ws_source,
    decode_frame,
    protocol_for,
    ws_url,
)
from shared.messages import TickMessage
from shared.settings import Settings
from shared.source_health import SourceHealth, health_key, parse_health
from shared.streams import StreamPublisher
from shared.supervisor import Supervisor
from tests.conftest import eventually, free_port
from tests.replay import ReplayServer
from tests.ws_replay import WsReplayServer, ndjson


def load(path: Path) -> Any:
    return json.loads(path.read_text())


def ms(value: int | str) -> datetime:
    return datetime.fromtimestamp(int(value) / 1000, tz=UTC)


def iso(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


RECEIVED = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)


# --- parsers on every recorded frame -------------------------------------------------------------------------


def test_binance_book_ticker_frames_give_the_mid(exchange_fixtures: Path) -> None:
    info = load(exchange_fixtures / "binance/rec_api_v3_exchangeInfo_FULL_2021-10-12.json")
    assets = {s["symbol"]: (s["baseAsset"], s["quoteAsset"]) for s in info["symbols"]}
    protocol = BinanceProtocol()
    frames = ndjson(exchange_fixtures / "binance/rec_ws_combined_bookTicker_all.ndjson")
    assert len(frames) == 84
    for frame in frames:
        data = json.loads(frame)["data"]
        (tick,) = decode_frame(protocol, frame, RECEIVED)
        bid, ask = Decimal(data["b"]), Decimal(data["a"])
        assert (tick.base, tick.quote) == assets[data["s"]]
        assert tick.pair == data["s"]
        assert tick.price == (bid + ask) / 2 and tick.price_kind == "mid"
        assert (tick.bid, tick.ask) == (bid, ask)
        # The book-ticker event has no time of its own.
        assert tick.exchange_ts == RECEIVED and tick.transport == "ws" and tick.volume_24h is None


def test_binance_kline_gives_the_last_trade_and_then_book_tops_only_refresh_bid_ask(exchange_fixtures: Path) -> None:
    protocol = BinanceProtocol()
    book = (exchange_fixtures / "binance/rec_ws_combined_bookTicker_NKNUSDT.json").read_text()
    kline_frame = (exchange_fixtures / "binance/rec_ws_combined_kline_1m_NKNUSDT.json").read_text()
    event = json.loads(kline_frame)["data"]
    top = json.loads(book)["data"]
    assert decode_frame(protocol, book, RECEIVED)[0].price_kind == "mid"
    (tick,) = decode_frame(protocol, kline_frame, RECEIVED)
    assert (tick.base, tick.quote, tick.pair) == ("NKN", "USDT", "NKNUSDT")
    assert tick.price == Decimal(event["k"]["c"]) and tick.price_kind == "last"
    assert tick.exchange_ts == ms(event["E"])
    assert (tick.bid, tick.ask) == (Decimal(top["b"]), Decimal(top["a"]))
    assert decode_frame(protocol, book, RECEIVED) == []


def test_kraken_v1_ticker_frames(exchange_fixtures: Path) -> None:
    protocol = KrakenProtocol()
    frames = ndjson(exchange_fixtures / "kraken/rec_ws_v1_ticker_all.ndjson")
    assert len(frames) == 18
    seen = set()
    for frame in frames:
        _channel, body, _name, pair = json.loads(frame)
        (tick,) = decode_frame(protocol, frame, RECEIVED)
        base, quote = pair.split("/")
        ours = {"XBT": "BTC", "XDG": "DOGE"}
        assert (tick.base, tick.quote) == (ours.get(base, base), ours.get(quote, quote))
        assert tick.pair == pair
        assert tick.price == Decimal(body["c"][0]) and tick.price_kind == "last"
        assert (tick.bid, tick.ask) == (Decimal(body["b"][0]), Decimal(body["a"][0]))
        assert tick.volume_24h == Decimal(body["v"][1])
        assert tick.exchange_ts == RECEIVED  # v1 ticker frames carry no time
        seen.add((tick.base, tick.quote))
    # XBT/CHF and KSM/XBT are in the recording: Kraken's XBT is our BTC on either side.
    assert ("BTC", "CHF") in seen and ("KSM", "BTC") in seen
    for control in ("rec_ws_v1_systemStatus.json", "rec_ws_v1_subscriptionStatus_ticker_WAVES-EUR.json",
                    "rec_ws_v1_heartbeat.json"):  # fmt: skip
        assert decode_frame(protocol, (exchange_fixtures / "kraken" / control).read_text(), RECEIVED) == []


def test_coinbase_ticker_frames(exchange_fixtures: Path) -> None:
    protocol = CoinbaseProtocol()
    frames = ndjson(exchange_fixtures / "coinbase/rec_ws_ticker_all.ndjson")
    assert len(frames) == 107
    for frame in frames:
        row = json.loads(frame)
        (tick,) = decode_frame(protocol, frame, RECEIVED)
        assert (tick.base, tick.quote) == tuple(row["product_id"].split("-"))
        assert tick.price == Decimal(row["price"]) and tick.price_kind == "last"
        assert tick.volume_24h == Decimal(row["volume_24h"])
        assert (tick.bid, tick.ask) == (Decimal(row["best_bid"]), Decimal(row["best_ask"]))
        assert tick.exchange_ts == iso(row["time"])
    ack = (exchange_fixtures / "coinbase/rec_ws_subscriptions_ack.json").read_text()
    assert decode_frame(protocol, ack, RECEIVED) == []


def test_okx_tickers_frames_spot_only(exchange_fixtures: Path) -> None:
    protocol = OkxProtocol()
    frames = ndjson(exchange_fixtures / "okx/rec_ws_v5_public_tickers_all.ndjson")
    assert len(frames) == 28
    spot = 0
    for frame in frames:
        (row,) = json.loads(frame)["data"]
        ticks = decode_frame(protocol, frame, RECEIVED)
        if row["instType"] != "SPOT":
            assert ticks == []  # futures and swaps quote contracts
            continue
        spot += 1
        (tick,) = ticks
        assert (tick.base, tick.quote, tick.pair) == ("BTC", "USDT", row["instId"])
        assert tick.price == Decimal(row["last"]) and tick.price_kind == "last"
        assert tick.volume_24h == Decimal(row["vol24h"]) and tick.quote_volume_24h == Decimal(row["volCcy24h"])
        assert (tick.bid, tick.ask) == (Decimal(row["bidPx"]), Decimal(row["askPx"]))
        assert tick.exchange_ts == ms(row["ts"])
    assert spot > 0
    ack = (exchange_fixtures / "okx/rec_ws_v5_subscribe_ack_tickers.json").read_text()
    assert decode_frame(protocol, ack, RECEIVED) == []


# --- the connection loop against local websocket servers ------------------------------------------------------


@dataclass
class WsSpec:
    coins: list[str]
    rest: dict[str, str]  # REST path -> fixture, for the market list (and ticker backfill)
    frames: str
    acks: list[str]
    greeting: list[str]
    pair: str  # a recorded pair among the tracked coins
    subscribed: Callable[[WsReplayServer], str]  # where the client named what it wants


def _sent(server: WsReplayServer) -> str:
    return " ".join(server.received)


WS_SPECS: dict[str, WsSpec] = {
    "binance": WsSpec(
        ["NKN", "RUNE"],
        {"/api/v3/exchangeInfo": "binance/rec_api_v3_exchangeInfo_FULL_2021-10-12.json",
         "/api/v3/ticker/24hr": "binance/rec_api_v1_ticker_24hr_ALL_2019-08-22.json"},
        "binance/rec_ws_combined_bookTicker_all.ndjson", [], [], "NKNUSDT",
        lambda s: " ".join(s.paths),
    ),
    "kraken": WsSpec(
        ["XMR", "WAVES"],
        {"/0/public/AssetPairs": "kraken/rec_public_AssetPairs_FULL_2021-04-17.json"},
        "kraken/rec_ws_v1_ticker_all.ndjson", ["kraken/rec_ws_v1_subscriptionStatus_ticker_WAVES-EUR.json"],
        ["kraken/rec_ws_v1_systemStatus.json"], "XMR/USD", _sent,
    ),
    "coinbase": WsSpec(
        ["BAND", "SKL"],
        {"/products": "coinbase/rec_products_2021-04-17.json"},
        "coinbase/rec_ws_ticker_all.ndjson", ["coinbase/rec_ws_subscriptions_ack.json"], [], "BAND-GBP", _sent,
    ),
    "okx": WsSpec(
        ["BTC"], {}, "okx/rec_ws_v5_public_tickers_all.ndjson", ["okx/rec_ws_v5_subscribe_ack_tickers.json"], [],
        "BTC-USDT", _sent,
    ),
}  # fmt: skip


def ws_server_for(name: str, fixtures: Path, frames: list[str] | None = None) -> WsReplayServer:
    spec = WS_SPECS[name]
    return WsReplayServer(
        frames=frames if frames is not None else ndjson(fixtures / spec.frames),
        acks=[(fixtures / a).read_text() for a in spec.acks],
        greeting=[(fixtures / g).read_text() for g in spec.greeting],
        pongs={"ping": "pong", json.dumps({"event": "ping"}): json.dumps({"event": "pong"})},
    )


@pytest.fixture
async def ws_servers() -> AsyncIterator[list[WsReplayServer]]:
    started: list[WsReplayServer] = []
    yield started
    for server in started:
        await server.stop()


class Feeds:
    """Starts runners against local servers and stops them at the end of the test."""

    def __init__(self, settings: Settings, redis: Redis, sessions: Any, replay: ReplayServer, fixtures: Path) -> None:
        self.settings, self.redis, self.sessions, self.replay, self.fixtures = (
            settings,
            redis,
            sessions,
            replay,
            fixtures,
        )
        self.running: list[tuple[asyncio.Event, asyncio.Task[None]]] = []

    async def start(self, name: str, server: WsReplayServer | None, *, ws: str | None = None,
                    coins: list[str] | None = None, **options: Any) -> WebsocketRunner:  # fmt: skip
        spec = WS_SPECS[name]
        for path, file in spec.rest.items():
            self.replay.serve(path, self.fixtures / file)
        if server is not None:
            await server.start()
            ws = server.base_url
        settings = self.settings.model_copy(update={"coins": coins or spec.coins})
        protocol = protocol_for(name)
        assert protocol is not None
        source = WebsocketSource(
            protocol,
            url=ws_url(protocol, ws),
            rest=CcxtRestSource(name, rest_url=self.replay.base_url, timeout_seconds=5),
        )
        runner = WebsocketRunner(
            source,
            settings=settings,
            redis=self.redis,
            publisher=StreamPublisher(self.redis, namespace=settings.redis_namespace, maxlen=settings.stream_maxlen),
            sessions=self.sessions,
            health=SourceHealth(name=name, kind="ws"),
            health_key=health_key(settings, name),
            **{"backoff_base": 0.05, "backoff_cap": 0.2, **options},
        )
        stop = asyncio.Event()
        self.running.append((stop, asyncio.create_task(runner.run(stop))))
        return runner

    async def stop(self) -> None:
        for stop, task in self.running:
            stop.set()
            await asyncio.wait_for(task, timeout=10)


@pytest.fixture
async def feeds(settings, redis, sessions, replay, exchange_fixtures) -> AsyncIterator[Feeds]:
    running = Feeds(settings, redis, sessions, replay, exchange_fixtures)
    try:
        yield running
    finally:
        await running.stop()


async def published(redis: Redis, settings: Settings) -> list[TickMessage]:
    entries = await redis.xrange(settings.key("stream", "ticks"))
    return [TickMessage.from_stream(json.loads(fields[b"data"])) for _, fields in entries]


async def health_of(redis: Redis, settings: Settings, name: str) -> dict[str, Any]:
    return parse_health(await redis.hgetall(health_key(settings, name)))


def expected_first(name: str, fixtures: Path, pair: str) -> dict[str, Any]:
    """The first recorded frame of ``pair``, as price/volume/time read straight from the fixture."""
    for frame in ndjson(fixtures / WS_SPECS[name].frames):
        msg = json.loads(frame)
        if name == "binance" and msg["data"]["s"] == pair:
            d = msg["data"]
            return {"price": (Decimal(d["b"]) + Decimal(d["a"])) / 2, "volume": None, "ts": None}
        if name == "kraken" and msg[3] == pair:
            return {"price": Decimal(msg[1]["c"][0]), "volume": Decimal(msg[1]["v"][1]), "ts": None}
        if name == "coinbase" and msg["product_id"] == pair:
            return {"price": Decimal(msg["price"]), "volume": Decimal(msg["volume_24h"]), "ts": iso(msg["time"])}
        if name == "okx" and msg["arg"]["instId"] == pair:
            row = msg["data"][0]
            return {"price": Decimal(row["last"]), "volume": Decimal(row["vol24h"]), "ts": ms(row["ts"])}
    raise AssertionError(f"{pair} not recorded")


@pytest.mark.parametrize("name", list(WS_SPECS))
async def test_recorded_session_reaches_the_ticks_stream(name, feeds, ws_servers, redis, settings, exchange_fixtures):
    spec = WS_SPECS[name]
    server = ws_server_for(name, exchange_fixtures)
    ws_servers.append(server)
    await feeds.start(name, server)

    async def first_tick() -> TickMessage | None:
        return next((t for t in await published(redis, settings) if t.pair == spec.pair), None)

    tick = await eventually(first_tick)
    expected = expected_first(name, exchange_fixtures, spec.pair)
    assert tick.source == name and tick.transport == "ws"
    assert tick.base in spec.coins
    assert tick.price == expected["price"]
    assert tick.volume_24h == expected["volume"]
    if expected["ts"] is not None:
        assert tick.exchange_ts == expected["ts"]
    # Subscribed to the pair by the exchange's own spelling (from the market list / pair map).
    assert spec.pair.lower() in spec.subscribed(server).lower()
    # Pairs of coins we do not track are not published.
    assert {t.base for t in await published(redis, settings)} <= set(spec.coins)
    state = await health_of(redis, settings, name)
    assert state["kind"] == "ws" and state["state"] == "connected" and state["last_message_at"]


async def test_dropped_socket_reconnects_and_backfills_once_over_rest(
    feeds, ws_servers, replay, redis, settings, exchange_fixtures
):
    frames = ndjson(exchange_fixtures / "binance/rec_ws_combined_bookTicker_all.ndjson")
    server = ws_server_for("binance", exchange_fixtures, frames)
    server.drop_after(10)
    ws_servers.append(server)
    # NKN and RUNE are in the recorded websocket session; the 2019 REST ticker list has BTC instead.
    await feeds.start("binance", server, coins=["NKN", "RUNE", "BTC"])
    tracked = [f for f in frames if json.loads(f)["data"]["s"] in ("NKNUSDT", "RUNEEUR")]

    async def all_frames_in() -> list[TickMessage] | None:
        ticks = [t for t in await published(redis, settings) if t.transport == "ws"]
        return ticks if len(ticks) == len(tracked) else None

    await eventually(all_frames_in)
    state = await health_of(redis, settings, "binance")
    assert server.connections == 2 and state["reconnects"] == 1
    # One REST poll after the reconnect, none while the socket was up.
    assert replay.count("/api/v3/ticker/24hr") == 1
    ticks = await published(redis, settings)
    rest = [i for i, t in enumerate(ticks) if t.transport == "rest"]
    btc = next(r for r in load(exchange_fixtures / "binance/rec_api_v1_ticker_24hr_ALL_2019-08-22.json")
               if r["symbol"] == "BTCUSDT")  # fmt: skip
    assert any(ticks[i].pair == "BTCUSDT" and ticks[i].price == Decimal(btc["lastPrice"]) for i in rest)
    # The backfill lands between the frames before the drop and those after it.
    ws_positions = [i for i, t in enumerate(ticks) if t.transport == "ws"]
    before_drop = sum(1 for f in frames[:10] if f in tracked)
    assert ws_positions[before_drop - 1] < min(rest) and max(rest) < ws_positions[before_drop]
    # Nothing was lost across the drop: every tracked frame arrived once, in order.
    expected_prices = [(Decimal(json.loads(f)["data"]["b"]) + Decimal(json.loads(f)["data"]["a"])) / 2 for f in tracked]
    assert [ticks[i].price for i in ws_positions] == expected_prices


async def test_malformed_frames_are_skipped_and_later_ones_still_flow(
    feeds, ws_servers, redis, settings, exchange_fixtures, db
):
    recorded = [f for f in ndjson(exchange_fixtures / "coinbase/rec_ws_ticker_all.ndjson") if '"BAND-GBP"' in f]
    good_first, source_a, source_b, source_c, good_last = recorded[:5]

    def with_price(frame: str, price: str) -> str:
        return json.dumps({**json.loads(frame), "price": price})

    bad = [
        source_a[: len(source_a) // 2],  # truncated JSON
        with_price(source_b, "NaN"),
        with_price(source_c, "0"),
        with_price(source_c, "-14.7"),
        json.dumps({"type": "surprise", "product_id": "BAND-GBP"}),  # unknown shape
    ]
    server = ws_server_for("coinbase", exchange_fixtures, [good_first, *bad, good_last])
    ws_servers.append(server)
    await feeds.start("coinbase", server)

    async def last_arrived() -> list[TickMessage] | None:
        ticks = await published(redis, settings)
        return ticks if len(ticks) >= 2 else None

    ticks = await eventually(last_arrived)
    assert [t.price for t in ticks] == [
        Decimal(json.loads(good_first)["price"]),
        Decimal(json.loads(good_last)["price"]),
    ]

    async def counted() -> dict[str, Any] | None:
        state = await health_of(redis, settings, "coinbase")
        return state if state["rejected_total"] == len(bad) else None

    state = await eventually(counted)
    assert state["errors"]["malformed"] == len(bad)
    assert state["state"] == "connected" and server.connections == 1
    logged = await db.fetch("SELECT kind FROM error_log WHERE source = 'coinbase'")
    assert "malformed" in {r["kind"] for r in logged}


async def test_okx_quiet_socket_is_pinged_and_kept(feeds, ws_servers, redis, settings, exchange_fixtures):
    frames = [f for f in ndjson(exchange_fixtures / "okx/rec_ws_v5_public_tickers_all.ndjson") if '"BTC-USDT"' in f]
    server = ws_server_for("okx", exchange_fixtures, frames[:1])
    ws_servers.append(server)
    await feeds.start("okx", server, ping_after=0.2, idle_timeout=30)

    async def pinged() -> bool:
        return server.received.count("ping") >= 2

    await eventually(pinged)
    state = await health_of(redis, settings, "okx")
    # "pong" is part of the protocol, not a malformed frame; the socket stays up.
    assert "malformed" not in state["errors"] and server.connections == 1 and state["state"] == "connected"


async def test_silent_socket_is_reconnected(feeds, ws_servers, redis, settings, exchange_fixtures):
    frames = ndjson(exchange_fixtures / "kraken/rec_ws_v1_ticker_all.ndjson")[:2]
    server = ws_server_for("kraken", exchange_fixtures, frames)
    server.pongs = {}  # a dead feed: the app-level ping goes unanswered too
    ws_servers.append(server)
    await feeds.start("kraken", server, ping_after=0.1, idle_timeout=0.4)

    async def reconnected() -> dict[str, Any] | None:
        state = await health_of(redis, settings, "kraken")
        return state if state["reconnects"] >= 1 else None

    state = await eventually(reconnected)
    assert state["errors"].get("stale", 0) >= 1 and server.connections >= 2


async def test_rest_polling_while_the_socket_is_down(feeds, redis, settings, exchange_fixtures):
    closed = f"ws://127.0.0.1:{free_port()}"
    await feeds.start("binance", None, ws=closed, coins=["BTC"], backoff_base=2.0, backoff_cap=2.0)
    btc = next(r for r in load(exchange_fixtures / "binance/rec_api_v1_ticker_24hr_ALL_2019-08-22.json")
               if r["symbol"] == "BTCUSDT")  # fmt: skip

    async def polled() -> TickMessage | None:
        return next((t for t in await published(redis, settings) if t.transport == "rest"), None)

    tick = await eventually(polled)
    assert tick.pair == "BTCUSDT" and tick.price == Decimal(btc["lastPrice"])
    state = await health_of(redis, settings, "binance")
    assert state["kind"] == "ws" and state["state"] == "down" and state["errors"].get("network", 0) >= 1


# --- wiring --------------------------------------------------------------------------------------------------


def test_which_sources_get_a_websocket(settings: Settings) -> None:
    plain = settings.model_copy(update={"source_urls": {}})
    assert build_ws_source(plain, "bitstamp") is None  # no websocket client for it: REST polling
    default = build_ws_source(plain, "okx")
    assert default is not None and default.url == "wss://ws.okx.com:8443/ws/v5/public"
    mirrored = settings.model_copy(update={"source_urls": {"okx_rest_url": "http://127.0.0.1:9"}})
    # A REST mirror without a websocket override must not open the real exchange's socket.
    assert build_ws_source(mirrored, "okx") is None
    local = settings.model_copy(
        update={"source_urls": {"okx_rest_url": "http://127.0.0.1:9", "okx_ws_url": "ws://127.0.0.1:8"}}
    )
    source = build_ws_source(local, "okx")
    assert source is not None and source.url == "ws://127.0.0.1:8/ws/v5/public"


async def test_service_runs_okx_over_its_websocket(
    ws_servers, replay, redis, settings, sessions, exchange_fixtures, monkeypatch
):
    server = ws_server_for("okx", exchange_fixtures)
    ws_servers.append(server)
    await server.start()
    monkeypatch.setenv("COINLYTICS_SOURCE_OKX_WS_URL", server.base_url)
    monkeypatch.setenv("COINLYTICS_SOURCE_OKX_REST_URL", replay.base_url)
    configured = Settings(**{**settings.model_dump(), "sources": ["okx"], "coins": ["BTC"], "source_urls": {}})
    publisher = StreamPublisher(redis, namespace=settings.redis_namespace, maxlen=settings.stream_maxlen)
    service = IngestService(configured, redis=redis, publisher=publisher, sessions=sessions)
    supervisor = Supervisor("ingest")
    await service.start(supervisor)
    try:
        assert isinstance(service.runners[0], WebsocketRunner)

        async def flowing() -> list[TickMessage] | None:
            ticks = [t for t in await published(redis, settings) if t.transport == "ws"]
            return ticks or None

        ticks = await eventually(flowing)
        assert ticks[0].pair == "BTC-USDT"
        (health,) = await service.health()
        assert health["kind"] == "ws" and health["state"] == "connected"
    finally:
        await supervisor.stop()
