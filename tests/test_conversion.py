"""Conversions against consolidated prices built from recorded Binance tickers (through pricing's
PricingService) and ECB rates from the recorded XML files (through the conversion app's startup job)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Context, Decimal
from pathlib import Path

import httpx
import pytest

from services.conversion import api as conversion_api
from services.conversion.app import create_app as conversion_app
from services.gateway.app import create_app as gateway_app
from services.pricing.service import PriceCache, PricingService
from shared.db import create_engine, session_factory
from shared.messages import TickMessage
from shared.responses import MemoHint
from shared.service_app import redis_client
from shared.streams import StreamPublisher
from tests.conftest import eventually, make_settings, serve_app
from tests.test_ecb import DAILY_2025, expected_rates, serve_ecb

CALC = Context(prec=34, rounding=ROUND_HALF_EVEN)
BINANCE = "rec_api_v1_ticker_24hr_ALL_2019-08-22.json"
BINANCE_US = "rec_binanceus_api_v1_ticker_24hr_ALL_2019-09-19.json"
ECB_DAY = datetime(2025, 5, 9).date()


def ticker_rows(fixtures: Path, name: str, symbols: dict[str, tuple[str, str]]) -> list[TickMessage]:
    rows = json.loads((fixtures / "binance" / name).read_text())
    ticks = []
    for row in rows:
        if row["symbol"] not in symbols:
            continue
        base, quote = symbols[row["symbol"]]
        ticks.append(
            TickMessage(
                tick_id=f"binance:{row['symbol']}:{row['closeTime']}",
                source="binance",
                base=base,
                quote=quote,
                pair=f"{base}/{quote}",
                price=row["lastPrice"],
                # Binance.US at launch sent 0.00 for an empty book side: no quote, not a price of zero.
                bid=row.get("bidPrice") if Decimal(row.get("bidPrice") or 0) > 0 else None,
                ask=row.get("askPrice") if Decimal(row.get("askPrice") or 0) > 0 else None,
                volume_24h=row["volume"],
                quote_volume_24h=row.get("quoteVolume"),
                exchange_ts=datetime.fromtimestamp(row["closeTime"] / 1000, tz=UTC),
                received_at=datetime.now(UTC),
            )
        )
    assert len(ticks) == len(symbols)
    return ticks


def body_of(response: httpx.Response) -> dict:
    return json.loads(response.text, parse_float=Decimal)


class Stack:
    def __init__(self, url, pricing, strict_pricing, settings, fixtures):
        self.url = url
        self.pricing = pricing
        self.strict_pricing = strict_pricing
        self.settings = settings
        self.fixtures = fixtures
        self.ecb = {cur: rate for (cur, day), rate in expected_rates(fixtures / "ecb" / DAILY_2025).items()}


@pytest.fixture
async def stack(exchange_fixtures, replay, settings, monkeypatch):
    monkeypatch.setenv("COINLYTICS_SOURCE_ECB_REST_URL", serve_ecb(replay, exchange_fixtures))
    conf = make_settings(
        settings.database_url, settings.redis_url, settings.redis_namespace, sources=["ecb"], min_fresh_sources=1
    )
    engine = create_engine(conf.require_database_url())
    redis = redis_client(conf.require_redis_url())
    publisher = StreamPublisher(redis, namespace=conf.redis_namespace, maxlen=conf.stream_maxlen)

    def pricing_with(s):
        # USD only: pricing's fiat restatements (method "...;via=USD*ECB") are not markets and conversion
        # ignores them anyway.
        s = s.model_copy(update={"vs_currencies": ["USD"]})
        return PricingService(s, sessions=session_factory(engine), publisher=publisher, cache=PriceCache(redis, s))

    try:
        async with serve_app(conversion_app(conf)) as url:
            stack = Stack(url, pricing_with(conf), pricing_with(conf.model_copy(update={"min_fresh_sources": 5})),
                          conf, exchange_fixtures)  # fmt: skip
            async with httpx.AsyncClient(base_url=url) as client:

                async def fiat_ready():
                    r = await client.get("/api/v1/convert", params={"from": "USD", "to": "JPY"})
                    return r.status_code == 200

                await eventually(fiat_ready)
            yield stack
    finally:
        await redis.aclose()
        await engine.dispose()


MARKETS = {"BTCUSDT": ("BTC", "USDT"), "ETHUSDT": ("ETH", "USDT"), "ETHBTC": ("ETH", "BTC"), "BTCUSDC": ("BTC", "USDC")}


async def priced(stack: Stack, client: httpx.AsyncClient, pairs: list[tuple[str, str]]) -> None:
    async def ready():
        for src, dst in pairs:
            r = await client.get("/api/v1/convert", params={"from": src, "to": dst})
            if r.status_code != 200:
                return False
        return True

    await eventually(ready)


async def consolidated(db, base: str, vs: str) -> Decimal:
    return await db.fetchval("SELECT price FROM prices WHERE base=$1 AND vs=$2", base, vs)


def within_stated_rounding(there: dict, back: dict, original: Decimal) -> bool:
    """Converting back returns the amount to within half a unit of each rounding (carried through the rate)."""
    back_unit, there_unit = Decimal(back["rounding"]["unit"]), Decimal(there["rounding"]["unit"])
    tolerance = back_unit / 2 + CALC.multiply(there_unit / 2, Decimal(back["rate"])) * Decimal("1.000001")
    return abs(back["result"] - original) <= tolerance


async def test_btc_to_eur_is_consolidated_usd_times_ecb_rate(stack, db):
    await stack.pricing.apply_ticks(ticker_rows(stack.fixtures, BINANCE, MARKETS))
    async with httpx.AsyncClient(base_url=stack.url) as client:
        await priced(stack, client, [("BTC", "EUR")])
        response = await client.get("/api/v1/convert", params={"from": "btc", "to": "EUR", "amount": "1.5"})
    assert response.status_code == 200
    body = body_of(response)
    btc_usd = await consolidated(db, "BTC", "USD")
    usd_per_eur = stack.ecb["USD"]
    by_hand = (Decimal("1.5") * btc_usd / usd_per_eur).quantize(Decimal("0.01"), rounding=ROUND_HALF_EVEN)
    assert body["result"] == by_hand
    assert body["path"] == ["BTC", "USD", "EUR"]
    assert [leg["source"] for leg in body["legs"]] == ["consolidated", "ecb"]
    assert body["legs"][1]["ecb_day"] == "2025-05-09"
    assert body["rounding"] == {
        "mode": "ROUND_HALF_EVEN",
        "kind": "decimal_places",
        "digits": 2,
        "unit": Decimal("0.01"),
    }
    assert body["from"] == "BTC" and body["amount"] == Decimal("1.5")
    assert body["as_of"].endswith("Z")


async def test_direct_pair_cross_rates_and_round_trips(stack, db):
    await stack.pricing.apply_ticks(ticker_rows(stack.fixtures, BINANCE, MARKETS))
    async with httpx.AsyncClient(base_url=stack.url) as client:
        await priced(stack, client, [("ETH", "BTC"), ("USDC", "USD")])
        eth_btc = body_of(await client.get("/api/v1/convert", params={"from": "ETH", "to": "BTC", "amount": "2"}))
        assert eth_btc["path"] == ["ETH", "BTC"]
        assert eth_btc["rate"] == await consolidated(db, "ETH", "BTC")
        usd_jpy = body_of(await client.get("/api/v1/convert", params={"from": "USD", "to": "JPY", "amount": "250"}))
        assert usd_jpy["path"] == ["USD", "EUR", "JPY"]
        expected = (Decimal(250) / stack.ecb["USD"] * stack.ecb["JPY"]).quantize(Decimal(1), rounding=ROUND_HALF_EVEN)
        assert usd_jpy["result"] == expected
        # USDC is measured against USD through the markets (BTC's USD price / BTC's USDC price).
        usdc = body_of(await client.get("/api/v1/convert", params={"from": "USDC", "to": "USD", "amount": "1000"}))
        btcusdc = next(t for t in ticker_rows(stack.fixtures, BINANCE, MARKETS) if t.quote == "USDC").price
        rate = CALC.divide(await consolidated(db, "BTC", "USD"), btcusdc)
        assert usdc["result"] == (1000 * rate).quantize(Decimal("0.01"), rounding=ROUND_HALF_EVEN)
        assert usdc["legs"][0]["source"] == "measured"

        cases = [("BTC", "JPY", "1.5"), ("JPY", "ETH", "10000"), ("USD", "GBP", "99.99"), ("ETH", "BTC", "3.3"),
                 ("USDC", "EUR", "12.5"), ("EUR", "USD", "0.01"), ("KRW", "BTC", "123456789")]  # fmt: skip
        for src, dst, amount in cases:
            there = body_of(await client.get("/api/v1/convert", params={"from": src, "to": dst, "amount": amount}))
            back = body_of(
                await client.get("/api/v1/convert", params={"from": dst, "to": src, "amount": str(there["result"])})
            )
            assert back["path"] == list(reversed(there["path"])), (src, dst)
            assert within_stated_rounding(there, back, Decimal(amount)), (src, dst, there, back)
            assert abs(there["rate"] * back["rate"] - 1) < Decimal("1e-16")
        more = body_of(await client.get("/api/v1/convert", params={"from": "BTC", "to": "EUR", "precision": 8}))
        assert more["rounding"]["digits"] == 8 and -more["result"].as_tuple().exponent == 8


async def test_rates_against_a_base(stack, db):
    await stack.pricing.apply_ticks(ticker_rows(stack.fixtures, BINANCE, MARKETS))
    async with httpx.AsyncClient(base_url=stack.url) as client:
        await priced(stack, client, [("BTC", "USD"), ("ETH", "USD")])
        body = body_of(await client.get("/api/v1/rates", params={"base": "usd"}))
    assert body["base"] == "USD"
    assert set(stack.ecb) - {"USD"} <= set(body["rates"])
    assert {"EUR", "BTC", "ETH", "USDC"} <= set(body["rates"])
    assert abs(body["rates"]["EUR"]["rate"] - 1 / stack.ecb["USD"]) < Decimal("1e-17")
    btc_usd = await consolidated(db, "BTC", "USD")
    assert abs(body["rates"]["BTC"]["rate"] * btc_usd - 1) < Decimal("1e-16")
    assert body["rates"]["JPY"]["path"] == ["USD", "EUR", "JPY"]
    assert body["fiat_day"] == "2025-05-09"


async def insert_candle(db, base, vs, interval, t, o, h, low, c):
    await db.execute(
        "INSERT INTO candles (base, vs, interval, t, open, high, low, close, volume) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 1)",
        base, vs, interval, t, Decimal(o), Decimal(h), Decimal(low), Decimal(c),
    )  # fmt: skip


async def test_historical_conversion_between_two_candles(stack, db):
    t0 = datetime(2025, 5, 9, 18, 0, tzinfo=UTC)
    await insert_candle(db, "BTC", "USD", "1m", t0, "102900.1", "103010", "102850", "102950.5")
    await insert_candle(db, "BTC", "USD", "1m", t0 + timedelta(minutes=5), "103200", "103400", "103150", "103300.25")
    await stack.pricing.apply_ticks(ticker_rows(stack.fixtures, BINANCE, MARKETS))
    async with httpx.AsyncClient(base_url=stack.url) as client:
        between = t0 + timedelta(minutes=3, seconds=30)
        r = await client.get(
            "/api/v1/convert", params={"from": "BTC", "to": "EUR", "amount": "2", "at": between.isoformat()}
        )
        assert r.status_code == 200, r.text
        body = body_of(r)
        assert body["basis"] == "history" and body["path"] == ["BTC", "USD", "EUR"]
        assert body["legs"][0]["candle_basis"] == "nearest_earlier_close"
        assert body["legs"][0]["candle_start"] == "2025-05-09T18:00:00Z"
        assert body["result"] == (2 * Decimal("102950.5") / stack.ecb["USD"]).quantize(Decimal("0.01"), ROUND_HALF_EVEN)
        assert body["at"] == "2025-05-09T18:03:30Z"

        inside = int((t0 + timedelta(minutes=5, seconds=20)).timestamp())
        body = body_of(await client.get("/api/v1/convert", params={"from": "BTC", "to": "USD", "at": str(inside)}))
        assert body["legs"][0]["candle_basis"] == "containing_candle_close"
        assert body["result"] == Decimal("103300.25")

        early = await client.get("/api/v1/convert", params={"from": "BTC", "to": "USD", "at": "2025-05-09T17:00:00Z"})
        assert early.status_code == 404
        assert "earliest" in early.json()["error"]["message"]


async def test_ecb_weekend_and_before_earliest(stack):
    async with httpx.AsyncClient(base_url=stack.url) as client:
        saturday = await client.get(
            "/api/v1/convert", params={"from": "USD", "to": "EUR", "amount": "100", "at": "2025-05-10T12:00:00Z"}
        )
        assert saturday.status_code == 200, saturday.text
        body = body_of(saturday)
        assert body["legs"][0]["ecb_day"] == "2025-05-09"
        assert any("Saturday" in n and "2025-05-09" in n for n in body["notes"])
        assert body["result"] == (Decimal(100) / stack.ecb["USD"]).quantize(Decimal("0.01"), ROUND_HALF_EVEN)
        # The 2017 history from the 90-day file serves 2017 moments.
        old = body_of(
            await client.get("/api/v1/convert", params={"from": "EUR", "to": "JPY", "at": "2017-03-03T18:00Z"})
        )
        assert old["result"] == Decimal(121)  # 120.83 JPY rounded to ISO 4217's 0 minor units
        before = await client.get("/api/v1/convert", params={"from": "EUR", "to": "JPY", "at": "2001-01-01"})
        assert before.status_code == 404
        assert before.json()["error"]["code"] == "no_data_at_time"
        assert "earliest" in before.json()["error"]["message"]


async def test_bad_input(stack):
    await stack.strict_pricing.apply_ticks(ticker_rows(stack.fixtures, BINANCE, {"XRPUSDT": ("XRP", "USDT")}))
    async with httpx.AsyncClient(base_url=stack.url) as client:

        async def get(**params):
            return await client.get("/api/v1/convert", params=params)

        unknown = await get(**{"from": "FOO", "to": "USD"})
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_currency"
        assert (await client.get("/api/v1/rates", params={"base": "NOPE"})).status_code == 404
        for amount in ["0", "-1", "NaN", "inf", "-Infinity", "abc", "1e16", "1" * 70, "1e-40", ""]:
            r = await get(**{"from": "USD", "to": "EUR", "amount": amount})
            assert r.status_code == 422, amount
            assert set(r.json()["error"]) == {"code", "message", "details"}
        for params in [{"from": "B$C", "to": "USD"}, {"from": "USD", "to": "EUR", "precision": "99"},
                       {"from": "USD", "to": "EUR", "at": "yesterday"},
                       {"from": "USD", "to": "EUR", "at": "4102444800"}, {"to": "EUR"}]:  # fmt: skip
            assert (await get(**params)).status_code == 422, params
        same = body_of(await get(**{"from": "usd", "to": "USD", "amount": "12.345"}))
        assert same["result"] == Decimal("12.345") and same["path"] == ["USD"]

        async def stale_known():
            r = await get(**{"from": "XRP", "to": "EUR"})
            return r if r.status_code == 503 else None

        stale = await eventually(stale_known)
        assert int(stale.headers["Retry-After"]) > 0
        assert stale.json()["error"]["code"] == "no_fresh_data"


async def test_cache_refreshes_on_a_prices_stream_event(stack, db, redis):
    await stack.pricing.apply_ticks(ticker_rows(stack.fixtures, BINANCE, {"BTCUSDT": ("BTC", "USDT")}))
    async with httpx.AsyncClient(base_url=stack.url) as client:
        await priced(stack, client, [("BTC", "USD")])
        first = body_of(await client.get("/api/v1/convert", params={"from": "BTC", "to": "USD"}))
        assert first["result"] == (await consolidated(db, "BTC", "USD")).quantize(Decimal("0.01"), ROUND_HALF_EVEN)
        version = int(await redis.get(stack.settings.key("conversion", "rates", "version")))
        # A later recorded ticker (Binance.US BTC/USD, four weeks on) moves the consolidated price.
        later = ticker_rows(stack.fixtures, BINANCE_US, {"BTCUSD": ("BTC", "USD")})
        await stack.pricing.apply_ticks(later)
        moved = await consolidated(db, "BTC", "USD")
        assert moved == later[0].price != first["rate"]

        async def refreshed():
            body = body_of(await client.get("/api/v1/convert", params={"from": "BTC", "to": "USD"}))
            return body if body["rate"] == moved else None

        await eventually(refreshed)
    assert int(await redis.get(stack.settings.key("conversion", "rates", "version"))) > version
    groups = await redis.xinfo_groups(f"{stack.settings.redis_namespace}:stream:prices")
    assert any(g["name"] == b"conversion" for g in groups)


async def test_the_gateway_reuses_a_live_conversion_until_any_price_event(stack, db, monkeypatch):
    # Kept for 30 s here (0.5 s in service): only the prices stream can make the gateway's answer move.
    monkeypatch.setattr(conversion_api, "LIVE_MEMO", MemoHint(ttl=30.0, pairs={}, any_pair=True))
    await stack.pricing.apply_ticks(ticker_rows(stack.fixtures, BINANCE, {"BTCUSDT": ("BTC", "USDT")}))
    gw = stack.settings.model_copy(update={"conversion_url": stack.url})
    app = gateway_app(gw)
    async with serve_app(app) as gateway, httpx.AsyncClient(base_url=gateway) as client:
        memo = app.state.upstreams.memo
        await priced(stack, client, [("BTC", "USD")])
        params = {"from": "BTC", "to": "USD", "amount": "2"}

        async def memoised():
            await client.get("/api/v1/convert", params=params)
            return any(key.startswith("conversion ") for key in memo.copies)

        await eventually(memoised)
        first = body_of(await client.get("/api/v1/convert", params=params))
        # A past moment is not live: never kept (the recorded ticker's own minute has a stored candle).
        moment = await db.fetchval("SELECT min(t) FROM candles WHERE base = 'BTC'")
        assert moment is not None
        past = await client.get("/api/v1/convert", params={**params, "at": moment.isoformat()})
        assert past.status_code == 200, past.text
        assert body_of(past)["basis"] != "live"
        assert not any("at=" in key for key in memo.copies)
        later = ticker_rows(stack.fixtures, BINANCE_US, {"BTCUSD": ("BTC", "USD")})
        await stack.pricing.apply_ticks(later)
        moved = await consolidated(db, "BTC", "USD")
        assert moved != first["rate"]

        async def dropped():
            return not any(key.startswith("conversion ") for key in memo.copies)

        # Nothing asked meanwhile: the event alone dropped the answer kept for 30 s.
        await eventually(dropped, timeout=10)
        # An answer given before the service applied the event may be kept again (the settle rule is a margin,
        # not a proof), for the hint's ttl at most: 2 s from here.
        monkeypatch.setattr(conversion_api, "LIVE_MEMO", MemoHint(ttl=2.0, pairs={}, any_pair=True))

        async def refreshed():
            body = body_of(await client.get("/api/v1/convert", params=params))
            return body if body["rate"] == moved else None

        await eventually(refreshed, timeout=10)


async def test_through_the_gateway_with_docs(stack):
    gw = stack.settings.model_copy(update={"conversion_url": stack.url})
    async with serve_app(gateway_app(gw)) as gateway, httpx.AsyncClient(base_url=gateway) as client:
        r = await client.get("/api/v1/convert", params={"from": "GBP", "to": "USD", "amount": "10"})
        assert r.status_code == 200, r.text
        assert body_of(r)["path"] == ["GBP", "EUR", "USD"]
        bad = await client.get("/api/v1/convert", params={"from": "GBP", "to": "USD", "amount": "-3"})
        assert bad.status_code == 422
        spec = (await client.get("/openapi.json")).json()
    for path in ("/api/v1/convert", "/api/v1/rates"):
        op = spec["paths"][path]["get"]
        assert op["summary"] and "Example" in op["description"]
        assert {"404", "422", "503"} <= set(op["responses"])
