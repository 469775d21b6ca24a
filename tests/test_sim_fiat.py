"""The offline demo's fiat rates: with ``COINLYTICS_SOURCES=sim`` (no ECB) the conversion service's fiat job
publishes simulated reference rates under the source ``sim-ecb``, so EUR/GBP/JPY prices and crypto-to-fiat
conversions work offline, and every place that shows the rates says they are simulated."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal

import httpx

from services.conversion.app import create_app as conversion_app
from services.conversion.ecb import last_publication_day
from services.conversion.service import ConversionService
from services.conversion.simfiat import BAND, SIM_FIAT_SOURCE, SIM_FIAT_START
from services.conversion.tasks import ecb_job, fiat_source, refresh_sim_fiat_rates, startup_refresh_needed
from services.ingest.sim import SIM_SOURCES, SimSource
from services.pricing.service import PriceCache, PricingService
from shared.db import create_engine, session_factory
from shared.service_app import redis_client
from shared.streams import StreamPublisher
from tests.conftest import eventually, make_settings, serve_app
from tests.test_ecb import DAILY_2025, HIST_2017, expected_rates, serve_ecb


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


# --- the demo and a real run on one database --------------------------------------------------------


def sim_settings(settings):
    return make_settings(
        settings.database_url, settings.redis_url, settings.redis_namespace, sources=["sim"], sim_seed=5
    )


async def test_simulated_rates_never_replace_the_ecbs_own(settings, sessions, redis, db):
    conf = sim_settings(settings)
    day = last_publication_day(datetime.now(UTC))
    fetched = datetime(2025, 5, 9, 15, tzinfo=UTC)
    for currency, rate in (("USD", "1.1252"), ("JPY", "163.36")):
        await db.execute(
            "INSERT INTO fiat_rates (currency, day, per_eur, source, fetched_at) VALUES ($1, $2, $3, 'ecb', $4)",
            currency,
            day,
            Decimal(rate),
            fetched,
        )
    service = ConversionService(conf, sessions=sessions, redis=redis)
    first = await refresh_sim_fiat_rates(conf, sessions, service)
    rows = {r["currency"]: r for r in await db.fetch("SELECT * FROM fiat_rates WHERE day = $1", day)}
    assert {c: (r["per_eur"], r["source"], r["fetched_at"]) for c, r in rows.items() if r["source"] == "ecb"} == {
        "USD": (Decimal("1.1252"), "ecb", fetched),
        "JPY": (Decimal("163.36"), "ecb", fetched),
    }
    # The day's other currencies had no real rate: the simulated ones fill them, and say so.
    simulated = {c for c, r in rows.items() if r["source"] == SIM_FIAT_SOURCE}
    assert simulated == set(SIM_FIAT_START) - {"USD", "JPY"}
    assert first["stored"] == len(simulated)
    # Simulated rows themselves still take the next step of the walk.
    await refresh_sim_fiat_rates(conf, sessions, service)
    again = {r["currency"]: r for r in await db.fetch("SELECT * FROM fiat_rates WHERE day = $1", day)}
    assert all(again[c]["fetched_at"] > rows[c]["fetched_at"] for c in simulated)
    assert {c: again[c]["per_eur"] for c in ("USD", "JPY")} == {"USD": Decimal("1.1252"), "JPY": Decimal("163.36")}


async def test_a_real_run_after_the_demo_still_fetches_ecb_rates_and_history(
    settings, sessions, redis, db, exchange_fixtures, replay, monkeypatch
):
    demo = sim_settings(settings)
    # A demo that ran for weeks: recent simulated rates and more simulated days than the history threshold.
    today = last_publication_day(datetime.now(UTC))
    for back in range(1, 41):
        await db.execute(
            "INSERT INTO fiat_rates (currency, day, per_eur, source, fetched_at) VALUES ('USD', $1, 1.08, $2, now())",
            today - timedelta(days=back),
            SIM_FIAT_SOURCE,
        )
    await refresh_sim_fiat_rates(demo, sessions, ConversionService(demo, sessions=sessions, redis=redis))
    assert await startup_refresh_needed(sessions, SIM_FIAT_SOURCE) is False
    assert await startup_refresh_needed(sessions) is True

    monkeypatch.setenv("COINLYTICS_SOURCE_ECB_REST_URL", serve_ecb(replay, exchange_fixtures))
    real = make_settings(settings.database_url, settings.redis_url, settings.redis_namespace, sources=["ecb"])
    async with serve_app(conversion_app(real)):

        async def ecb_rows() -> int:
            return int(await db.fetchval("SELECT count(*) FROM fiat_rates WHERE source = 'ecb'"))

        await eventually(ecb_rows)
    stored = {
        (r["currency"], r["day"]): r["per_eur"]
        for r in await db.fetch("SELECT currency, day, per_eur FROM fiat_rates WHERE source = 'ecb'")
    }
    # The daily file, and the 90-day file too: simulated days don't count as stored ECB history.
    wanted = expected_rates(exchange_fixtures / "ecb" / HIST_2017) | expected_rates(
        exchange_fixtures / "ecb" / DAILY_2025
    )
    assert stored == wanted
    assert await startup_refresh_needed(sessions) is False
    # Nothing simulated is left to be mistaken for a real rate (days the ECB did not publish included).
    assert await db.fetchval("SELECT count(*) FROM fiat_rates WHERE source = $1", SIM_FIAT_SOURCE) == 0
