"""An administrator switches a source off and on at runtime: through the gateway, against ingest polling a local
server that replays Binance's recorded traffic, with the offline ``sim`` source running beside it as a clock
(while sim keeps ticking, a running Binance loop would keep polling)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from services.gateway.app import create_app as gateway_app
from services.ingest.app import create_app as ingest_app
from shared.settings import Settings
from tests.accounts import bearer, register, tokens
from tests.conftest import eventually, free_port, serve_app
from tests.replay import ReplayServer, serve_binance

TICKER = "/api/v3/ticker/24hr"
SOURCES = "/api/v1/admin/sources"
# Sim ticks of one poll: one per simulated venue for the one tracked coin.
SIM_TICKS_PER_POLL = 3


@dataclass
class Stack:
    settings: Settings
    client: httpx.AsyncClient
    admin: dict[str, str]
    user: dict[str, str]
    replay: ReplayServer
    redis: Redis
    ingest_port: int
    ingest: contextlib.AsyncExitStack

    async def restart_ingest(self) -> None:
        """Stops ingest and starts a new one (a fresh app on the same database and port, as after a deploy)."""
        await self.ingest.aclose()
        self.ingest = contextlib.AsyncExitStack()
        await self.ingest.enter_async_context(serve_app(ingest_app(self.settings), port=self.ingest_port))

    async def source(self, name: str) -> dict[str, Any]:
        response = await self.client.get(SOURCES, headers=self.admin)
        assert response.status_code == 200, response.text
        return next(s for s in response.json()["sources"] if s["name"] == name)

    async def switch(self, name: str, enabled: bool) -> dict[str, Any]:
        response = await self.client.patch(f"{SOURCES}/{name}", json={"enabled": enabled}, headers=self.admin)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    async def ticks(self) -> list[dict[str, Any]]:
        entries = await self.redis.xrange(self.settings.key("stream", "ticks"))
        return [json.loads(fields[b"data"]) for _id, fields in entries]

    async def count(self, source_prefix: str) -> int:
        return sum(1 for t in await self.ticks() if t["source"].startswith(source_prefix))

    async def while_sim_ticks(self, polls: int = 5) -> None:
        """Returns once sim has published ``polls`` more polls' worth of ticks: time for a running loop to poll."""
        start = await self.count("sim-")

        async def ticked() -> bool:
            return await self.count("sim-") >= start + polls * SIM_TICKS_PER_POLL

        await eventually(ticked, timeout=20)


def shifted_ticker(fixtures: Path, factor: str) -> bytes:
    """The recorded 24h tickers with BTCUSDT's prices scaled by ``factor`` and a later close time."""
    rows = json.loads((fixtures / "binance" / "rec_api_v1_ticker_24hr_ALL_2019-08-22.json").read_text())
    for row in rows:
        row["closeTime"] = int(row["closeTime"]) + 60_000
        if row["symbol"] == "BTCUSDT":
            for name in ("lastPrice", "bidPrice", "askPrice"):
                row[name] = str(Decimal(row[name]) * Decimal(factor))
    return json.dumps(rows).encode()


@pytest.fixture
async def stack(
    settings: Settings, redis: Redis, db: Any, replay: ReplayServer, exchange_fixtures: Path
) -> AsyncIterator[Stack]:
    serve_binance(replay, exchange_fixtures)
    enforced = settings.model_copy(
        update={
            "internal_auth_required": True,
            "sources": ["binance", "sim", "nosuchexchange"],
            "coins": ["BTC"],
            "source_urls": {"binance_rest_url": replay.base_url},
            "sim_interval_seconds": 0.2,
            "poll_interval_seconds": 0.2,
            "rate_limit_user": 100_000,
            "rate_limit_anonymous": 100_000,
        }
    )
    port = free_port()
    gw = enforced.model_copy(update={"ingest_url": f"http://127.0.0.1:{port}"})
    ingest = contextlib.AsyncExitStack()
    await ingest.enter_async_context(serve_app(ingest_app(enforced), port=port))
    async with (
        serve_app(gateway_app(gw)) as gateway,
        httpx.AsyncClient(base_url=gateway, timeout=30) as client,
    ):
        await register(client, "admin@example.com")
        await register(client, "user@example.com")
        await db.execute("UPDATE users SET role = 'admin' WHERE email = 'admin@example.com'")
        admin = bearer((await tokens(client, "admin@example.com"))["access_token"])
        user = bearer((await tokens(client, "user@example.com"))["access_token"])
        stack = Stack(enforced, client, admin, user, replay, redis, port, ingest)
        try:
            yield stack
        finally:
            await stack.ingest.aclose()


async def connected(stack: Stack, name: str) -> dict[str, Any] | None:
    source = await stack.source(name)
    return source if source["state"] == "connected" and source["messages_total"] > 0 else None


