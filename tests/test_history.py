"""Price history: candles from consolidated prices, aggregation, roll-ups, retention, the history
endpoint, and exchange backfill replayed from recorded payloads."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from services.conversion.tasks import snapshot_retention_job
from services.gateway.auth.tasks import activity_retention
from services.ingest.repository import delete_errors_before
from services.ingest.tasks import error_log_retention
from services.pricing.app import create_app as pricing_app
from services.pricing.history import tasks
from services.pricing.history.backfill import Backfiller, BackfillError
from services.pricing.history.service import (
    HistoryService,
    choose_interval,
    enforce_retention,
    plan_query,
    record_consolidated,
    roll_up,
)
from services.pricing.service import PriceCache, PricingService
from shared.db import delete_in_batches, delete_older_than, transaction
from shared.messages import TickMessage
from shared.settings import Settings
from shared.streams import StreamPublisher
from tests.conftest import make_settings, serve_app
from tests.replay import ReplayServer, Reply, strip_jsonc

TICKER_LIST = "rec_api_v1_ticker_24hr_ALL_2019-08-22.json"
# Five recorded BTC markets of one Binance snapshot: their prices make the tick sequence.
BTC_ROWS = ("BTCUSDT", "BTCTUSD", "BTCPAX", "BTCUSDC", "BTCUSDS")


def ms(ts: datetime) -> int:
    return int(ts.timestamp() * 1000)


def minute(ts: datetime) -> datetime:
    return ts.replace(second=0, microsecond=0)


def recorded_rows(fixtures: Path) -> dict[str, dict[str, Any]]:
    rows = json.loads((fixtures / "binance" / TICKER_LIST).read_text())
    return {r["symbol"]: r for r in rows}


def tick_sequence(fixtures: Path) -> list[tuple[datetime, Decimal]]:
    """(time, price): the recorded prices, each at its recorded close time plus 25 s per position, so
    the sequence spans three minutes."""
    rows = recorded_rows(fixtures)
    out = []
    for i, symbol in enumerate(BTC_ROWS):
        row = rows[symbol]
        ts = datetime.fromtimestamp(row["closeTime"] / 1000, tz=UTC) + timedelta(seconds=25 * i)
        out.append((ts, Decimal(row["lastPrice"])))
    return out


def tick(ts: datetime, price: Decimal, source: str = "binance") -> TickMessage:
    return TickMessage(
        tick_id=f"{source}:BTCUSD:{ms(ts)}:{price}",
        source=source,
        base="BTC",
        quote="USD",
        pair="BTCUSD",
        price=price,
        volume_24h=Decimal(1),
        exchange_ts=ts,
        received_at=ts,
    )


def hand_candles(points: list[tuple[datetime, Decimal]], seconds: int) -> dict[datetime, tuple[Decimal, ...]]:
    """OHLC per bucket, computed the plain way (buckets aligned on the epoch)."""
    buckets: dict[datetime, list[tuple[datetime, Decimal]]] = {}
    for ts, price in points:
        start = datetime.fromtimestamp(int(ts.timestamp()) // seconds * seconds, tz=UTC)
        buckets.setdefault(start, []).append((ts, price))
    out = {}
    for start, items in buckets.items():
        items.sort()
        prices = [p for _, p in items]
        out[start] = (items[0][1], max(prices), min(prices), items[-1][1])
    return out


async def stored_candles(db: Any, interval: str = "1m") -> dict[datetime, tuple[Decimal, ...]]:
    rows = await db.fetch(
        "SELECT t, open, high, low, close FROM candles WHERE base='BTC' AND vs='USD' AND interval=$1 ORDER BY t",
        interval,
    )
    return {r["t"]: (r["open"], r["high"], r["low"], r["close"]) for r in rows}


@pytest.fixture
def pricing(settings: Settings, sessions: Any, redis: Redis) -> PricingService:
    return PricingService(
        settings,
        sessions=sessions,
        publisher=StreamPublisher(redis, namespace=settings.redis_namespace, maxlen=1000),
        cache=PriceCache(redis, settings),
    )


# --- candles from consolidated prices ---------------------------------------------------------------


async def test_candles_from_recorded_tick_sequence_equal_hand_computed_ohlc(exchange_fixtures, pricing, db):
    sequence = tick_sequence(exchange_fixtures)
    for ts, price in sequence:
        await pricing.apply_ticks([tick(ts, price)])
    expected = hand_candles(sequence, 60)
    assert len(expected) >= 2  # the sequence crosses minutes
    assert await stored_candles(db) == expected
    volumes = await db.fetch("SELECT volume, source FROM candles WHERE interval='1m'")
    assert {(r["volume"], r["source"]) for r in volumes} == {(None, "consolidated")}


async def test_replaying_the_same_ticks_changes_nothing(exchange_fixtures, pricing, db):
    ticks = [tick(ts, price) for ts, price in tick_sequence(exchange_fixtures)]
    for t in ticks:
        await pricing.apply_ticks([t])
    snapshot = await db.fetch("SELECT * FROM candles ORDER BY base, vs, interval, t")
    # Once as redelivered stream entries, once after raw-tick retention removed them (so they are new
    # ticks to pricing again), once as one batch.
    for t in ticks:
        await pricing.apply_ticks([t])
    await db.execute("DELETE FROM ticks")
    for t in ticks:
        await pricing.apply_ticks([t])
    await pricing.apply_ticks(ticks)
    assert await db.fetch("SELECT * FROM candles ORDER BY base, vs, interval, t") == snapshot


@dataclass
class Point:
    base: str
    vs: str
    price: Decimal
    last_updated: datetime


async def test_out_of_order_points_give_the_in_order_candles(exchange_fixtures, sessions, db):
    sequence = tick_sequence(exchange_fixtures)
    shuffled = [sequence[i] for i in (3, 0, 4, 2, 1)]
    for ts, price in shuffled:
        async with transaction(sessions) as session:
            await record_consolidated(session, [Point("BTC", "USD", price, ts)])
    assert await stored_candles(db) == hand_candles(sequence, 60)
    before = await db.fetch("SELECT * FROM candles ORDER BY t")
    async with transaction(sessions) as session:
        await record_consolidated(session, [Point("BTC", "USD", p, ts) for ts, p in shuffled])
    assert await db.fetch("SELECT * FROM candles ORDER BY t") == before


# --- aggregation, roll-ups, retention -------------------------------------------------------------


def spread_sequence(fixtures: Path, start: datetime, count: int, every: timedelta) -> list[tuple[datetime, Decimal]]:
    """Recorded BTC/ETH/other prices cycled over ``count`` points ``every`` apart."""
    rows = recorded_rows(fixtures)
    prices = [Decimal(rows[s]["lastPrice"]) for s in BTC_ROWS]
    prices += [Decimal(rows[s]["highPrice"]) for s in BTC_ROWS] + [Decimal(rows[s]["lowPrice"]) for s in BTC_ROWS]
    return [(start + i * every, prices[(i * 7) % len(prices)]) for i in range(count)]


async def record(sessions: Any, points: list[tuple[datetime, Decimal]]) -> None:
    async with transaction(sessions) as session:
        await record_consolidated(session, [Point("BTC", "USD", p, ts) for ts, p in points])


def as_ohlc(rows: list[dict[str, Any]]) -> dict[datetime, tuple[Decimal, ...]]:
    return {r["t"]: (r["open"], r["high"], r["low"], r["close"]) for r in rows}


async def test_coarser_intervals_aggregate_the_minutes(exchange_fixtures, settings, sessions):
    start = datetime(2019, 8, 22, 3, 2, 13, tzinfo=UTC)
    points = spread_sequence(exchange_fixtures, start, 60, timedelta(seconds=137))
    await record(sessions, points)
    service = HistoryService(sessions, vs_currencies=settings.vs_currencies)
    end = points[-1][0] + timedelta(seconds=1)
    for interval, seconds in (("5m", 300), ("15m", 900), ("1h", 3600)):
        query = plan_query("BTC", "USD", start, end, interval, now=end)
        got = as_ohlc(await service.candles(query))
        assert got == hand_candles(points, seconds), interval
    # An hourly row that is stored wins over the minutes of that hour.
    await roll_up(sessions, end + timedelta(hours=2))
    query = plan_query("BTC", "USD", start, end, "1h", now=end)
    assert as_ohlc(await service.candles(query)) == hand_candles(points, 3600)


async def test_rollup_materialises_hours_and_days_and_retention_keeps_them(exchange_fixtures, settings, sessions, db):
    now = datetime.now(UTC)
    old_start = (now - timedelta(days=120)).replace(hour=5, minute=0, second=0, microsecond=0)
    recent_start = now - timedelta(minutes=30)
    old_points = spread_sequence(exchange_fixtures, old_start, 30, timedelta(minutes=9))
    recent_points = spread_sequence(exchange_fixtures, recent_start, 5, timedelta(minutes=4))
    await record(sessions, old_points + recent_points)
    # Raw ticks: some past the 48 h default, some recent.
    for age_hours, name in ((72, "old-1"), (50, "old-2"), (1, "new-1")):
        received = now - timedelta(hours=age_hours)
        await db.execute(
            "INSERT INTO ticks (tick_id, source, base, quote, price, exchange_ts, received_at) "
            "VALUES ($1, 'binance', 'BTC', 'USD', 1, $2, $2)",
            name,
            received,
        )
    minutes_before = await db.fetchval("SELECT count(*) FROM candles WHERE interval='1m'")

    ctx = tasks.job_context(settings, sessions)
    deleted = await tasks.history_retention(ctx)

    assert deleted["ticks"] == 2
    assert [r["tick_id"] for r in await db.fetch("SELECT tick_id FROM ticks")] == ["new-1"]
    recent_minutes = len(hand_candles(recent_points, 60))
    assert deleted["candles_1m"] == minutes_before - recent_minutes
    assert await db.fetchval("SELECT count(*) FROM candles WHERE interval='1m'") == recent_minutes
    assert await db.fetchval("SELECT min(t) FROM candles WHERE interval='1m'") >= now - timedelta(days=90)
    # The hours and the day of the deleted minutes survive, with the same values.
    assert await stored_candles(db, "1h") == {
        t: v for t, v in hand_candles(old_points + recent_points, 3600).items() if t + timedelta(hours=1) <= now
    }
    assert await stored_candles(db, "1d") == hand_candles(old_points, 86_400)
    sources = await db.fetch("SELECT DISTINCT source FROM candles WHERE interval IN ('1h', '1d')")
    assert {r["source"] for r in sources} == {"rollup"}

    # Idempotent: a second run deletes and rewrites nothing.
    snapshot = await db.fetch("SELECT * FROM candles ORDER BY interval, t")
    again = await tasks.history_retention(ctx)
    assert again == {"ticks": 0, "candles_1m": 0}
    assert await db.fetch("SELECT * FROM candles ORDER BY interval, t") == snapshot


async def test_retention_job_prunes_snapshots_error_log_and_activity_by_their_settings(settings, sessions, db):
    now = datetime.now(UTC)
    conf = settings.model_copy(
        update={"retention_rate_snapshots_days": 30, "retention_error_log_days": 7, "retention_user_activity_days": 365}
    )
    for name, age in (("snap-old", timedelta(days=31)), ("snap-new", timedelta(days=29))):
        await db.execute(
            "INSERT INTO rate_snapshots (taken_at, base, rates) VALUES ($1, $2, '{}'::jsonb)", now - age, name
        )
    for name, age in (
        ("err-old", timedelta(days=8)),
        ("err-older", timedelta(days=60)),
        ("err-new", timedelta(days=6)),
    ):
        await db.execute(
            "INSERT INTO error_log (source, kind, message, created_at) VALUES ('ecb', 'timeout', $1, $2)",
            name,
            now - age,
        )
    user_id = await db.fetchval(
        "INSERT INTO users (id, email, password_hash) VALUES (gen_random_uuid(), 'ret@example.com', 'x') RETURNING id"
    )
    for name, age in (("act-old", timedelta(days=366)), ("act-new", timedelta(days=364))):
        await db.execute(
            "INSERT INTO user_activity (user_id, kind, created_at) VALUES ($1, $2, $3)", user_id, name, now - age
        )

    # Each owner expires its own table, in its own worker's job.
    ctx = {"settings": conf, "sessions": sessions}
    assert await snapshot_retention_job(ctx) == {"rate_snapshots": 1}
    assert await error_log_retention(ctx) == {"error_log": 2}
    assert await activity_retention(ctx) == {"user_activity": 1}
    assert [r["base"] for r in await db.fetch("SELECT base FROM rate_snapshots")] == ["snap-new"]
    assert [r["message"] for r in await db.fetch("SELECT message FROM error_log")] == ["err-new"]
    assert [r["kind"] for r in await db.fetch("SELECT kind FROM user_activity")] == ["act-new"]
    # A longer setting keeps more: nothing left is older than 7 days of error log, so a 1-day setting prunes it.
    shorter = conf.model_copy(update={"retention_error_log_days": 1})
    assert await error_log_retention({"settings": shorter, "sessions": sessions}) == {"error_log": 1}
    assert await db.fetchval("SELECT count(*) FROM error_log") == 0
    # Pricing's own retention job leaves other services' tables alone.
    assert set(await tasks.history_retention(tasks.job_context(conf, sessions))) == {"ticks", "candles_1m"}


async def test_log_retention_deletes_in_batches(sessions, db):
    now = datetime.now(UTC)
    for i in range(5):
        await db.execute(
            "INSERT INTO error_log (source, kind, message, created_at) VALUES ('ecb', 'parse', $1, $2)",
            f"e{i}",
            now - timedelta(days=40),
        )
    deleted = await delete_in_batches(sessions, delete_errors_before, now - timedelta(days=30), 2)
    assert deleted == 5
    assert await db.fetchval("SELECT count(*) FROM error_log") == 0


async def test_retention_deletes_in_batches(exchange_fixtures, sessions, db):
    now = datetime.now(UTC)
    points = spread_sequence(exchange_fixtures, now - timedelta(days=100), 7, timedelta(minutes=3))
    await record(sessions, points)
    deleted = await enforce_retention(sessions, now, ticks_hours=48, candles_1m_days=90, batch=2)
    assert deleted["candles_1m"] == len(hand_candles(points, 60))
    assert await db.fetchval("SELECT count(*) FROM candles WHERE interval='1m'") == 0


async def test_batched_delete_keeps_rows_at_or_after_the_cutoff_and_refuses_odd_names(sessions, db):
    now = datetime.now(UTC)
    for age in (3, 2, 1, 0):
        await db.execute(
            "INSERT INTO error_log (source, kind, message, created_at) VALUES ('ecb', 'parse', 'x', $1)",
            now - timedelta(days=age),
        )
    async with transaction(sessions) as session:
        first = await delete_older_than(session, "error_log", "created_at", now - timedelta(days=1), 1)
    async with transaction(sessions) as session:
        rest = await delete_older_than(session, "error_log", "created_at", now - timedelta(days=1), 10)
    assert (first, rest) == (1, 1)
    kept = await db.fetch("SELECT created_at FROM error_log ORDER BY created_at")
    assert [row["created_at"] for row in kept] == [now - timedelta(days=1), now]
    async with transaction(sessions) as session:
        with pytest.raises(ValueError, match="identifier"):
            await delete_older_than(session, "error_log; DROP TABLE ticks", "created_at", now, 10)


def test_auto_interval_follows_coingecko_granularity():
    end = datetime(2024, 1, 1, tzinfo=UTC)
    cases = [
        (timedelta(hours=1), "5m"),
        (timedelta(days=1), "5m"),
        (timedelta(days=1, seconds=1), "1h"),
        (timedelta(days=90), "1h"),
        (timedelta(days=90, seconds=1), "1d"),
        (timedelta(days=3650), "1d"),
    ]
    assert [choose_interval(end - span, end) for span, _ in cases] == [want for _, want in cases]


# --- the endpoint -------------------------------------------------------------------------------


@pytest.fixture
async def pricing_url(settings: Settings) -> AsyncIterator[str]:
    async with serve_app(pricing_app(settings)) as url:
        yield url


async def test_history_endpoint_serves_candles_and_says_the_interval(exchange_fixtures, pricing_url, sessions):
    end = datetime.now(UTC).replace(second=0, microsecond=0)
    points = spread_sequence(exchange_fixtures, end - timedelta(hours=3), 40, timedelta(seconds=263))
    await record(sessions, points)
    async with httpx.AsyncClient(base_url=pricing_url) as client:
        response = await client.get(
            "/api/v1/prices/btc/history",
            params={"vs": "usd", "start": int((end - timedelta(hours=3)).timestamp()), "end": end.isoformat()},
        )
        assert response.status_code == 200, response.text
        assert response.headers["x-interval"] == "5m"
        body = json.loads(response.text, parse_float=Decimal, parse_int=Decimal)
        got = {
            datetime.fromisoformat(c["t"].replace("Z", "+00:00")): (c["open"], c["high"], c["low"], c["close"])
            for c in body
        }
        assert got == hand_candles([p for p in points if p[0] < end], 300)
        assert all(c["t"].endswith("Z") and c["volume"] is None for c in body)

        for span, want in ((timedelta(days=30), "1h"), (timedelta(days=400), "1d")):
            r = await client.get(
                "/api/v1/prices/BTC/history", params={"start": (end - span).isoformat(), "end": end.isoformat()}
            )
            assert r.status_code == 200 and r.headers["x-interval"] == want
        # Defaults: the last day, auto interval.
        r = await client.get("/api/v1/prices/BTC/history")
        assert r.status_code == 200 and r.headers["x-interval"] == "5m"


ERROR_CASES = [
    ("/api/v1/prices/BTC/history", {"interval": "2m"}, 422, "validation_error"),
    ("/api/v1/prices/BTC/history", {"start": "2024-01-02", "end": "2024-01-01"}, 422, "validation_error"),
    ("/api/v1/prices/BTC/history", {"start": "1704067200", "end": "1704067200"}, 422, "validation_error"),
    ("/api/v1/prices/BTC/history", {"start": "yesterday"}, 422, "validation_error"),
    ("/api/v1/prices/BTC/history", {"start": "2020-01-01", "end": "2024-01-01", "interval": "1m"}, 422,
     "validation_error"),
    ("/api/v1/prices/NOPE/history", {}, 404, "unknown_symbol"),
    ("/api/v1/prices/B$C/history", {}, 422, "validation_error"),
    ("/api/v1/prices/BTC/history", {"vs": "XYZ"}, 404, "unknown_currency"),
]  # fmt: skip


async def test_history_endpoint_errors(pricing_url):
    async with httpx.AsyncClient(base_url=pricing_url) as client:
        for path, params, status, code in ERROR_CASES:
            response = await client.get(path, params=params)
            assert response.status_code == status, (path, params, response.text)
            error = response.json()["error"]
            assert error["code"] == code, (path, params)
            assert error["message"]
        # The limit's message names an interval that fits.
        response = await client.get(
            "/api/v1/prices/BTC/history", params={"start": "2023-01-01", "end": "2024-01-01", "interval": "5m"}
        )
        assert response.status_code == 422
        assert "interval=1h" in response.json()["error"]["message"]
        # The spec documents the route.
        spec = (await client.get("/openapi.json")).json()
    op = spec["paths"]["/api/v1/prices/{symbol}/history"]["get"]
    assert {p["name"] for p in op["parameters"]} >= {"symbol", "vs", "start", "end", "interval"}
    assert {"200", "404", "422"} <= set(op["responses"])
    assert "Example" in op["description"]
    assert "x-interval" in {h.lower() for h in op["responses"]["200"]["headers"]}


# --- backfill -----------------------------------------------------------------------------------

KUCOIN_CANDLES = "/api/v1/market/candles"


def serve_kucoin(server: ReplayServer, fixtures: Path) -> None:
    kucoin = fixtures / "kucoin"
    # ccxt asks /api/v2/symbols; the recorded list is the v1 one, whose rows have the same fields.
    server.serve("/api/v2/symbols", kucoin / "rec_api_v1_symbols_2021-04-25.json")
    server.serve("/api/v1/market/allTickers", kucoin / "rec_api_v1_market_allTickers_2019-02-21.json")
    server.serve(KUCOIN_CANDLES, kucoin / "rec_api_v1_market_candles_BTC-USDT_1day_3rows.json")


def kucoin_expected(fixtures: Path) -> dict[datetime, tuple[Decimal, ...]]:
    # KuCoin's documented column order: time (s), open, close, high, low, volume, turnover.
    body = json.loads((fixtures / "kucoin" / "rec_api_v1_market_candles_BTC-USDT_1day_3rows.json").read_text())
    return {
        datetime.fromtimestamp(int(r[0]), tz=UTC): (Decimal(r[1]), Decimal(r[3]), Decimal(r[4]), Decimal(r[2]),
                                                     Decimal(r[5]))
        for r in body["data"]
    }  # fmt: skip


class FaultAfterFirstPage:
    """A progress bar stand-in that makes the exchange fail once the first page is stored."""

    def __init__(self, replay: ReplayServer) -> None:
        self.replay = replay
        self.pages = 0

    def update(self, n: float | None = 1) -> bool | None:
        self.pages += 1
        if self.pages == 1:
            self.replay.fail_next(KUCOIN_CANDLES, Reply(body=b'{"code":"500000","msg":"down"}', status=503), times=5)
        return None

    def close(self) -> None:
        return None


@pytest.fixture
def kucoin_settings(exchange_fixtures, replay, settings, monkeypatch) -> Settings:
    serve_kucoin(replay, exchange_fixtures)
    monkeypatch.setenv("COINLYTICS_SOURCE_KUCOIN_REST_URL", replay.base_url)
    return make_settings(settings.database_url, settings.redis_url, settings.redis_namespace)


async def test_backfill_stores_recorded_candles_resumes_and_skips(
    exchange_fixtures, replay, kucoin_settings, sessions, db
):
    end = datetime(2021, 9, 22, tzinfo=UTC)
    expected = kucoin_expected(exchange_fixtures)

    def backfiller(**kw: Any) -> Backfiller:
        return Backfiller(
            kucoin_settings, sessions, source="kucoin", page_limit=1, max_attempts=2, base_delay=0.01, **kw
        )

    # First run: one page (the newest day) lands, then the exchange goes down.
    with pytest.raises(BackfillError):
        await backfiller(progress_factory=lambda label, total: FaultAfterFirstPage(replay)).run(
            ["BTC"], vs="USD", days=3, intervals=["1d"], end=end
        )
    rows = await db.fetch("SELECT t FROM candles WHERE interval='1d'")
    assert [r["t"] for r in rows] == [datetime(2021, 9, 21, tzinfo=UTC)]
    progress = await db.fetchrow("SELECT * FROM backfill_progress")
    assert (progress["source"], progress["interval"]) == ("kucoin", "1d")
    assert (progress["oldest"], progress["newest"]) == (datetime(2021, 9, 21, tzinfo=UTC), end)

    # Second run resumes: only the two missing days are asked for.
    replay.faults.clear()
    before = replay.count(KUCOIN_CANDLES)
    report = await backfiller().run(["BTC"], vs="USD", days=3, intervals=["1d"], end=end)
    assert replay.count(KUCOIN_CANDLES) - before == 2
    assert report.stored == 2 and report.tasks[0].market == "BTC/USDT"
    stored = await db.fetch(
        "SELECT t, open, high, low, close, volume, source FROM candles WHERE base='BTC' AND vs='USD' AND interval='1d'"
    )
    assert {r["t"]: (r["open"], r["high"], r["low"], r["close"], r["volume"]) for r in stored} == expected
    assert {r["source"] for r in stored} == {"kucoin:BTC/USDT"}

    # Third run: everything is loaded, the exchange is not contacted at all.
    seen = len(replay.requests)
    report = await backfiller().run(["BTC"], vs="USD", days=3, intervals=["1d"], end=end)
    assert len(replay.requests) == seen and report.stored == 0
    assert report.tasks[0].skipped == "already loaded"

    # Without progress records, stored candles are still not fetched again.
    await db.execute("DELETE FROM backfill_progress")
    before = replay.count(KUCOIN_CANDLES)
    report = await backfiller().run(["BTC"], vs="USD", days=3, intervals=["1d"], end=end)
    assert replay.count(KUCOIN_CANDLES) == before and report.tasks[0].pages_skipped == 3


async def test_backfilled_candles_are_served_by_the_endpoint(exchange_fixtures, kucoin_settings, sessions):
    end = datetime(2021, 9, 22, tzinfo=UTC)
    await Backfiller(kucoin_settings, sessions, source="kucoin").run(["BTC"], days=3, intervals=["1d"], end=end)
    async with serve_app(pricing_app(kucoin_settings)) as url, httpx.AsyncClient(base_url=url) as client:
        # auto would pick hourly for three days; only daily candles were loaded, so it serves those.
        response = await client.get("/api/v1/prices/BTC/history", params={"start": "2021-09-19", "end": "1632268800"})
    assert response.status_code == 200 and response.headers["x-interval"] == "1d"
    body = json.loads(response.text, parse_float=Decimal, parse_int=Decimal)
    got = {
        datetime.fromisoformat(c["t"].replace("Z", "+00:00")): (c["open"], c["high"], c["low"], c["close"], c["volume"])
        for c in body
    }
    assert got == kucoin_expected(exchange_fixtures)


async def test_backfill_from_binance_klines(exchange_fixtures, replay, settings, sessions, db, monkeypatch):
    binance = exchange_fixtures / "binance"
    replay.serve("/api/v3/exchangeInfo", binance / "rec_api_v3_exchangeInfo_FULL_2021-10-12.json")
    klines = strip_jsonc((binance / "doc_api_v3_klines.jsonc").read_text())
    replay.serve("/api/v3/klines", klines)
    monkeypatch.setenv("COINLYTICS_SOURCE_BINANCE_REST_URL", replay.base_url)
    local = make_settings(settings.database_url, settings.redis_url, settings.redis_namespace)
    row = json.loads(klines)[0]
    opened = datetime.fromtimestamp(row[0] / 1000, tz=UTC)
    report = await Backfiller(local, sessions, source="binance").run(
        ["BTC"], vs="USD", days=1, intervals=["1d"], end=opened + timedelta(days=1)
    )
    assert report.stored == 1 and report.tasks[0].market == "BTC/USDT"
    stored = await db.fetchrow("SELECT * FROM candles WHERE interval='1d'")
    assert stored["t"] == opened
    assert (stored["open"], stored["high"], stored["low"], stored["close"], stored["volume"]) == tuple(
        Decimal(v) for v in row[1:6]
    )
    assert stored["source"] == "binance:BTC/USDT"


def test_the_documented_interval_enum_is_the_list_the_planner_accepts():
    from typing import get_args

    from services.pricing.history.api import Interval
    from services.pricing.history.service import INTERVAL_CHOICES

    assert sorted(get_args(Interval)) == sorted(INTERVAL_CHOICES)
