"""CoinGecko market-data job against a local server replaying CoinGecko's documented /coins/markets
example (derived JSON) and its real recorded 429 body."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from services.ingest.app import create_app as ingest_app
from services.ingest.coingecko.client import CoinGeckoClient
from services.ingest.coingecko.service import CoinGeckoRefresher
from shared.db import create_engine, session_factory
from shared.http import parse_retry_after
from tests.accounts import InternalCredential
from tests.conftest import eventually, make_settings, serve_app
from tests.replay import ReplayServer, Reply

MARKETS = "/coins/markets"


def markets_file(fixtures: Path) -> Path:
    return fixtures / "coingecko" / "derived" / "doc_coins_markets.derived.json"


def recorded_bitcoin(fixtures: Path) -> dict:
    rows = json.loads(markets_file(fixtures).read_text(), parse_float=Decimal, parse_int=Decimal)
    return next(r for r in rows if r["id"] == "bitcoin")


def recorded_429(fixtures: Path) -> bytes:
    return (fixtures / "coingecko" / "rec_error_429_rate_limit.json").read_bytes()


@pytest.fixture
async def make_refresher(settings, redis, replay: ReplayServer) -> AsyncIterator:
    engine = create_engine(settings.database_url)
    made: list[CoinGeckoRefresher] = []

    def make(*, known_ids: dict[str, str] | None = None, settings_=None) -> CoinGeckoRefresher:
        refresher = CoinGeckoRefresher(
            settings_ or settings,
            sessions=session_factory(engine),
            redis=redis,
            client=CoinGeckoClient(replay.base_url, timeout_seconds=5, min_spacing=0),
            known_ids=known_ids,
            min_run_spacing=0,
        )
        made.append(refresher)
        return refresher

    yield make
    for refresher in made:
        await refresher.close()
    await engine.dispose()


async def track(db, *symbols: str, inactive: tuple[str, ...] = ()) -> None:
    for symbol in symbols:
        await db.execute("INSERT INTO coins (symbol, active) VALUES ($1, true)", symbol)
    for symbol in inactive:
        await db.execute("INSERT INTO coins (symbol, active) VALUES ($1, false)", symbol)


async def health(redis, settings) -> dict[str, str]:
    raw = await redis.hgetall(settings.key("source", "coingecko"))
    return {k.decode(): v.decode() for k, v in raw.items()}


async def test_market_data_is_stored_from_the_payload(make_refresher, replay, exchange_fixtures, db, redis, settings):
    replay.serve(MARKETS, markets_file(exchange_fixtures))
    await track(db, "BTC", "ETH", inactive=("SOL",))
    refresher = make_refresher()

    result = await refresher.run()

    btc = recorded_bitcoin(exchange_fixtures)
    row = await db.fetchrow("SELECT * FROM coin_market_data WHERE symbol = 'BTC'")
    assert row["coingecko_id"] == "bitcoin"
    assert row["name"] == btc["name"]
    assert row["market_cap_usd"] == btc["market_cap"]
    assert row["circulating_supply"] == btc["circulating_supply"]
    assert row["total_supply"] == btc["total_supply"]
    # The recorded example holds Bitcoin only: ETH stays without data and the gap is logged.
    assert await db.fetchval("SELECT count(*) FROM coin_market_data") == 1
    assert result.missing == ["ETH"]
    missing = await db.fetchrow("SELECT kind, message FROM error_log WHERE source = 'coingecko'")
    assert missing["kind"] == "missing_coin" and "ETH" in missing["message"]
    # Active coins only, by their fixed CoinGecko ids, in USD.
    [(path, query)] = replay.queries
    assert path == MARKETS
    assert sorted(query["ids"].split(",")) == ["bitcoin", "ethereum"]
    assert query["vs_currency"] == "usd"
    state = await health(redis, settings)
    assert state["state"] == "connected"
    assert state["messages_total"] == "1"
    assert state["last_message_at"]

    await refresher.run()  # a repeated run rewrites the same values
    again = await db.fetchrow("SELECT * FROM coin_market_data WHERE symbol = 'BTC'")
    assert again["market_cap_usd"] == btc["market_cap"]
    assert await db.fetchval("SELECT count(*) FROM coin_market_data") == 1


async def test_429_backs_off_and_records_the_error(make_refresher, replay, exchange_fixtures, db, redis, settings):
    replay.serve(MARKETS, markets_file(exchange_fixtures))
    replay.fail_next(MARKETS, Reply(body=recorded_429(exchange_fixtures), status=429, headers={"Retry-After": "120"}))
    await track(db, "BTC")
    refresher = make_refresher()

    result = await refresher.run()

    assert result.status == "failed"
    error = await db.fetchrow("SELECT kind, message FROM error_log WHERE source = 'coingecko'")
    assert error["kind"] == "rate_limited"
    assert "exceeded the Rate Limit" in error["message"]
    state = await health(redis, settings)
    assert state["state"] == "rate_limited"
    assert float(state["backoff_seconds"]) >= 120
    assert state["errors"] == "rate_limited=1"
    assert await db.fetchval("SELECT count(*) FROM coin_market_data") == 0

    # Within Retry-After the next scheduled run makes no call at all.
    skipped = await refresher.run()
    assert skipped.status == "skipped"
    assert replay.count(MARKETS) == 1

    # Once the deadline has passed (its Redis key expired), the next run succeeds and clears the state.
    await redis.delete(settings.key("coingecko", "not_before"))
    recovered = await refresher.run()
    assert recovered.status == "ok" and recovered.updated == ["BTC"]
    assert (await health(redis, settings))["state"] == "connected"


async def test_429_without_retry_after_still_backs_off(make_refresher, replay, exchange_fixtures, db, redis, settings):
    replay.fail_next(MARKETS, Reply(body=recorded_429(exchange_fixtures), status=429))
    await track(db, "BTC")
    refresher = make_refresher()

    assert (await refresher.run()).status == "failed"
    assert float((await health(redis, settings))["backoff_seconds"]) > 0
    assert (await refresher.run()).status == "skipped"
    assert replay.count(MARKETS) == 1


async def test_truncated_json_is_a_logged_failure_and_keeps_stored_data(
    make_refresher, replay, exchange_fixtures, db, redis, settings
):
    replay.serve(MARKETS, markets_file(exchange_fixtures))
    await track(db, "BTC")
    refresher = make_refresher()
    assert (await refresher.run()).status == "ok"
    before = await db.fetchrow("SELECT market_cap_usd, updated_at FROM coin_market_data WHERE symbol = 'BTC'")

    body = markets_file(exchange_fixtures).read_bytes()
    replay.fail_next(MARKETS, Reply(body=body[: len(body) // 2]))
    result = await refresher.run()

    assert result.status == "failed"
    error = await db.fetchrow("SELECT kind, message FROM error_log WHERE source = 'coingecko' ORDER BY id DESC")
    assert error["kind"] == "bad_response"
    assert "invalid JSON" in error["message"]
    assert (await health(redis, settings))["state"] == "down"
    after = await db.fetchrow("SELECT market_cap_usd, updated_at FROM coin_market_data WHERE symbol = 'BTC'")
    assert after == before


async def test_server_error_is_a_logged_failure(make_refresher, replay, exchange_fixtures, db, redis, settings):
    replay.fail_next(MARKETS, Reply(body=b"<html>502 Bad Gateway</html>", status=502))
    await track(db, "BTC")
    result = await make_refresher().run()
    assert result.status == "failed"
    assert await db.fetchval("SELECT kind FROM error_log WHERE source = 'coingecko'") == "unavailable"
    assert (await health(redis, settings))["state"] == "down"


async def test_unmapped_symbols_are_looked_up_once(make_refresher, replay, exchange_fixtures, db, redis, settings):
    replay.serve(MARKETS, markets_file(exchange_fixtures))
    await track(db, "BTC", "ZZZ")
    # No built-in ids: both symbols go through the symbol lookup.
    refresher = make_refresher(known_ids={})

    first = await refresher.run()

    assert first.updated == ["BTC"]
    assert await db.fetchval("SELECT coingecko_id FROM coin_market_data WHERE symbol = 'BTC'") == "bitcoin"
    [(_, query)] = replay.queries
    assert sorted(query["symbols"].split(",")) == ["btc", "zzz"]

    # The learned id is used from now on; the symbol CoinGecko did not know is not asked for again.
    second = await refresher.run()
    assert second.updated == ["BTC"]
    assert second.missing == ["ZZZ"]
    [(_, query)] = replay.queries[1:]
    assert query["ids"] == "bitcoin"
    assert "symbols" not in query


async def test_not_run_when_coingecko_is_not_an_enabled_source(make_refresher, replay, exchange_fixtures, settings):
    replay.serve(MARKETS, markets_file(exchange_fixtures))
    refresher = make_refresher(settings_=settings.model_copy(update={"sources": ["binance"]}))
    assert (await refresher.run()).status == "disabled"
    assert replay.count(MARKETS) == 0


def test_retry_after_forms():
    assert parse_retry_after("120") == 120
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0  # a date in the past: no wait
    assert parse_retry_after("99999999") == 86_400  # capped


async def test_ingest_runs_the_job_on_schedule(exchange_fixtures, replay, settings, redis, db, monkeypatch):
    replay.serve(MARKETS, markets_file(exchange_fixtures))
    monkeypatch.setenv("COINLYTICS_SOURCE_COINGECKO_REST_URL", replay.base_url)
    app_settings = make_settings(
        settings.database_url, settings.redis_url, settings.redis_namespace, sources=["coingecko"], coins=["BTC"]
    )
    admin = InternalCredential(app_settings)  # the admin routes check the role themselves
    async with serve_app(ingest_app(app_settings)) as url, httpx.AsyncClient(base_url=url, auth=admin) as client:

        async def stored():
            return await db.fetchval("SELECT market_cap_usd FROM coin_market_data WHERE symbol = 'BTC'")

        assert await eventually(stored) == recorded_bitcoin(exchange_fixtures)["market_cap"]

        async def connected():
            sources = (await client.get("/api/v1/admin/sources")).json()["sources"]
            entry = next((s for s in sources if s["name"] == "coingecko"), None)
            return entry if entry and entry["state"] == "connected" else None

        entry = await eventually(connected)
    assert entry["kind"] == "scheduled"
    assert entry["messages_total"] == 1
