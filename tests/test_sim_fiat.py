"""The offline demo's fiat rates: with ``COINLYTICS_SOURCES=sim`` (no ECB) the conversion service's fiat job
publishes simulated reference rates under the source ``sim-ecb``, so EUR/GBP/JPY prices and crypto-to-fiat
conversions work offline, and every place that shows the rates says they are simulated."""

from __future__ import annotations

import json
from decimal import ROUND_HALF_EVEN, Decimal

import httpx

from services.conversion.app import create_app as conversion_app
from services.conversion.simfiat import BAND, SIM_FIAT_SOURCE, SIM_FIAT_START
from services.conversion.tasks import ecb_job, fiat_source
from services.ingest.adapters import SIM_SOURCES, SimSource
from services.pricing.service import PriceCache, PricingService
from shared.db import create_engine, session_factory
from shared.service_app import redis_client
from shared.streams import StreamPublisher
from tests.conftest import eventually, make_settings, serve_app


def body_of(response: httpx.Response) -> dict:
    return json.loads(response.text, parse_float=Decimal)


def test_simulated_rates_only_stand_in_for_a_missing_ecb(settings):
    def source_with(sources: list[str]) -> str | None:
        return fiat_source(settings.model_copy(update={"sources": sources}))

    assert source_with(["sim"]) == SIM_FIAT_SOURCE
    assert source_with(["sim", "ecb"]) == "ecb"
    assert source_with(["binance", "ecb"]) == "ecb"
    assert source_with(["binance"]) is None


async def test_sim_demo_has_fiat_rates_prices_and_conversions(settings, db):
    conf = make_settings(
        settings.database_url, settings.redis_url, settings.redis_namespace, sources=["sim"], coins=["BTC"], sim_seed=3
    )
    engine = create_engine(conf.require_database_url())
    redis = redis_client(conf.require_redis_url())
    publisher = StreamPublisher(redis, namespace=conf.redis_namespace, maxlen=conf.stream_maxlen)
    pricing = PricingService(conf, sessions=session_factory(engine), publisher=publisher, cache=PriceCache(redis, conf))
    try:
        # The conversion app's startup job finds no stored rates and runs the fiat job once.
        app = conversion_app(conf)
        async with serve_app(app) as url, httpx.AsyncClient(base_url=url) as client:

            async def fiat_ready() -> bool:
                response = await client.get("/api/v1/convert", params={"from": "USD", "to": "JPY"})
                return response.status_code == 200

            await eventually(fiat_ready)
            stored = await db.fetch("SELECT currency, per_eur, source FROM fiat_rates")
            assert {row["currency"] for row in stored} == set(SIM_FIAT_START)
            assert {row["source"] for row in stored} == {SIM_FIAT_SOURCE}
            per_eur = {row["currency"]: row["per_eur"] for row in stored}
            for currency, start in SIM_FIAT_START.items():
                assert abs(per_eur[currency] / start - 1) <= Decimal(str(BAND)), currency

            # Simulated venues' ticks, consolidated by pricing, which restates them in the fiat currencies.
            source = SimSource("sim", seed=3, interval_seconds=1.0)
            await source.open(["BTC"])
            ticks, _ = await source.poll()
            assert {t.source for t in ticks} == set(SIM_SOURCES)
            await pricing.apply_ticks(ticks)
            restated = await db.fetch("SELECT vs, price, method FROM prices WHERE base = 'BTC'")
            assert {row["vs"] for row in restated} >= {"USD", "EUR", "GBP", "JPY"}
            btc_usd = next(row["price"] for row in restated if row["vs"] == "USD")

            async def btc_eur() -> httpx.Response | None:
                response = await client.get("/api/v1/convert", params={"from": "BTC", "to": "EUR", "amount": "2"})
                return response if response.status_code == 200 else None

            body = body_of(await eventually(btc_eur))
            assert body["path"] == ["BTC", "USD", "EUR"]
            assert [leg["source"] for leg in body["legs"]] == ["consolidated", SIM_FIAT_SOURCE]
            by_hand = (2 * btc_usd / per_eur["USD"]).quantize(Decimal("0.01"), rounding=ROUND_HALF_EVEN)
            assert body["result"] == by_hand

            rates = body_of(await client.get("/api/v1/rates", params={"base": "EUR"}))
            assert rates["fiat_source"] == SIM_FIAT_SOURCE
            assert rates["rates"]["GBP"]["rate"] == per_eur["GBP"]

            # The cron entry point takes another step of the walk: rates move, stay marked and in the band.
            ctx = {
                "settings": conf,
                "sessions": session_factory(engine),
                "redis": redis,
                "service": app.state.conversion,
            }
            result = await ecb_job(ctx)
            assert result["simulated"] is True and result["source"] == SIM_FIAT_SOURCE
            stepped = {r["currency"]: r["per_eur"] for r in await db.fetch("SELECT currency, per_eur FROM fiat_rates")}
            assert set(stepped) == set(SIM_FIAT_START) and stepped != per_eur
            for currency, start in SIM_FIAT_START.items():
                assert abs(stepped[currency] / start - 1) <= Decimal(str(BAND)), currency

            async def restepped() -> dict | None:
                # The service re-reads its cached table's version every few hundred milliseconds.
                again = body_of(await client.get("/api/v1/rates", params={"base": "EUR"}))
                return again if again["rates"]["GBP"]["rate"] == stepped["GBP"] else None

            assert (await eventually(restepped))["fiat_source"] == SIM_FIAT_SOURCE
    finally:
        await redis.aclose()
        await engine.dispose()