async def test_a_disabled_source_stops_ticking_says_so_and_resumes_when_enabled_again(
    stack: Stack, exchange_fixtures: Path
) -> None:
    await eventually(lambda: connected(stack, "binance"))
    await eventually(lambda: connected(stack, "sim"))
    assert (await stack.source("binance"))["enabled"] is True

    off = await stack.switch("binance", False)
    assert off["name"] == "binance" and off["enabled"] is False and off["state"] == "disabled"
    assert off["switchable"] is True and off["enabled_changed_at"] and off["enabled_changed_by"]
    assert off["messages_per_second"] == 0
    # The answer comes once the loop has stopped: from here on, nothing more from Binance.
    ticks, polls = await stack.count("binance"), stack.replay.count(TICKER)
    await stack.while_sim_ticks()
    assert await stack.count("binance") == ticks
    assert stack.replay.count(TICKER) == polls

    listed = await stack.source("binance")
    assert listed["enabled"] is False and listed["state"] == "disabled"
    assert (await stack.source("sim"))["state"] == "connected"
    status = (await stack.client.get("/api/v1/status")).json()
    assert status["sources"]["binance"]["state"] == "disabled"
    # A source switched off on purpose is not a broken service: ingest stays ready, its tasks all running.
    async with httpx.AsyncClient() as direct:
        ready = await direct.get(f"http://127.0.0.1:{stack.ingest_port}/readyz")
    assert ready.status_code == 200, ready.text

    # Enabled again: the loop starts over without a restart and quotes that changed meanwhile arrive.
    stack.replay.serve(TICKER, shifted_ticker(exchange_fixtures, "1.05"))
    on = await stack.switch("binance", True)
    assert on["enabled"] is True and on["state"] in {"starting", "connected"}
    rows = json.loads((exchange_fixtures / "binance" / "rec_api_v1_ticker_24hr_ALL_2019-08-22.json").read_text())
    recorded = Decimal(next(r for r in rows if r["symbol"] == "BTCUSDT")["lastPrice"])
    expected = recorded * Decimal("1.05")

    async def moved() -> bool:
        return any(
            t["source"] == "binance" and t["base"] == "BTC" and Decimal(t["price"]) == expected
            for t in await stack.ticks()
        )

    await eventually(moved)
    back = await eventually(lambda: connected(stack, "binance"))
    assert back["enabled"] is True
    assert stack.replay.count(TICKER) > polls


async def test_only_administrators_switch_known_sources_with_a_well_formed_body(stack: Stack, db: Any) -> None:
    path = f"{SOURCES}/binance"
    assert (await stack.client.patch(path, json={"enabled": False})).status_code == 401
    forbidden = await stack.client.patch(path, json={"enabled": False}, headers=stack.user)
    assert forbidden.status_code == 403, forbidden.text
    assert forbidden.json()["error"]["code"] == "forbidden"

    unknown = await stack.client.patch(f"{SOURCES}/kraken", json={"enabled": False}, headers=stack.admin)
    assert unknown.status_code == 404, unknown.text
    assert "kraken" in unknown.json()["error"]["message"]
    # Named in the configuration but never started (ccxt has no such exchange): nothing to switch.
    unstartable = await stack.client.patch(f"{SOURCES}/nosuchexchange", json={"enabled": True}, headers=stack.admin)
    assert unstartable.status_code == 409, unstartable.text
    assert "not running" in unstartable.json()["error"]["message"]

    bodies: list[Any] = [{}, {"enabled": "false"}, {"enabled": 0}, {"enabled": None}, {"enabled": False, "x": 1}, []]
    for body in bodies:
        bad = await stack.client.patch(path, json=body, headers=stack.admin)
        assert bad.status_code == 422, (body, bad.text)
        assert bad.json()["error"]["code"] == "validation_error"
    not_json = await stack.client.patch(
        path, content=b"enabled=false", headers={**stack.admin, "Content-Type": "application/json"}
    )
    assert not_json.status_code == 422, not_json.text
    long_name = await stack.client.patch(f"{SOURCES}/{'x' * 51}", json={"enabled": False}, headers=stack.admin)
    assert long_name.status_code == 422, long_name.text

    # None of the refused calls switched anything.
    binance = await stack.source("binance")
    assert binance["enabled"] is True and binance["state"] != "disabled"
    assert await db.fetchval("SELECT count(*) FROM source_settings") == 0


async def test_a_disabled_source_stays_disabled_after_ingest_restarts(stack: Stack, db: Any) -> None:
    await eventually(lambda: connected(stack, "binance"))
    await stack.switch("binance", False)
    row = await db.fetchrow("SELECT enabled, changed_by FROM source_settings WHERE name = 'binance'")
    assert row is not None and row["enabled"] is False and row["changed_by"]

    await stack.restart_ingest()
    await eventually(lambda: connected(stack, "sim"))
    binance = await stack.source("binance")
    assert binance["enabled"] is False and binance["state"] == "disabled"
    assert binance["enabled_changed_by"] == row["changed_by"]
    polls = stack.replay.count(TICKER)
    await stack.while_sim_ticks()
    assert stack.replay.count(TICKER) == polls

    on = await stack.switch("binance", True)
    assert on["enabled"] is True
    await eventually(lambda: connected(stack, "binance"))
    assert stack.replay.count(TICKER) > polls
