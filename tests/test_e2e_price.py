"""The first real price path: recorded Binance payload -> ingest (ccxt) -> Redis stream -> pricing ->
PostgreSQL -> gateway API."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from services.gateway.app import create_app as gateway_app
from services.ingest.app import create_app as ingest_app
from services.pricing.app import create_app as pricing_app
from tests.conftest import eventually, free_port, make_settings, serve_app
from tests.replay import ReplayServer, serve_binance


def recorded_ticker(fixtures: Path, symbol: str) -> dict[str, str]:
    rows = json.loads((fixtures / "binance" / "rec_api_v1_ticker_24hr_ALL_2019-08-22.json").read_text())
    return next(r for r in rows if r["symbol"] == symbol)


@pytest.fixture
async def platform(exchange_fixtures, replay: ReplayServer, settings, monkeypatch):
    serve_binance(replay, exchange_fixtures)
    monkeypatch.setenv("COINLYTICS_SOURCE_BINANCE_REST_URL", replay.base_url)
    base = dict(
        database_url=settings.database_url,
        redis_url=settings.redis_url,
        namespace=settings.redis_namespace,
    )
    common = make_settings(
        base["database_url"], base["redis_url"], base["namespace"], sources=["binance"], coins=["BTC", "ETH"]
    )
    async with serve_app(pricing_app(common)) as pricing_url, serve_app(ingest_app(common)) as ingest_url:
        # The services this test does not start point at a port nothing listens on, not at their defaults
        # (a platform running on this machine would answer there).
        absent = {f"{name}_url": f"http://127.0.0.1:{free_port()}" for name in ("conversion", "analytics", "alerting")}
        gw_settings = common.model_copy(update={"pricing_url": pricing_url, "ingest_url": ingest_url, **absent})
        async with serve_app(gateway_app(gw_settings)) as gateway_url:
            yield gateway_url


async def test_price_from_recorded_binance_payload_reaches_the_gateway(platform, exchange_fixtures, db):
    btc = recorded_ticker(exchange_fixtures, "BTCUSDT")
    eth = recorded_ticker(exchange_fixtures, "ETHUSDT")
    async with httpx.AsyncClient(base_url=platform) as client:

        async def priced():
            response = await client.get("/api/v1/prices", params={"symbols": "btc,ETH", "vs": "USD"})
            return response if response.status_code == 200 and len(response.json()) == 2 else None

        response = await eventually(priced)
    body = json.loads(response.text, parse_float=Decimal)
    assert body["BTC"]["USD"]["price"] == Decimal(btc["lastPrice"])
    assert body["ETH"]["USD"]["price"] == Decimal(eth["lastPrice"])
    assert body["BTC"]["USD"]["last_updated"].endswith("Z")
    stored = await db.fetchrow(
        "SELECT price, exchange_ts FROM ticks WHERE source='binance' AND base='BTC' AND quote='USDT'"
    )
    assert stored["price"] == Decimal(btc["lastPrice"])
    assert int(stored["exchange_ts"].timestamp() * 1000) == btc["closeTime"]


async def test_status_reports_services_and_source(platform):
    async with httpx.AsyncClient(base_url=platform) as client:

        async def connected():
            body = (await client.get("/api/v1/status")).json()
            return body if body["sources"].get("binance", {}).get("state") == "connected" else None

        body = await eventually(connected)
    assert body["services"]["pricing"]["status"] == "ready"
    assert body["services"]["ingest"]["status"] == "ready"
    # Not started in this test: reported, not hidden.
    assert body["services"]["alerting"]["status"] == "unreachable"
    assert body["status"] == "degraded"
