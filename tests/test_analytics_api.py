"""The analytics API through the real gateway and analytics service over real PostgreSQL and Redis:
comparisons, one coin's analysis, charts in every format, saved comparisons per user, every refusal, and the
cache that a new candle invalidates."""

from __future__ import annotations

import csv
import io
import json
import math
import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import numpy as np
import plotly.graph_objects as go
import pytest

from services.analytics.app import create_app as analytics_app
from services.gateway.app import create_app as gateway_app
from shared.streams import PRICES_STREAM, StreamPublisher
from tests.accounts import bearer, register, tokens
from tests.conftest import eventually, serve_app

DAY = timedelta(days=1)
START = datetime(2024, 1, 1, tzinfo=UTC)
DAYS = 60


def closes(symbol: str) -> list[float]:
    """Deterministic daily closes per coin (different drifts and noise, so statistics differ)."""
    rng = np.random.default_rng(sum(map(ord, symbol)))
    drift = {"BTC": 0.002, "ETH": 0.001, "SOL": -0.001}.get(symbol, 0.0)
    returns = drift + rng.normal(0, 0.02, DAYS - 1)
    start = {"BTC": 40_000.0, "ETH": 2_000.0, "SOL": 100.0}.get(symbol, 10.0)
    return [start, *(start * np.cumprod(1 + returns)).tolist()]


async def seed(db: Any, symbols: tuple[str, ...] = ("BTC", "ETH", "SOL")) -> None:
    for symbol in ("BTC", "ETH", "SOL", "XRP"):
        await db.execute("INSERT INTO coins (symbol, name, active) VALUES ($1, $1, true)", symbol)
    rows = []
    for symbol in symbols:
        for day, close in enumerate(closes(symbol)):
            t = START + day * DAY
            rows.append((symbol, "USD", "1d", t, close, close * 1.01, close * 0.99, close, 1000.0 + day, "rollup"))
    await db.copy_records_to_table(
        "candles",
        records=rows,
        columns=["base", "vs", "interval", "t", "open", "high", "low", "close", "volume", "source"],
    )


@pytest.fixture
async def platform(settings, db) -> AsyncIterator[httpx.AsyncClient]:
    await seed(db)
    common = settings.model_copy(update={"internal_auth_required": True})
    async with serve_app(analytics_app(common)) as analytics_url:
        gw = common.model_copy(update={"analytics_url": analytics_url})
        async with serve_app(gateway_app(gw)) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
            yield client


RANGE = {"start": "2024-01-01", "end": "2024-03-01", "interval": "1d"}


async def test_compare_returns_statistics_that_match_an_independent_computation(platform):
    response = await platform.get("/api/v1/analytics/compare", params={"symbols": "BTC,ETH,SOL", "vs": "USD", **RANGE})
    assert response.status_code == 200, response.text
    assert response.headers["x-cache"] == "miss"
    body = json.loads(response.text, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    coins = {c["symbol"]: c for c in body["coins"]}
    assert set(coins) == {"BTC", "ETH", "SOL"}
    assert body["empty"] is False and body["benchmark"] == "BTC"
    btc, eth = np.array(closes("BTC")), np.array(closes("ETH"))
    assert coins["BTC"]["candles"] == DAYS and coins["BTC"]["coverage"] == pytest.approx(1.0)
    assert coins["BTC"]["total_return_pct"] == pytest.approx((btc[-1] / btc[0] - 1) * 100, rel=1e-5)
    r_btc, r_eth = btc[1:] / btc[:-1] - 1, eth[1:] / eth[:-1] - 1
    volatility = r_eth.std(ddof=1) * math.sqrt(365) * 100
    assert coins["ETH"]["annualised_volatility_pct"] == pytest.approx(volatility, rel=1e-4)
    beta = np.cov(r_eth, r_btc, ddof=1)[0, 1] / r_btc.var(ddof=1)
    assert coins["ETH"]["beta"] == pytest.approx(beta, rel=1e-4)
    assert coins["BTC"]["beta"] == pytest.approx(1.0)
    matrix = body["correlation"]["matrix"]
    order = body["correlation"]["symbols"]
    assert all(matrix[i][i] == pytest.approx(1.0) for i in range(len(order)))
    i, j = order.index("BTC"), order.index("ETH")
    assert matrix[i][j] == pytest.approx(np.corrcoef(r_btc, r_eth)[0, 1], rel=1e-4)
    assert body["series"]["normalised"]["SOL"][0] == pytest.approx(100.0)

    again = await platform.get("/api/v1/analytics/compare", params={"symbols": "BTC,ETH,SOL", "vs": "USD", **RANGE})
    assert again.headers["x-cache"] == "hit" and again.json() == body

    as_csv = await platform.get(
        "/api/v1/analytics/compare", params={"symbols": "BTC,ETH", "vs": "USD", "format": "csv", **RANGE}
    )
    assert as_csv.status_code == 200 and as_csv.headers["content-type"].startswith("text/csv")
    table = list(csv.reader(io.StringIO(as_csv.text)))
    assert table[0] == ["t", "BTC", "ETH"] and len(table) == DAYS + 1
    assert float(table[1][1]) == pytest.approx(100.0)


@pytest.mark.parametrize(
    ("params", "status", "phrase"),
    [
        ({"symbols": "BTC,DOGE"}, 404, "DOGE"),
        ({"symbols": "BTC"}, 422, "2 to 20"),
        ({"symbols": ",".join(f"C{i}" for i in range(21))}, 422, ""),
        ({"symbols": "BTC,ETH", "start": "2024-03-01", "end": "2024-01-01"}, 422, "before"),
        ({"symbols": "BTC,ETH", "start": "2020-01-01", "end": "2024-01-01", "interval": "1m"}, 422, "interval="),
        ({"symbols": "BTC,ETH", "vs": "XYZ"}, 404, "XYZ"),
        ({"symbols": "BTC,ETH", "risk_free_rate": "7"}, 422, ""),
        ({"symbols": "BTC,ETH", "interval": "2h"}, 422, ""),
    ],
)
async def test_compare_refuses_bad_requests_with_the_contract_error(platform, params, status, phrase):
    response = await platform.get("/api/v1/analytics/compare", params={"vs": "USD", **params})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] and phrase in error["message"], error


