"""REST sources through ccxt against a local server replaying the recorded exchange payloads.

Each exchange's recorded ticker goes through the real adapter (ccxt pointed at the replay server) and must come
out with the symbol, price, volume and time read here from the same fixture file. Faults are derived from the
recorded payloads (cut short, a price replaced) or are bare HTTP statuses."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from services.ingest.rest import CcxtRestSource, pair_map_markets
from services.ingest.runner import BAN_BACKOFF_SECONDS, SourceRunner
from services.ingest.service import IngestService
from shared.messages import TickMessage
from shared.settings import Settings
from shared.source_health import health_key, parse_health
from shared.streams import TICKS_STREAM, StreamPublisher
from shared.supervisor import Supervisor
from tests.conftest import eventually, make_settings
from tests.replay import ReplayServer, Reply


def load(path: Path) -> Any:
    return json.loads(path.read_text())


@dataclass
class Expected:
    base: str
    quote: str
    pair: str
    price: str
    volume: str
    # Milliseconds since the epoch, or None when the payload carries no time (the arrival time is used).
    ts_ms: int | None


@dataclass
class Spec:
    """What to serve for one exchange (path -> fixture), which coins to track, and the recorded quote."""

    routes: dict[str, str]
    coins: list[str]
    expected: Callable[[Path], Expected]


def _binance(f: Path) -> Expected:
    row = next(r for r in load(f / "binance/rec_api_v1_ticker_24hr_ALL_2019-08-22.json") if r["symbol"] == "BTCUSDT")
    return Expected("BTC", "USDT", "BTCUSDT", row["lastPrice"], row["volume"], row["closeTime"])


def _kraken(f: Path) -> Expected:
    (pair, row), *_ = load(f / "kraken/rec_public_Ticker_BCHEUR_2017-10-03.json")["result"].items()
    # c = last trade [price, volume]; v = volume [today, last 24 hours]. Kraken's ticker carries no time.
    return Expected("BCH", "EUR", pair, row["c"][0], row["v"][1], None)


def _coinbase(f: Path) -> Expected:
    row = load(f / "coinbase/rec_products_btc-usd_ticker_2017-10-03.json")
    ts = datetime.fromisoformat(row["time"].replace("Z", "+00:00"))
    return Expected("BTC", "USD", "BTC-USD", row["price"], row["volume"], int(ts.timestamp() * 1000))


def _bitstamp(f: Path) -> Expected:
    row = load(f / "bitstamp/rec_api_v2_ticker_btcusd_2017-10-03.json")
    return Expected("BTC", "USD", "btcusd", row["last"], row["volume"], int(row["timestamp"]) * 1000)


def _okx(f: Path) -> Expected:
    row = load(f / "okx/rec_api_v5_market_ticker_BTC-USDT_2023-01-04.json")["data"][0]
    return Expected("BTC", "USDT", row["instId"], row["last"], row["vol24h"], int(row["ts"]))


def _kucoin(f: Path) -> Expected:
    data = load(f / "kucoin/rec_api_v1_market_allTickers_2019-02-21.json")["data"]
    row = next(r for r in data["ticker"] if r["symbol"] == "BTC-USDT")
    return Expected("BTC", "USDT", "BTC-USDT", row["last"], row["vol"], data["time"])


def _gemini(f: Path) -> Expected:
    row = load(f / "gemini/rec_v1_pubticker_BTCUSD_2017-10-03.json")
    return Expected("BTC", "USD", "btcusd", row["last"], row["volume"]["BTC"], row["volume"]["timestamp"])


# Paths are the ones ccxt requests; several differ in case or trailing slash from the recorded URL, which the
# exchanges treat alike (GDAX recorded /products/btc-usd/ticker, ccxt asks for /products/BTC-USD/ticker).
SPECS: dict[str, Spec] = {
    "binance": Spec(
        {
            "/api/v3/exchangeInfo": "binance/rec_api_v3_exchangeInfo_FULL_2021-10-12.json",
            "/api/v3/ticker/24hr": "binance/rec_api_v1_ticker_24hr_ALL_2019-08-22.json",
        },
        ["BTC"],
        _binance,
    ),
    "kraken": Spec(
        {
            "/0/public/AssetPairs": "kraken/rec_public_AssetPairs_FULL_2021-04-17.json",
            "/0/public/Ticker": "kraken/rec_public_Ticker_BCHEUR_2017-10-03.json",
        },
        ["BCH"],
        _kraken,
    ),
    "coinbase": Spec(
        {
            "/products": "coinbase/rec_products_2021-04-17.json",
            "/products/BTC-USD/ticker": "coinbase/rec_products_btc-usd_ticker_2017-10-03.json",
        },
        ["BTC"],
        _coinbase,
    ),
    "bitstamp": Spec(
        {
            "/api/v2/trading-pairs-info/": "bitstamp/rec_api_v2_trading-pairs-info_2022-01-05.json",
            "/api/v2/ticker/btcusd/": "bitstamp/rec_api_v2_ticker_btcusd_2017-10-03.json",
        },
        ["BTC"],
        _bitstamp,
    ),
    "okx": Spec({"/api/v5/market/ticker": "okx/rec_api_v5_market_ticker_BTC-USDT_2023-01-04.json"}, ["BTC"], _okx),
    "kucoin": Spec(
        {
            "/api/v1/symbols": "kucoin/rec_api_v1_symbols_2021-04-25.json",
            "/api/v1/market/allTickers": "kucoin/rec_api_v1_market_allTickers_2019-02-21.json",
        },
        ["BTC"],
        _kucoin,
    ),
    "gemini": Spec(
        {
            "/v1/symbols": "gemini/rec_v1_symbols_2021-06-24.json",
            "/v1/pubticker/btcusd": "gemini/rec_v1_pubticker_BTCUSD_2017-10-03.json",
        },
        ["BTC"],
        _gemini,
    ),
}


def serve(replay: ReplayServer, fixtures: Path, name: str, *, prefix: str = "") -> None:
    for path, file in SPECS[name].routes.items():
        replay.serve(prefix + path, fixtures / file)


def source_for(name: str, replay: ReplayServer, *, prefix: str = "", timeout: float = 5.0) -> CcxtRestSource:
    return CcxtRestSource(name, rest_url=replay.base_url + prefix, timeout_seconds=timeout)


@pytest.mark.parametrize("name", list(SPECS))
async def test_recorded_rest_ticker_parses_through_the_adapter(name, replay, exchange_fixtures):
    serve(replay, exchange_fixtures, name)
    expected = SPECS[name].expected(exchange_fixtures)
    source = source_for(name, replay)
    try:
        await source.open(SPECS[name].coins)
        ticks, rejected = await source.poll()
    finally:
        await source.close()
    matching = [t for t in ticks if t.pair == expected.pair]
    assert len(matching) == 1, (ticks, rejected)
    tick = matching[0]
    assert (tick.source, tick.base, tick.quote) == (name, expected.base, expected.quote)
    assert tick.price == Decimal(expected.price)
    assert tick.volume_24h == Decimal(expected.volume)
    if expected.ts_ms is None:
        assert tick.exchange_ts == tick.received_at
    else:
        assert int(tick.exchange_ts.timestamp() * 1000) == expected.ts_ms
    assert tick.exchange_ts.tzinfo is not None
    # Whatever else was asked for and not answered is reported, never turned into a tick.
    assert all(t.pair == expected.pair for t in ticks if t.base == expected.base and t.quote == expected.quote)


async def test_coinbase_source_uses_the_exchange_api(replay, exchange_fixtures):
    serve(replay, exchange_fixtures, "coinbase")
    source = source_for("coinbase", replay)
    try:
        await source.open(["BTC"])
        assert type(source.exchange).__name__ == "coinbaseexchange"
        await source.poll()
    finally:
        await source.close()
    assert replay.count("/products") == 1 and replay.count("/products/BTC-USD/ticker") == 1


async def test_kraken_codes_map_to_ours(replay, exchange_fixtures):
    """Kraken lists XXBT/ZUSD and XDG pairs; our ticks and symbols say BTC and DOGE."""
    serve(replay, exchange_fixtures, "kraken")
    pairs = load(exchange_fixtures / "kraken/rec_public_AssetPairs_FULL_2021-04-17.json")["result"]
    btc_usd = next(key for key, row in pairs.items() if row["altname"] == "XBTUSD")
    doge_usd = next(key for key, row in pairs.items() if row["altname"] == "XDGUSD")
    source = source_for("kraken", replay)
    try:
        await source.open(["BTC", "DOGE"])
        by_id = {source.exchange.markets[s]["id"]: s for s in source.symbols}
    finally:
        await source.close()
    assert by_id[btc_usd] == "BTC/USD"
    assert by_id[doge_usd] == "DOGE/USD"
    assert source.unlisted == []


async def test_okx_markets_come_from_the_pair_map(replay, exchange_fixtures):
    serve(replay, exchange_fixtures, "okx")
    source = source_for("okx", replay)
    try:
        await source.open(["BTC", "ETH"])
        ticks, rejected = await source.poll()
    finally:
        await source.close()
    assert source.symbols == ["BTC/USDT", "ETH/USDT", "BTC/USDC", "ETH/USDC"]
    # The replay answers every instId with the recorded BTC-USDT body: only the matching request becomes a tick.
    assert [(t.base, t.quote) for t in ticks] == [("BTC", "USDT")]
    assert {r.pair for r in rejected} == {"ETH-USDT", "BTC-USDC", "ETH-USDC"}
    assert not any("/api/v5/public/instruments" in p for p in replay.requests)


async def test_extra_exchange_enabled_by_name_only(replay, exchange_fixtures):
    """bybit has no profile: ccxt's bybit class is used as is. Its market list (/v5/market/instruments-info) has
    no recorded or documented payload, so loading markets fails and is reported; given a market list, the
    documented /v5/market/tickers example parses through the same adapter."""
    replay.serve("/v5/market/tickers", exchange_fixtures / "bybit/doc_v5_market_tickers_spot.json")
    doc = load(exchange_fixtures / "bybit/doc_v5_market_tickers_spot.json")
    row = doc["result"]["list"][0]
    source = source_for("bybit", replay)
    try:
        with pytest.raises(Exception) as failure:
            await source.open(["BTC"])
        assert getattr(failure.value, "kind", None) in {"rejected_request", "unavailable", "exchange_error"}
        assert any(p.startswith("/v5/market/instruments-info") for p in replay.requests)
        source.exchange.set_markets(pair_map_markets(["BTC"], ["USDT"], lambda base, quote: base + quote))
        source.symbols = ["BTC/USDT"]
        ticks, rejected = await source.poll()
    finally:
        await source.close()
    assert rejected == []
    (tick,) = ticks
    assert (tick.base, tick.quote, tick.pair) == ("BTC", "USDT", row["symbol"])
    assert tick.price == Decimal(row["lastPrice"])
    assert tick.volume_24h == Decimal(row["volume24h"])
    # The list entries carry no time (only the envelope does, and ccxt does not read it): arrival time is used.
    assert tick.exchange_ts == tick.received_at


# --- faults, through the runner that publishes and keeps health --------------------------------------------------


@pytest.fixture
def make_runner(settings: Settings, redis: Redis, sessions: Any, replay: ReplayServer) -> Callable[..., SourceRunner]:
    publisher = StreamPublisher(redis, namespace=settings.redis_namespace, maxlen=settings.stream_maxlen)

    def build(name: str, coins: list[str], *, timeout: float = 5.0) -> SourceRunner:
        runner = SourceRunner(
            source_for(name, replay, timeout=timeout),
            settings=settings,
            redis=redis,
            publisher=publisher,
            sessions=sessions,
        )
        runner.set_coins(coins)
        return runner

    return build


async def published(redis: Redis, settings: Settings) -> list[TickMessage]:
    entries = await redis.xrange(f"{settings.redis_namespace}:stream:{TICKS_STREAM}")
    return [TickMessage.from_stream(json.loads(fields[b"data"])) for _, fields in entries]


async def health(redis: Redis, settings: Settings, name: str) -> dict[str, Any]:
    return parse_health(await redis.hgetall(health_key(settings, name)))


async def error_kinds(db: Any, source: str) -> dict[str, int]:
    rows = await db.fetch("SELECT kind, count(*) AS n FROM error_log WHERE source = $1 GROUP BY kind", source)
    return {r["kind"]: r["n"] for r in rows}


@pytest.fixture
def binance(replay: ReplayServer, exchange_fixtures: Path) -> ReplayServer:
    serve(replay, exchange_fixtures, "binance")
    return replay


async def _fails_then_recovers(runner: SourceRunner, redis: Redis, settings: Settings, kind: str) -> float:
    delay = await runner.run_once()
    state = await health(redis, settings, "binance")
    assert state["errors"].get(kind) == 1, state
    assert state["backoff_seconds"] > 0
    # The fault was one reply: the next attempt goes through and the source is connected again.
    await runner.run_once()
    state = await health(redis, settings, "binance")
    assert state["state"] == "connected", state
    assert any(t.base == "BTC" for t in await published(redis, settings))
    return delay


async def test_timeout_backs_off_and_recovers(binance, make_runner, redis, settings, exchange_fixtures):
    body = (exchange_fixtures / "binance/rec_api_v1_ticker_24hr_ALL_2019-08-22.json").read_bytes()
    binance.fail_next("/api/v3/ticker/24hr", Reply(body=body, delay=3.0))
    runner = make_runner("binance", ["BTC"], timeout=0.5)
    delay = await _fails_then_recovers(runner, redis, settings, "timeout")
    assert delay >= settings.poll_interval_seconds


async def test_429_honours_retry_after(binance, make_runner, redis, settings, exchange_fixtures, db):
    body = (exchange_fixtures / "binance/rec_error_429_-1003_2019.json").read_bytes()
    runner = make_runner("binance", ["BTC"])
    await runner.run_once()  # opens and polls: fine
    binance.fail_next("/api/v3/ticker/24hr", Reply(body=body, status=429, headers={"Retry-After": "37"}))
    delay = await runner.run_once()
    state = await health(redis, settings, "binance")
    assert state["state"] == "rate_limited"
    assert delay >= 37 and state["backoff_seconds"] >= 37
    assert (await error_kinds(db, "binance")).get("rate_limited") == 1


async def test_418_is_a_ban_with_a_longer_backoff(binance, make_runner, redis, settings, exchange_fixtures):
    body = (exchange_fixtures / "binance/rec_error_429_-1003_2019.json").read_bytes()
    runner = make_runner("binance", ["BTC"])
    await runner.run_once()
    binance.fail_next("/api/v3/ticker/24hr", Reply(body=body, status=418))
    binance.fail_next("/api/v3/ticker/24hr", Reply(body=body, status=418, headers={"Retry-After": "900"}))
    delay = await runner.run_once()
    state = await health(redis, settings, "binance")
    assert state["state"] == "banned" and state["errors"]["banned"] == 1
    assert delay >= BAN_BACKOFF_SECONDS
    assert await runner.run_once() >= 900


async def test_5xx_backs_off_and_recovers(binance, make_runner, redis, settings):
    binance.fail_next("/api/v3/ticker/24hr", Reply(body=b'{"code":-1001,"msg":"Internal error"}', status=503))
    runner = make_runner("binance", ["BTC"])
    await _fails_then_recovers(runner, redis, settings, "unavailable")


async def test_truncated_json_is_a_bad_response(binance, make_runner, redis, settings, exchange_fixtures):
    body = (exchange_fixtures / "binance/rec_api_v1_ticker_24hr_ALL_2019-08-22.json").read_bytes()
    binance.fail_next("/api/v3/ticker/24hr", Reply(body=body[: len(body) // 2]))
    runner = make_runner("binance", ["BTC"])
    await _fails_then_recovers(runner, redis, settings, "bad_response")


@pytest.mark.parametrize("garble", ["reversed", "gzip"])
async def test_a_body_that_is_not_json_is_a_bad_response(
    garble, binance, make_runner, redis, settings, exchange_fixtures
):
    """Bytes that do not even start like JSON once passed ccxt as "no tickers": every market was dropped as
    unlisted and the source stayed mute, reported connected, until it was reopened."""
    import gzip

    body = (exchange_fixtures / "binance/rec_api_v1_ticker_24hr_ALL_2019-08-22.json").read_bytes()
    binance.fail_next("/api/v3/ticker/24hr", Reply(body=body[::-1] if garble == "reversed" else gzip.compress(body)))
    runner = make_runner("binance", ["BTC"])
    await _fails_then_recovers(runner, redis, settings, "bad_response")
    assert "BTC/USDT" not in runner.source.dropped  # type: ignore[attr-defined]


async def test_bad_prices_are_rejected_and_the_rest_published(
    binance, make_runner, redis, settings, exchange_fixtures, db
):
    rows = load(exchange_fixtures / "binance/rec_api_v1_ticker_24hr_ALL_2019-08-22.json")
    broken = {"BTCUSDT": "0.00000000", "ETHUSDT": "-184.80000000", "LTCUSDT": "NaN"}
    for row in rows:
        if row["symbol"] in broken:
            row["lastPrice"] = broken[row["symbol"]]
    binance.serve("/api/v3/ticker/24hr", json.dumps(rows))
    good = {r["symbol"]: r["lastPrice"] for r in rows if r["symbol"] in ("XRPUSDT", "ADAUSDT")}
    runner = make_runner("binance", ["BTC", "ETH", "LTC", "XRP", "ADA"])
    await runner.run_once()
    ticks = {t.pair: t.price for t in await published(redis, settings)}
    assert {p: ticks.get(p) for p in good} == {p: Decimal(v) for p, v in good.items()}
    assert not set(broken) & set(ticks)
    state = await health(redis, settings, "binance")
    assert state["state"] == "connected" and state["rejected_total"] >= len(broken)
    messages = await db.fetch("SELECT message FROM error_log WHERE source='binance' AND kind='rejected_quote'")
    assert all(pair in " ".join(m["message"] for m in messages) for pair in broken)


async def test_unknown_symbol_is_reported_and_the_source_keeps_running(binance, make_runner, redis, settings, db):
    runner = make_runner("binance", ["BTC", "NOTACOIN"])
    await runner.run_once()
    await runner.run_once()
    state = await health(redis, settings, "binance")
    assert state["state"] == "connected"
    assert any(t.base == "BTC" for t in await published(redis, settings))
    logged = await db.fetch("SELECT message FROM error_log WHERE source='binance' AND kind='unknown_symbol'")
    assert any("NOTACOIN" in r["message"] for r in logged)
    # Reported once per open, not on every poll.
    assert sum("NOTACOIN" in r["message"] for r in logged) == 1


async def test_single_symbol_exchange_rate_limit_stops_the_poll(
    replay, exchange_fixtures, make_runner, redis, settings
):
    serve(replay, exchange_fixtures, "coinbase")
    replay.fail_next("/products/BTC-USD/ticker", Reply(body=b'{"message":"Slow down"}', status=429,
                                                       headers={"Retry-After": "12"}))  # fmt: skip
    runner = make_runner("coinbase", ["BTC"])
    delay = await runner.run_once()
    state = await health(redis, settings, "coinbase")
    assert state["state"] == "rate_limited" and delay >= 12
    # No request was made after the 429 in that poll.
    assert replay.requests[-1] == "/products/BTC-USD/ticker"


# --- tracked coins follow the database -------------------------------------------------------------------------


async def test_all_seven_exchanges_through_the_service(
    replay, exchange_fixtures, settings, redis, sessions, monkeypatch
):
    for name in SPECS:
        serve(replay, exchange_fixtures, name, prefix=f"/{name}")
        monkeypatch.setenv(f"COINLYTICS_SOURCE_{name.upper()}_REST_URL", f"{replay.base_url}/{name}")
    configured = make_settings(
        settings.require_database_url(), settings.require_redis_url(), settings.redis_namespace,
        sources=list(SPECS), coins=["BTC", "BCH"],
    )  # fmt: skip
    publisher = StreamPublisher(redis, namespace=settings.redis_namespace, maxlen=settings.stream_maxlen)
    service = IngestService(configured, redis=redis, publisher=publisher, sessions=sessions)
    supervisor = Supervisor("ingest")
    await service.start(supervisor)
    try:
        expected = {name: spec.expected(exchange_fixtures) for name, spec in SPECS.items()}

        async def all_in() -> bool:
            seen = {(t.source, t.pair, t.price) for t in await published(redis, settings)}
            return all((n, e.pair, Decimal(e.price)) in seen for n, e in expected.items())

        await eventually(all_in, timeout=30)
    finally:
        await supervisor.stop()


async def test_coins_added_and_removed_in_the_table_are_followed(binance, settings, redis, sessions, db, monkeypatch):
    monkeypatch.setenv("COINLYTICS_SOURCE_BINANCE_REST_URL", binance.base_url)
    configured = make_settings(
        settings.require_database_url(), settings.require_redis_url(), settings.redis_namespace,
        sources=["binance"], coins=["BTC"], coins_refresh_seconds=0.2,
    )  # fmt: skip
    publisher = StreamPublisher(redis, namespace=settings.redis_namespace, maxlen=settings.stream_maxlen)
    service = IngestService(configured, redis=redis, publisher=publisher, sessions=sessions)
    supervisor = Supervisor("ingest")
    await service.start(supervisor)
    try:
        # Before pricing seeded the coins table, ingest tracks the configured coins (and writes no coins row).
        assert await db.fetchval("SELECT count(*) FROM coins") == 0

        async def bases() -> set[str]:
            return {t.base for t in await published(redis, settings)}

        await eventually(lambda: _has(bases, "BTC"))
        # Pricing seeds the table (the configured BTC), then an admin adds ETH.
        await db.execute("INSERT INTO coins (symbol, active) VALUES ('BTC', true)")
        await db.execute("INSERT INTO coins (symbol, active) VALUES ('ETH', true)")
        await eventually(lambda: _has(bases, "ETH"))
        await db.execute("UPDATE coins SET active = false WHERE symbol = 'BTC'")
        runner = service.runners[0]
        await eventually(lambda: _true(runner.coins == ["ETH"] and runner.opened))
        mark = len(await published(redis, settings))
        await eventually(lambda: _more_than(redis, settings, mark + 2))
        later = (await published(redis, settings))[mark:]
        assert later and {t.base for t in later} == {"ETH"}
    finally:
        await supervisor.stop()


async def _has(bases: Callable[[], Any], symbol: str) -> bool:
    return symbol in await bases()


async def _true(value: bool) -> bool:
    return value


async def _more_than(redis: Redis, settings: Settings, count: int) -> bool:
    return len(await published(redis, settings)) > count


def test_parse_retry_after_accepts_seconds_and_dates():
    from email.utils import format_datetime

    from shared.http import parse_retry_after

    assert parse_retry_after("120") == 120
    soon = datetime.now(UTC).timestamp() + 60
    parsed = parse_retry_after(format_datetime(datetime.fromtimestamp(soon, tz=UTC), usegmt=True))
    assert parsed is not None and 50 < parsed <= 60
    assert parse_retry_after("soon") is None
