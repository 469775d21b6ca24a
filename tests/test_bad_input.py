"""Bad input from both sides: broken exchange responses reach the ingest source runner through a local
replay server; bad requests reach the public API through a running gateway and pricing service."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from redis.asyncio import Redis

from services.gateway.app import create_app as gateway_app
from services.ingest.rest import CcxtRestSource
from services.ingest.runner import SourceRunner
from services.pricing.app import create_app as pricing_app
from shared.db import create_engine, session_factory
from shared.messages import TickMessage
from shared.settings import Settings
from shared.source_health import health_key, parse_health
from shared.streams import TICKS_STREAM, StreamPublisher
from tests.conftest import free_port, make_settings, serve_app
from tests.replay import ReplayServer, Reply, serve_binance

TICKER_PATH = "/api/v3/ticker/24hr"
TICKER_FILE = Path("binance") / "rec_api_v1_ticker_24hr_ALL_2019-08-22.json"
RATE_LIMIT_FILE = Path("binance") / "rec_error_429_-1003_2019.json"
# The tracked coins' markets that both the recorded market list and the recorded ticker list hold.
RECORDED_PAIRS = {"BTCUSDT", "ETHUSDT", "BTCUSDC", "ETHUSDC"}


# --------------------------------------------------------------------------------------------------
# Ingest: a Binance source behind the replay server
# --------------------------------------------------------------------------------------------------


@dataclass
class Ingest:
    settings: Settings
    redis: Redis
    replay: ReplayServer
    fixtures: Path
    make_runner: Callable[..., SourceRunner]

    def ticker_bytes(self) -> bytes:
        return (self.fixtures / TICKER_FILE).read_bytes()

    def ticker_rows(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = json.loads(self.ticker_bytes())
        return rows

    async def health(self) -> dict[str, Any]:
        return parse_health(await self.redis.hgetall(health_key(self.settings, "binance")))

    async def published(self) -> list[TickMessage]:
        key = f"{self.settings.redis_namespace}:stream:{TICKS_STREAM}"
        entries = await self.redis.xrange(key)
        return [TickMessage.from_stream(json.loads(fields[b"data"])) for _id, fields in entries]


@pytest.fixture
async def ingest(settings, redis, replay, exchange_fixtures) -> AsyncIterator[Ingest]:
    serve_binance(replay, exchange_fixtures)
    configured = make_settings(
        settings.database_url,
        settings.redis_url,
        settings.redis_namespace,
        sources=["binance"],
        coins=["BTC", "ETH"],
    )
    engine = create_engine(configured.require_database_url())
    runners: list[SourceRunner] = []

    def make_runner(timeout_seconds: float = 5.0) -> SourceRunner:
        source = CcxtRestSource("binance", rest_url=replay.base_url, timeout_seconds=timeout_seconds)
        runner = SourceRunner(
            source,
            settings=configured.model_copy(update={"source_timeout_seconds": timeout_seconds}),
            redis=redis,
            publisher=StreamPublisher(redis, namespace=configured.redis_namespace, maxlen=configured.stream_maxlen),
            sessions=session_factory(engine),
        )
        runners.append(runner)
        return runner

    try:
        yield Ingest(configured, redis, replay, exchange_fixtures, make_runner)
    finally:
        for runner in runners:
            await runner.source.close()
        await engine.dispose()


async def error_rows(db) -> list[dict[str, Any]]:
    rows = await db.fetch("SELECT source, kind, message FROM error_log ORDER BY id")
    return [dict(row) for row in rows]


async def assert_recovers(ingest: Ingest, runner: SourceRunner) -> None:
    """With the recorded payload served again, the next poll publishes and the source is connected."""
    ingest.replay.serve(TICKER_PATH, ingest.ticker_bytes())
    delay = await runner.run_once()
    assert delay == runner.interval
    health = await ingest.health()
    assert health["state"] == "connected"
    assert health["backoff_seconds"] == 0
    recorded = {row["symbol"]: row for row in ingest.ticker_rows()}
    published = await ingest.published()
    assert {t.pair for t in published} == RECORDED_PAIRS
    for tick in published:
        assert tick.source == "binance"
        assert tick.price == Decimal(recorded[tick.pair]["lastPrice"])


async def test_truncated_ticker_payload_marks_the_source_down_and_recovers(ingest, db):
    full = ingest.ticker_bytes()
    ingest.replay.serve(TICKER_PATH, full[: len(full) // 2])
    runner = ingest.make_runner()

    delay = await runner.run_once()

    assert delay >= runner.interval
    health = await ingest.health()
    assert health["state"] == "down"
    assert health["last_error_kind"] == "bad_response"
    assert health["errors"] == {"bad_response": 1}
    assert health["backoff_seconds"] > 0
    assert await ingest.published() == []
    rows = await error_rows(db)
    assert [(r["source"], r["kind"]) for r in rows] == [("binance", "bad_response")]
    assert rows[0]["message"]

    await assert_recovers(ingest, runner)
    health = await ingest.health()
    assert health["messages_total"] == len(RECORDED_PAIRS)
    assert health["errors"]["bad_response"] == 1


async def test_rate_limit_with_retry_after_backs_off_at_least_that_long(ingest, db):
    body = (ingest.fixtures / RATE_LIMIT_FILE).read_bytes()
    ingest.replay.fail_next(TICKER_PATH, Reply(body=body, status=429, headers={"Retry-After": "7"}))
    runner = ingest.make_runner()

    delay = await runner.run_once()

    # Without Retry-After the first backoff would stay within two poll intervals (0.4 s here).
    assert delay >= 7
    health = await ingest.health()
    assert health["state"] == "rate_limited"
    assert health["last_error_kind"] == "rate_limited"
    assert health["backoff_seconds"] >= 7
    assert "-1003" in health["last_error"]
    assert [r["kind"] for r in await error_rows(db)] == ["rate_limited"]
    assert await ingest.published() == []

    await assert_recovers(ingest, runner)


@pytest.mark.parametrize(
    ("fault", "kind"),
    [
        pytest.param(Reply(body=b"", status=500), "unavailable", id="500"),
        pytest.param(
            Reply(body=b"<html><body>502 Bad Gateway</body></html>", status=502, headers={"Content-Type": "text/html"}),
            "unavailable",
            id="502-html",
        ),
        pytest.param(Reply(body=b'{"code":-1001,"msg":"Internal error"}', status=503), "unavailable", id="503"),
        pytest.param("timeout", "timeout", id="timeout"),
    ],
)
async def test_server_errors_and_timeouts_mark_the_source_down_without_raising(ingest, db, fault, kind):
    timeout = 0.5
    if fault == "timeout":
        # The recorded payload, served later than the source waits.
        fault = Reply(body=ingest.ticker_bytes(), delay=timeout * 3)
    ingest.replay.fail_next(TICKER_PATH, fault)
    runner = ingest.make_runner(timeout_seconds=timeout)

    delay = await runner.run_once()

    assert delay >= runner.interval
    health = await ingest.health()
    assert health["state"] == "down"
    assert health["last_error_kind"] == kind
    assert health["errors"] == {kind: 1}
    assert [(r["source"], r["kind"]) for r in await error_rows(db)] == [("binance", kind)]
    assert await ingest.published() == []

    await assert_recovers(ingest, runner)


@pytest.mark.parametrize("bad_price", ["0", "-1", "NaN", "-0.00000001", "Infinity"])
async def test_ticker_with_an_invalid_last_price_is_rejected_and_the_others_published(ingest, db, bad_price):
    rows = ingest.ticker_rows()
    original = next(r for r in rows if r["symbol"] == "BTCUSDT")
    original["lastPrice"] = bad_price
    ingest.replay.serve(TICKER_PATH, json.dumps(rows))
    runner = ingest.make_runner()

    with structlog.testing.capture_logs() as logs:
        delay = await runner.run_once()

    assert delay == runner.interval
    published = await ingest.published()
    assert {t.pair for t in published} == RECORDED_PAIRS - {"BTCUSDT"}
    assert all(t.price > 0 for t in published)
    health = await ingest.health()
    assert health["state"] == "connected"
    assert health["rejected_total"] >= 1
    assert health["messages_total"] == len(RECORDED_PAIRS) - 1
    rejections = [e for e in logs if e["event"] == "quote_rejected" and e["pair"] in ("BTCUSDT", "BTC/USDT")]
    assert len(rejections) == 1
    assert rejections[0]["source"] == "binance"
    assert rejections[0]["reason"]
    bad_quotes = [r for r in await error_rows(db) if r["kind"] == "rejected_quote"]
    assert len(bad_quotes) == 1
    assert bad_quotes[0]["source"] == "binance"
    assert "BTC" in bad_quotes[0]["message"]


# --------------------------------------------------------------------------------------------------
# API: gateway in front of a running pricing service
# --------------------------------------------------------------------------------------------------


def closed_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


def gateway_settings(settings: Settings, **urls: str) -> Settings:
    values = {
        "ingest_url": closed_url(),
        "pricing_url": closed_url(),
        "conversion_url": closed_url(),
        "analytics_url": closed_url(),
        "alerting_url": closed_url(),
        **urls,
    }
    return settings.model_copy(update=values)


@dataclass
class Api:
    gateway: str
    pricing: str


@pytest.fixture
async def api(settings) -> AsyncIterator[Api]:
    common = make_settings(
        settings.database_url,
        settings.redis_url,
        settings.redis_namespace,
        coins=["BTC", "ETH"],
        sources=["binance"],
        # Many requests from one address in one test: keep the gateway's anonymous rate limit out of the way.
        rate_limit_anonymous=10_000,
    )
    async with (
        serve_app(pricing_app(common)) as pricing_url,
        serve_app(gateway_app(gateway_settings(common, pricing_url=pricing_url))) as gateway_url,
    ):
        yield Api(gateway=gateway_url, pricing=pricing_url)


def error_problems(response: httpx.Response, statuses: tuple[int, ...], codes: tuple[str, ...]) -> list[str]:
    """What is wrong with ``response`` as an error answer with one of the expected statuses and codes."""
    where = f"{response.request.method} {response.request.url}"
    if response.status_code not in statuses:
        return [f"{where}: status {response.status_code}, expected {statuses}: {response.text[:300]}"]
    if not response.headers.get("content-type", "").startswith("application/json"):
        return [f"{where}: content-type {response.headers.get('content-type')!r}"]
    body = response.json()
    if set(body) != {"error"} or set(body["error"]) != {"code", "message", "details"}:
        return [f"{where}: not the error shape: {body}"]
    problems = []
    if body["error"]["code"] not in codes:
        problems.append(f"{where}: code {body['error']['code']!r}, expected {codes}")
    if not isinstance(body["error"]["message"], str) or not body["error"]["message"]:
        problems.append(f"{where}: empty message")
    return problems


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    problems = error_problems(response, (status,), (code,))
    assert not problems, "\n".join(problems)
    error: dict[str, Any] = response.json()["error"]
    return error


BAD_PRICE_QUERIES: list[tuple[str, dict[str, str], int, str]] = [
    ("unknown coin", {"symbols": "NOPE"}, 404, "unknown_symbol"),
    ("one unknown coin", {"symbols": "BTC,NOPE"}, 404, "unknown_symbol"),
    ("unknown vs currency", {"symbols": "BTC", "vs": "XYZ"}, 404, "unknown_currency"),
    ("invalid symbol", {"symbols": "BT$C"}, 422, "validation_error"),
    ("invalid vs", {"symbols": "BTC", "vs": "U$D"}, 422, "validation_error"),
    ("missing symbols", {}, 422, "validation_error"),
    ("empty symbols", {"symbols": ""}, 422, "validation_error"),
    ("only commas", {"symbols": " , ,"}, 422, "validation_error"),
    ("symbol too long", {"symbols": "A" * 16}, 422, "validation_error"),
    ("too many symbols", {"symbols": ",".join(f"C{i}" for i in range(101))}, 422, "validation_error"),
    ("unknown include", {"symbols": "BTC", "include": "secrets"}, 422, "validation_error"),
    ("NUL byte", {"symbols": "BTC\x00"}, 422, "validation_error"),
    ("SQL-ish", {"symbols": "BTC'; DROP TABLE prices;--"}, 422, "validation_error"),
    ("non-ASCII", {"symbols": "BTC,\u0411\u0422\u041a"}, 422, "validation_error"),
    # A tracked coin without any price yet: a clear 503, not an error page.
    ("no price yet", {"symbols": "BTC"}, 503, "no_fresh_data"),
]


@pytest.mark.parametrize("via", ["gateway", "pricing"])
async def test_bad_price_requests_get_the_error_shape(api, via):
    problems: list[str] = []
    async with httpx.AsyncClient(base_url=getattr(api, via)) as client:
        for name, params, status, code in BAD_PRICE_QUERIES:
            response = await client.get("/api/v1/prices", params=params)
            found = error_problems(response, (status,), (code,))
            problems += [f"{name}: {p}" for p in found]
            if found:
                continue
            error = response.json()["error"]
            if code == "unknown_symbol" and error["details"] != {"unknown": ["NOPE"]}:
                problems.append(f"{name}: details {error['details']}")
            if code == "unknown_currency" and error["details"] != {"unknown": ["XYZ"]}:
                problems.append(f"{name}: details {error['details']}")
            if code == "no_fresh_data" and int(response.headers.get("retry-after", "0")) < 1:
                problems.append(f"{name}: no Retry-After")
    assert not problems, "\n".join(problems)


async def test_missing_symbols_names_the_parameter(api):
    async with httpx.AsyncClient(base_url=api.gateway) as client:
        response = await client.get("/api/v1/prices")
    error = assert_error(response, 422, "validation_error")
    assert "symbols" in error["message"]
    assert any("symbols" in item["loc"] for item in error["details"])


UNROUTED: list[tuple[str, str, int, str]] = [
    ("GET", "/api/v1/nope", 404, "not_found"),
    ("GET", "/api/v1/", 404, "not_found"),
    ("GET", "/api/v1/pricesX", 404, "not_found"),
    ("GET", "/api/v2/prices", 404, "not_found"),
    ("GET", "/nope", 404, "not_found"),
    ("POST", "/api/v1/prices?symbols=BTC", 405, "method_not_allowed"),
]
ADMIN_PATHS: list[tuple[str, str]] = [
    ("GET", "/api/v1/admin/sources"),
    ("GET", "/api/v1/admin/errors"),
    ("GET", "/api/v1/admin/errors?since=yesterday"),
    ("DELETE", "/api/v1/admin/sources"),
    ("POST", "/api/v1/admin/sources/binance"),
    ("GET", "/api/v1/admin/nope"),
]


async def test_unknown_routes_and_methods_get_the_error_shape(api):
    problems: list[str] = []
    async with httpx.AsyncClient(base_url=api.gateway) as client:
        for method, path, status, code in UNROUTED:
            problems += error_problems(await client.request(method, path), (status,), (code,))
    assert not problems, "\n".join(problems)


async def test_admin_paths_are_refused_without_an_administrator(api):
    problems: list[str] = []
    async with httpx.AsyncClient(base_url=api.gateway) as client:
        for method, path in ADMIN_PATHS:
            # Refused before any service is asked: 401 without credentials (403 for a non-admin account).
            problems += error_problems(await client.request(method, path), (401, 403), ("unauthorized", "forbidden"))
            # A made-up token is no way in either.
            forged = await client.request(method, path, headers={"Authorization": "Bearer not-a-real-token"})
            problems += error_problems(forged, (401, 403), ("unauthorized", "forbidden"))
    assert not problems, "\n".join(problems)


async def test_gateway_reports_bad_gateway_when_pricing_is_not_running(settings):
    configured = gateway_settings(make_settings(settings.database_url, settings.redis_url, settings.redis_namespace))
    async with serve_app(gateway_app(configured)) as gateway_url, httpx.AsyncClient(base_url=gateway_url) as client:
        response = await client.get("/api/v1/prices", params={"symbols": "BTC", "vs": "USD"})
        error = assert_error(response, 502, "bad_gateway")
        assert error["details"] == {"service": "pricing"}
        # The status page still answers, reporting what it cannot reach.
        status = await client.get("/api/v1/status")
    assert status.status_code == 200
    body = status.json()
    assert body["status"] == "degraded"
    assert body["services"]["pricing"]["status"] == "unreachable"
