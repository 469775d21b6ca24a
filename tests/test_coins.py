"""/api/v1/coins (list and detail) and /api/v1/admin/coins through a running pricing app, on rows
written straight into PostgreSQL with known values."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import httpx
import pytest

from services.pricing.app import create_app as pricing_app
from services.pricing.coins import repository as coins_repository
from tests.accounts import InternalCredential
from tests.conftest import make_settings, serve_app

COINS = ["BTC", "ETH", "SOL", "DOGE"]


def decimals(response: httpx.Response):
    return json.loads(response.text, parse_float=Decimal, parse_int=Decimal)


@pytest.fixture
async def pricing(settings) -> httpx.AsyncClient:
    app_settings = make_settings(
        settings.database_url,
        settings.redis_url,
        settings.redis_namespace,
        coins=COINS,
        vs_currencies=["USD", "EUR"],
        sources=["binance", "kraken"],
        # The timed re-consolidation would rebuild the prices this test writes by hand.
        consolidation_refresh_seconds=3600,
    )
    # Signed as an administrator, the way the gateway forwards: the admin routes check the role themselves.
    admin = InternalCredential(app_settings)
    async with serve_app(pricing_app(app_settings)) as url, httpx.AsyncClient(base_url=url, auth=admin) as client:
        yield client


async def put_price(db, base: str, vs: str, price: str, volume: str | None = None) -> None:
    await db.execute(
        "INSERT INTO prices (base, vs, price, volume_24h, status, sources_used, sources_total, method, last_updated)"
        " VALUES ($1, $2, $3, $4, 'fresh', 1, 1, 'vwap-mad2.5', now())",
        base,
        vs,
        Decimal(price),
        Decimal(volume) if volume else None,
    )


async def put_market_data(db, symbol: str, *, supply: str | None = None, cap_usd: str | None = None) -> None:
    await db.execute(
        "INSERT INTO coin_market_data (symbol, coingecko_id, name, market_cap_usd, circulating_supply)"
        " VALUES ($1, $2, $3, $4, $5)",
        symbol,
        symbol.lower(),
        f"{symbol} coin",
        Decimal(cap_usd) if cap_usd else None,
        Decimal(supply) if supply else None,
    )


async def put_candle(db, base: str, vs: str, interval: str, t: datetime, close: str) -> None:
    c = Decimal(close)
    await db.execute(
        "INSERT INTO candles (base, vs, interval, t, open, high, low, close, volume)"
        " VALUES ($1, $2, $3, $4, $5, $5, $5, $5, 1)",
        base,
        vs,
        interval,
        t,
        c,
    )


@pytest.fixture
async def market(pricing, db) -> httpx.AsyncClient:
    """BTC 110 USD, ETH 2000, SOL 150 (market cap from CoinGecko's USD figure only), DOGE unpriced."""
    now = datetime.now(UTC)
    for base, usd, eur in (("BTC", "110", "100"), ("ETH", "2000", "1800"), ("SOL", "150", "135")):
        await put_price(db, base, "USD", usd, volume="5000.5")
        await put_price(db, base, "EUR", eur)
    await put_market_data(db, "BTC", supply="19675987")
    await put_market_data(db, "ETH", supply="120000000")
    await put_market_data(db, "SOL", cap_usd="50000000000")
    await put_market_data(db, "DOGE", supply="140000000000")
    # A candle's close is the price at its end (t + length). BTC: exactly 1 h ago 100, with a nearby
    # and a far decoy; exactly 24 h ago 120 (hourly candle); nothing a week back.
    await put_candle(db, "BTC", "USD", "1m", now - timedelta(hours=1, minutes=1), "100")
    await put_candle(db, "BTC", "USD", "1m", now - timedelta(minutes=58), "90")
    await put_candle(db, "BTC", "USD", "1m", now - timedelta(hours=1, minutes=21), "50")
    await put_candle(db, "BTC", "USD", "1h", now - timedelta(hours=25), "120")
    # ETH: a daily candle closing 7 days ago at 1600; the only 1 h-ish candle is 30 minutes off.
    await put_candle(db, "ETH", "USD", "1d", now - timedelta(days=8), "1600")
    await put_candle(db, "ETH", "USD", "1m", now - timedelta(minutes=91), "1000")
    # In another currency: must not leak into USD changes.
    await put_candle(db, "SOL", "EUR", "1m", now - timedelta(hours=1, minutes=1), "1")
    return pricing


async def test_list_is_ordered_by_market_cap_with_changes_from_our_candles(market):
    response = await market.get("/api/v1/coins", params={"vs": "usd"})
    assert response.status_code == 200
    assert response.headers["x-total-count"] == "4"
    body = decimals(response)
    assert [c["symbol"] for c in body] == ["ETH", "SOL", "BTC", "DOGE"]
    eth, sol, btc, doge = body

    assert btc["price"] == Decimal("110")
    assert btc["volume_24h"] == Decimal("5000.5")
    assert btc["market_cap"] == Decimal("2164358570")  # 19,675,987 x 110
    assert btc["change_1h_pct"] == Decimal("10")  # 110 vs 100
    assert btc["change_24h_pct"] == Decimal("-8.3333")  # (110 - 120) / 120
    assert btc["change_7d_pct"] is None
    assert btc["last_updated"].endswith("Z")
    assert btc["name"] == "BTC coin"

    assert eth["market_cap"] == Decimal("240000000000")  # 120,000,000 x 2000
    assert eth["change_7d_pct"] == Decimal("25")  # 2000 vs 1600
    assert eth["change_1h_pct"] is None  # the only candle is 30 minutes from an hour ago
    assert eth["change_24h_pct"] is None

    assert sol["market_cap"] == Decimal("50000000000")  # CoinGecko's USD figure, ratio 150/150
    assert sol["change_1h_pct"] is None

    assert doge["price"] is None and doge["market_cap"] is None and doge["change_24h_pct"] is None


async def test_list_in_another_currency(market):
    body = decimals(await market.get("/api/v1/coins", params={"vs": "EUR"}))
    caps = {c["symbol"]: c["market_cap"] for c in body}
    assert caps["BTC"] == Decimal("1967598700")  # 19,675,987 x 100
    assert caps["SOL"] == Decimal("45000000000")  # 50e9 x 135 / 150
    sol = next(c for c in body if c["symbol"] == "SOL")
    assert sol["change_1h_pct"] == Decimal("13400")  # 135 vs the EUR candle's 1
    btc = next(c for c in body if c["symbol"] == "BTC")
    assert btc["change_1h_pct"] is None  # BTC has USD candles only


async def test_pagination(market):
    page2 = decimals(await market.get("/api/v1/coins", params={"per_page": 2, "page": 2}))
    assert [c["symbol"] for c in page2] == ["BTC", "DOGE"]
    assert page2[0]["change_1h_pct"] == Decimal("10")
    beyond = await market.get("/api/v1/coins", params={"per_page": 2, "page": 3})
    assert beyond.status_code == 200 and beyond.json() == []


BAD_LIST_PARAMETERS = [
    ({"per_page": 0}, 422, "validation_error"),
    ({"per_page": 251}, 422, "validation_error"),
    ({"page": 0}, 422, "validation_error"),
    ({"page": "two"}, 422, "validation_error"),
    ({"vs": "U$D"}, 422, "validation_error"),
    ({"vs": "XYZ"}, 404, "unknown_currency"),
]


async def test_list_rejects_bad_parameters(pricing):
    for params, status, code in BAD_LIST_PARAMETERS:
        response = await pricing.get("/api/v1/coins", params=params)
        assert response.status_code == status, params
        error = response.json()["error"]
        assert error["code"] == code, params
        assert error["message"]


async def test_per_page_bounds_are_inclusive(market):
    assert len((await market.get("/api/v1/coins", params={"per_page": 1})).json()) == 1
    assert len((await market.get("/api/v1/coins", params={"per_page": 250})).json()) == 4


async def test_detail_with_supply_and_sources(market, db):
    now = datetime.now(UTC)
    for source, quote, price, status in (("binance", "USDT", "110.5", "used"), ("kraken", "USD", "140", "outlier")):
        await db.execute(
            "INSERT INTO source_quotes (source, base, quote, pair, price, volume_24h, exchange_ts, received_at,"
            " tick_id, transport, status) VALUES ($1, 'BTC', $2, $3, $4, 10, $5, $5, $6, 'rest', $7)",
            source,
            quote,
            f"BTC{quote}",
            Decimal(price),
            now,
            f"{source}-1",
            status,
        )
    response = await market.get("/api/v1/coins/btc")
    assert response.status_code == 200
    body = decimals(response)
    assert body["symbol"] == "BTC" and body["vs"] == "USD"
    assert body["price"] == Decimal("110")
    assert body["circulating_supply"] == Decimal("19675987")
    assert body["market_cap"] == Decimal("2164358570")
    assert body["market_cap_method"] == "circulating_supply x price"
    assert body["change_1h_pct"] == Decimal("10")
    assert body["coingecko_id"] == "btc"
    assert body["sources_used"] == ["binance"]
    by_source = {s["source"]: s for s in body["sources"]}
    assert by_source["kraken"]["status"] == "outlier"
    assert by_source["binance"]["price"] == Decimal("110.5")
    assert by_source["binance"]["pair"] == "BTCUSDT"


async def test_detail_errors(pricing, db):
    unknown = await pricing.get("/api/v1/coins/NOPE")
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "unknown_symbol"
    bad = await pricing.get("/api/v1/coins/B-TC")
    assert bad.status_code == 422
    assert bad.json()["error"]["code"] == "validation_error"
    await db.execute("UPDATE coins SET active = false WHERE symbol = 'SOL'")
    assert (await pricing.get("/api/v1/coins/SOL")).status_code == 404


async def coins_stream_exists(redis, settings) -> bool:
    # Nothing consumed the old coins stream (ingest re-reads the table): admin changes publish nothing.
    return bool(await redis.exists(f"{settings.redis_namespace}:stream:coins"))


async def test_admin_add_remove_and_reactivate(pricing, db, redis, settings):
    created = await pricing.post("/api/v1/admin/coins", json={"symbol": "matic", "name": "Polygon"})
    assert created.status_code == 201
    assert created.json()["symbol"] == "MATIC" and created.json()["change"] == "added"
    row = await db.fetchrow("SELECT name, active FROM coins WHERE symbol = 'MATIC'")
    assert row["active"] is True and row["name"] == "Polygon"
    listed = [c["symbol"] for c in (await pricing.get("/api/v1/coins")).json()]
    assert "MATIC" in listed

    again = await pricing.post("/api/v1/admin/coins", json={"symbol": "MATIC"})
    assert again.status_code == 200 and again.json()["change"] == "unchanged"
    assert await db.fetchval("SELECT active FROM coins WHERE symbol = 'MATIC'") is True

    removed = await pricing.delete("/api/v1/admin/coins/matic")
    assert removed.status_code == 200
    assert removed.json()["active"] is False
    assert await db.fetchval("SELECT active FROM coins WHERE symbol = 'MATIC'") is False
    assert removed.json()["change"] == "deactivated"
    assert "MATIC" not in [c["symbol"] for c in (await pricing.get("/api/v1/coins")).json()]
    everything = {c["symbol"]: c for c in (await pricing.get("/api/v1/admin/coins")).json()["coins"]}
    assert everything["MATIC"]["active"] is False
    assert set(COINS) <= set(everything)

    back = await pricing.post("/api/v1/admin/coins", json={"symbol": "MATIC"})
    assert back.status_code == 200 and back.json()["change"] == "reactivated"
    assert await db.fetchval("SELECT active FROM coins WHERE symbol = 'MATIC'") is True
    assert not await coins_stream_exists(redis, settings)


BAD_NEW_COINS = [
    {},
    {"symbol": ""},
    {"symbol": "BAD-SYM"},
    {"symbol": "A" * 16},
    {"symbol": "OK", "name": ""},
    {"symbol": "OK", "name": "x" * 101},
    {"symbol": "OK", "extra": 1},
    {"symbol": 5},
]


async def test_admin_add_validation(pricing, db):
    for body in BAD_NEW_COINS:
        response = await pricing.post("/api/v1/admin/coins", json=body)
        assert response.status_code == 422, body
        assert response.json()["error"]["code"] == "validation_error", body
    assert await db.fetchval("SELECT count(*) FROM coins WHERE symbol NOT IN ('BTC','ETH','SOL','DOGE')") == 0


async def test_admin_remove_errors(pricing, db):
    unknown = await pricing.delete("/api/v1/admin/coins/NOPE")
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "unknown_symbol"
    assert (await pricing.delete("/api/v1/admin/coins/N$PE")).status_code == 422
    assert await db.fetchval("SELECT count(*) FROM coins WHERE NOT active") == 0


async def test_prices_include_market_cap_and_change_24h_as_the_coins_list_does(market, db):
    # A BTC/EUR candle closing 24 h ago, so the change is per currency.
    await put_candle(db, "BTC", "EUR", "1h", datetime.now(UTC) - timedelta(hours=25), "80")
    response = await market.get(
        "/api/v1/prices", params={"symbols": "BTC,SOL,ETH", "vs": "USD,EUR", "include": "market_cap,change_24h"}
    )
    assert response.status_code == 200, response.text
    body = decimals(response)
    btc, sol, eth = body["BTC"], body["SOL"], body["ETH"]
    assert btc["USD"]["market_cap"] == Decimal("2164358570")  # 19,675,987 x 110
    assert btc["EUR"]["market_cap"] == Decimal("1967598700")  # 19,675,987 x 100
    assert btc["USD"]["change_24h"] == Decimal("-8.3333")  # 110 vs 120
    assert btc["EUR"]["change_24h"] == Decimal("25")  # 100 vs 80
    # SOL has only CoinGecko's USD market cap: restated in EUR by our own prices (135 / 150).
    assert sol["USD"]["market_cap"] == Decimal("50000000000")
    assert sol["EUR"]["market_cap"] == Decimal("45000000000")
    assert sol["USD"]["change_24h"] is None  # no candle near 24 h ago
    assert eth["USD"]["market_cap"] == Decimal("240000000000")
    assert eth["USD"]["change_24h"] is None
    # Both views agree, field for field.
    coins = {c["symbol"]: c for c in decimals(await market.get("/api/v1/coins", params={"vs": "EUR"}))}
    for symbol in ("BTC", "SOL", "ETH"):
        assert body[symbol]["EUR"]["market_cap"] == coins[symbol]["market_cap"], symbol
        assert body[symbol]["EUR"]["change_24h"] == coins[symbol]["change_24h_pct"], symbol
    # Only what was asked for is added.
    plain = decimals(await market.get("/api/v1/prices", params={"symbols": "BTC", "include": "change_24h"}))
    assert "market_cap" not in plain["BTC"]["USD"] and plain["BTC"]["USD"]["change_24h"] == Decimal("-8.3333")


async def test_the_owners_read_functions_for_other_services(sessions, db):
    # What ingest, conversion and the gateway read of the coins table, through pricing's repository only.
    async with sessions() as session:
        assert await coins_repository.coins_seeded(session) is False
        assert await coins_repository.active_coins(session) == []
    await db.execute(
        "INSERT INTO coins (symbol, active, added_at) VALUES "
        "('ETH', true, '2024-01-02Z'), ('BTC', true, '2024-01-03Z'), ('ADA', true, '2024-01-02Z'), "
        "('OLD', false, '2024-01-01Z')"
    )
    async with sessions() as session:
        assert await coins_repository.coins_seeded(session) is True
        # Oldest first (ties by symbol), removed coins left out: a source's symbol order stays stable.
        assert await coins_repository.active_coins(session) == ["ADA", "ETH", "BTC"]