async def test_a_range_without_candles_is_an_empty_result_that_says_so(platform):
    response = await platform.get(
        "/api/v1/analytics/compare",
        params={"symbols": "BTC,XRP", "vs": "USD", "start": "2023-01-01", "end": "2023-02-01", "interval": "1d"},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["empty"] is True and body["note"]
    assert all(c["candles"] == 0 and c["coverage"] == 0 for c in body["coins"])


async def test_a_new_candle_for_one_of_the_coins_invalidates_the_cached_result(platform, redis, settings):
    params = {"symbols": "BTC,ETH", "vs": "USD", **RANGE}
    assert (await platform.get("/api/v1/analytics/compare", params=params)).headers["x-cache"] == "miss"
    assert (await platform.get("/api/v1/analytics/compare", params=params)).headers["x-cache"] == "hit"
    publisher = StreamPublisher(redis, namespace=settings.redis_namespace, maxlen=1000)

    async def publish(base: str, at: datetime) -> None:
        await publisher.publish(
            PRICES_STREAM,
            {"event_id": uuid.uuid4().hex, "base": base, "vs": "USD", "price": "1", "status": "fresh",
             "last_updated": at.isoformat().replace("+00:00", "Z")},
        )  # fmt: skip

    minute = datetime.now(UTC).replace(second=0, microsecond=0)
    await publish("SOL", minute)  # another coin's candle: this result stands
    await publish("SOL", minute + timedelta(minutes=1))
    version = settings.key("analytics", "version", "SOL", "USD")
    await eventually(lambda: redis.get(version))
    assert (await platform.get("/api/v1/analytics/compare", params=params)).headers["x-cache"] == "hit"

    await publish("ETH", minute + timedelta(minutes=1))

    async def recomputed() -> bool:
        response = await platform.get("/api/v1/analytics/compare", params=params)
        return response.headers["x-cache"] == "miss"

    await eventually(recomputed)
    # Within the same minute ETH's candle is the same one: the fresh result is cached again.
    await publish("ETH", minute + timedelta(minutes=1, seconds=30))
    await eventually(lambda: _pending_done(redis, settings))
    assert (await platform.get("/api/v1/analytics/compare", params=params)).headers["x-cache"] == "hit"


async def _pending_done(redis: Any, settings: Any) -> bool:
    stream = settings.key("stream", PRICES_STREAM)
    groups = {g["name"].decode(): g for g in await redis.xinfo_groups(stream)}
    group = groups.get("analytics")
    last = await redis.xrevrange(stream, count=1)
    return bool(group and last and group["last-delivered-id"] == last[0][0] and group["pending"] == 0)


async def test_one_coin_analysis_reports_indicators_and_a_planted_spike(platform, db):
    spike_day = START + 40 * DAY
    await db.execute(
        "UPDATE candles SET close = close * 1.5, high = close * 1.5 WHERE base = 'BTC' AND t = $1", spike_day
    )
    response = await platform.get("/api/v1/analytics/BTC", params={"vs": "USD", **RANGE})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["symbol"] == "BTC" and body["summary"]["candles"] == DAYS
    indicators = body["indicators"]
    assert len(indicators["t"]) == len(indicators["close"]) == len(indicators["rsi_14"]) == DAYS
    assert indicators["sma_20"][18] is None and indicators["sma_20"][19] is not None
    spikes = [a for a in body["anomalies"] if a["kind"] == "return"]
    assert any(a["t"].startswith("2024-02-10") and a["direction"] == "up" for a in spikes), body["anomalies"]
    unknown = await platform.get("/api/v1/analytics/NOPE", params={"vs": "USD"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_symbol"


@pytest.mark.parametrize(
    ("kind", "params", "traces"),
    [
        ("history", {"symbol": "BTC"}, {"scatter", "bar"}),
        ("candles", {"symbol": "ETH"}, {"candlestick"}),
        ("compare", {"symbols": "BTC,ETH,SOL"}, {"scatter"}),
        ("correlation", {"symbols": "BTC,ETH,SOL"}, {"heatmap"}),
    ],
)
async def test_charts_are_valid_plotly_figures_and_offline_pages(platform, kind, params, traces):
    response = await platform.get(f"/api/v1/charts/{kind}", params={"vs": "USD", **RANGE, **params})
    assert response.status_code == 200, response.text
    figure = go.Figure(response.json())
    assert traces <= {trace.type for trace in figure.data}
    page = await platform.get(f"/api/v1/charts/{kind}", params={"vs": "USD", "format": "html", **RANGE, **params})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", page.text.split('<script type="application/json"')[0])
    sources = re.findall(r"<script[^>]+src=\"([^\"]+)\"", page.text)
    assert sources and all(src.startswith("/api/v1/charts/assets/") for src in sources)
    for src in sources:
        script = await platform.get(src)
        assert script.status_code == 200 and "javascript" in script.headers["content-type"]
        assert len(script.content) > 100


async def test_history_csv_and_refusals_of_the_chart_endpoint(platform):
    as_csv = await platform.get(
        "/api/v1/charts/history", params={"symbol": "SOL", "vs": "USD", "format": "csv", **RANGE}
    )
    assert as_csv.status_code == 200, as_csv.text
    rows = list(csv.DictReader(io.StringIO(as_csv.text)))
    assert len(rows) == DAYS and float(rows[0]["close"]) == pytest.approx(closes("SOL")[0])
    for params, status in [
        ({"symbol": "SOL", "format": "csv", "kind": "candles"}, 422),
        ({"kind": "history"}, 422),
        ({"kind": "pie", "symbol": "BTC"}, 422),
        ({"kind": "compare", "symbols": "BTC"}, 422),
        ({"kind": "sources", "symbol": "BTC", "start": "2024-01-01", "end": "2024-02-01"}, 422),
    ]:
        kind = params.pop("kind")
        response = await platform.get(f"/api/v1/charts/{kind}", params={"vs": "USD", **params})
        assert response.status_code == status, (kind, params, response.text)
        assert "error" in response.json()


async def test_sources_chart_marks_an_exchange_far_from_the_consolidated_price(platform, db):
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    for minute in range(30):
        t = now - timedelta(minutes=30 - minute)
        await db.execute(
            "INSERT INTO candles (base, vs, interval, t, open, high, low, close) "
            "VALUES ('BTC', 'USD', '1m', $1, 100, 100, 100, 100)",
            t,
        )
        for source, price in (("binance", 100.2), ("kraken", 99.9), ("okx", 104.0 if minute == 10 else 100.1)):
            await db.execute(
                "INSERT INTO ticks (tick_id, source, base, quote, price, exchange_ts, received_at) "
                "VALUES ($1, $2, 'BTC', 'USDT', $3, $4, $4)",
                f"{source}:{minute}", source, price, t + timedelta(seconds=5),
            )  # fmt: skip
    response = await platform.get(
        "/api/v1/charts/sources",
        params={"symbol": "BTC", "vs": "USD", "interval": "1m", "start": (now - timedelta(minutes=30)).isoformat()},
    )
    assert response.status_code == 200, response.text
    figure = go.Figure(response.json())
    names = " ".join(str(trace.name) for trace in figure.data)
    assert "binance" in names and "okx" in names and "kraken" in names
    marked = [t for t in figure.data if "outlier" in str(t.name).lower()]
    assert marked and sum(len(t.x) for t in marked) == 1


async def test_saved_comparisons_belong_to_their_user_and_run_again(platform):
    await register(platform, "ana@example.com")
    await register(platform, "bob@example.com")
    ana = bearer((await tokens(platform, "ana@example.com"))["access_token"])
    bob = bearer((await tokens(platform, "bob@example.com"))["access_token"])
    body = {"name": "majors", "symbols": ["btc", "eth"], "vs": "usd", "start": "2024-01-01T00:00:00Z",
            "end": "2024-03-01T00:00:00Z", "interval": "1d"}  # fmt: skip
    assert (await platform.post("/api/v1/analytics/comparisons", json=body)).status_code == 401
    created = await platform.post("/api/v1/analytics/comparisons", json=body, headers=ana)
    assert created.status_code == 201, created.text
    saved = created.json()
    assert saved["symbols"] == ["BTC", "ETH"] and saved["vs"] == "USD" and saved["period"] is None
    duplicate = await platform.post("/api/v1/analytics/comparisons", json=body, headers=ana)
    assert duplicate.status_code == 409
    relative = await platform.post(
        "/api/v1/analytics/comparisons", json={"name": "recent", "symbols": ["BTC", "SOL"], "period": "7d"}, headers=ana
    )
    assert relative.status_code == 201 and relative.json()["period"] == "7d"
    both = await platform.post(
        "/api/v1/analytics/comparisons",
        json={"name": "x", "symbols": ["BTC", "SOL"], "period": "7d", "start": "2024-01-01T00:00:00Z"},
        headers=ana,
    )
    assert both.status_code == 422
    unknown = await platform.post(
        "/api/v1/analytics/comparisons", json={"name": "y", "symbols": ["BTC", "NOPE"]}, headers=ana
    )
    assert unknown.status_code == 404

    listed = (await platform.get("/api/v1/analytics/comparisons", headers=ana)).json()["items"]
    assert [c["name"] for c in listed] == ["recent", "majors"]
    assert (await platform.get("/api/v1/analytics/comparisons", headers=bob)).json()["items"] == []
    path = f"/api/v1/analytics/comparisons/{saved['id']}"
    assert (await platform.get(path, headers=bob)).status_code == 404
    assert (await platform.get(f"{path}/run", headers=bob)).status_code == 404
    assert (await platform.delete(path, headers=bob)).status_code == 404

    run = await platform.get(f"{path}/run", headers=ana)
    assert run.status_code == 200, run.text
    direct = await platform.get("/api/v1/analytics/compare", params={"symbols": "BTC,ETH", "vs": "USD", **RANGE})
    assert run.json()["coins"] == direct.json()["coins"]
    assert (await platform.delete(path, headers=ana)).status_code == 204
    assert (await platform.get(path, headers=ana)).status_code == 404


async def test_without_btc_tracked_compare_works_and_beta_says_why_it_is_missing(platform, db):
    await db.execute("UPDATE coins SET active = false WHERE symbol = 'BTC'")
    response = await platform.get("/api/v1/analytics/compare", params={"symbols": "ETH,SOL", "vs": "USD", **RANGE})
    assert response.status_code == 200, response.text
    coins = response.json()["coins"]
    assert all(c["beta"] is None and "beta" in c["nulls"] for c in coins), coins
    named = await platform.get(
        "/api/v1/analytics/compare", params={"symbols": "ETH,SOL", "vs": "USD", "benchmark": "BTC", **RANGE}
    )
    assert named.status_code == 404 and "BTC" in named.json()["error"]["message"]
    with_eth = await platform.get(
        "/api/v1/analytics/compare", params={"symbols": "ETH,SOL", "vs": "USD", "benchmark": "ETH", **RANGE}
    )
    assert {c["symbol"]: c["beta"] for c in with_eth.json()["coins"]}["ETH"] == pytest.approx(1.0)


async def test_unknown_assets_and_out_of_range_saved_dates_are_refused(platform):
    assert (await platform.get("/api/v1/charts/assets/nope.js")).status_code == 404
    await register(platform, "dates@example.com")
    headers = bearer((await tokens(platform, "dates@example.com"))["access_token"])
    far = {"name": "far", "symbols": ["BTC", "ETH"], "start": "9999-12-31T00:00:00Z", "end": "9999-12-31T12:00:00Z"}
    response = await platform.post("/api/v1/analytics/comparisons", json=far, headers=headers)
    assert response.status_code == 422, response.text
