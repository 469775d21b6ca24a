"""The live websocket ``/api/v1/ws`` through a real gateway on uvicorn, with real websocket clients: prices in
stream order for the subscribed symbols only, subscribe and unsubscribe, each user's own alert events, every
way of presenting a token (and the refusals), revocation and expiry while open, bad messages and queries,
slow clients disconnected without holding back the others, unreadable stream entries skipped, and a Redis
outage ridden out."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import httpx
import pytest
from jose import jwt
from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from services.gateway.app import create_app as gateway_app
from services.gateway.live.schemas import COOKIE_NAME
from shared.embedded import EmbeddedRedis
from shared.settings import Settings
from shared.streams import ALERT_EVENTS_STREAM, PRICES_STREAM, StreamPublisher
from tests.accounts import bearer, register, tokens
from tests.conftest import eventually, free_port, make_settings, serve_app

COINS = ["BTC", "ETH", "SOL", "XRP", "ADA", "DOGE", "LTC", "DOT", "LINK", "AVAX"]
Frame = dict[str, Any]


@dataclass
class Gateway:
    url: str
    http: httpx.AsyncClient
    settings: Settings
    publisher: StreamPublisher

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://", 1) + "/api/v1/ws"

    def connect(self, query: str = "symbols=BTC&vs=USD", **kwargs: Any) -> Any:
        kwargs.setdefault("proxy", None)
        kwargs.setdefault("open_timeout", 15)
        return connect(f"{self.ws_url}?{query}" if query else self.ws_url, **kwargs)

    async def user(self, email: str) -> tuple[str, str]:
        """(user id, access token) of a new account."""
        created = await register(self.http, email)
        return created["id"], (await tokens(self.http, email))["access_token"]

    async def price(self, base: str, value: str, vs: str = "USD", *, event_id: str | None = None) -> str:
        event_id = event_id or uuid.uuid4().hex
        await self.publisher.publish(PRICES_STREAM, price_payload(base, value, vs, event_id))
        return event_id

    async def alert(self, user_id: str, **overrides: Any) -> str:
        event_id = str(uuid.uuid4())
        payload = {
            "id": event_id, "type": "alert.triggered", "alert_id": str(uuid.uuid4()), "user_id": user_id,
            "symbol": "BTC", "vs": "USD", "condition": "above", "threshold": "100000.5", "window_minutes": None,
            "value": "100001.25", "previous": "99999", "price": "100001.25", "price_at": "2026-11-25T09:59:59Z",
            "created_at": "2026-11-25T10:00:00Z",
        }  # fmt: skip
        payload.update(overrides)
        await self.publisher.publish(ALERT_EVENTS_STREAM, payload)
        return event_id

    async def metric(self, name: str, labels: str = "") -> float:
        text = (await self.http.get("/metrics")).text
        match = re.search(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$", text, re.MULTILINE)
        return float(match.group(1)) if match else 0.0


def price_payload(base: str, value: str, vs: str, event_id: str) -> dict[str, Any]:
    return {
        "event_id": event_id, "base": base, "vs": vs, "price": value, "volume_24h": "12.5", "status": "fresh",
        "sources_used": 3, "sources_total": 4, "method": "vwap-mad2.5", "last_updated": "2026-11-25T10:00:00Z",
        "fresh_until": "2026-11-25T10:01:00Z", "spread_pct": "0.125",
    }  # fmt: skip


@contextlib.asynccontextmanager
async def running(settings: Settings, db: Any, redis: Any, **overrides: Any) -> AsyncIterator[Gateway]:
    await db.executemany("INSERT INTO coins (symbol, name, active) VALUES ($1, $1, true)", [(c,) for c in COINS])
    configured = settings.model_copy(update={"live_heartbeat_seconds": 0.5, **overrides})
    publisher = StreamPublisher(redis, namespace=settings.redis_namespace, maxlen=10_000)
    async with serve_app(gateway_app(configured)) as url, httpx.AsyncClient(base_url=url, timeout=20) as http:
        yield Gateway(url, http, configured, publisher)


@pytest.fixture
async def gateway(settings, db, redis) -> AsyncIterator[Gateway]:
    async with running(settings, db, redis) as gw:
        yield gw


async def frames_until(ws: ClientConnection, done: Callable[[Frame], bool], *, timeout: float = 20) -> list[Frame]:
    """The frames received (heartbeats left out) up to and including the first one ``done`` accepts."""
    seen: list[Frame] = []
    async with asyncio.timeout(timeout):  # a safety net against a hung test, not a measurement
        while True:
            frame = json.loads(await ws.recv(), parse_float=Decimal)
            if frame["type"] == "heartbeat":
                continue
            seen.append(frame)
            if done(frame):
                return seen


async def next_frame(ws: ClientConnection) -> Frame:
    return (await frames_until(ws, lambda _: True))[0]


def price_of(event_id: str) -> Callable[[Frame], bool]:
    return lambda frame: frame["type"] == "price" and frame["event_id"] == event_id


def of_type(kind: str) -> Callable[[Frame], bool]:
    return lambda frame: frame["type"] == kind


async def closed(ws: ClientConnection, *, timeout: float = 30) -> tuple[int | None, str | None]:
    """Reads until the server closes; the close code and reason it sent."""
    with contextlib.suppress(ConnectionClosed):
        async with asyncio.timeout(timeout):
            while True:
                await ws.recv()
    return ws.close_code, ws.close_reason


async def send(ws: ClientConnection, message: Any) -> None:
    await ws.send(message if isinstance(message, str | bytes) else json.dumps(message))


# --- prices ----------------------------------------------------------------------------------------


async def test_welcome_then_prices_of_the_subscribed_pairs_only_in_stream_order(gateway):
    async with gateway.connect("symbols=btc,Eth&vs=usd") as ws:
        assert json.loads(await ws.recv()) == {
            "type": "welcome", "symbols": ["BTC", "ETH"], "vs": "USD", "authenticated": False,
            "heartbeat_seconds": 0.5,
        }  # fmt: skip
        beat = json.loads(await ws.recv())
        assert beat["type"] == "heartbeat" and re.match(r"^\d{4}-\d\d-\d\dT[\d:.]+Z$", beat["at"])

        # In step with the client: every price arrives, exactly as published.
        published = []
        for i, (base, vs) in enumerate([("BTC", "USD"), ("SOL", "USD"), ("ETH", "USD"), ("BTC", "EUR")] * 3):
            event_id = await gateway.price(base, f"{100 + i}.25", vs)
            if vs == "USD" and base in ("BTC", "ETH"):
                published.append(event_id)
                received = await frames_until(ws, price_of(event_id))
                assert [f["event_id"] for f in received] == [event_id], "nothing else came in between"
        last = received[-1]
        assert last == {
            "type": "price", "base": "ETH", "vs": "USD", "price": Decimal("110.25"), "status": "fresh",
            "last_updated": "2026-11-25T10:00:00Z", "sources_used": 3, "sources_total": 4,
            "spread_pct": Decimal("0.125"), "event_id": published[-1],
        }  # fmt: skip

        # A burst: the client may get fewer frames than entries (prices coalesce), but always in order, and
        # always the newest last.
        burst = [await gateway.price("BTC", f"{200 + i}") for i in range(60)]
        got = await frames_until(ws, price_of(burst[-1]))
        ids = [f["event_id"] for f in got]
        assert set(ids) <= set(burst) and ids == sorted(ids, key=burst.index) and ids[-1] == burst[-1]
        assert [f["price"] for f in got] == sorted(f["price"] for f in got)


async def test_subscribe_and_unsubscribe_on_an_open_socket(gateway):
    async with gateway.connect("symbols=BTC") as ws:
        assert (await next_frame(ws))["symbols"] == ["BTC"]
        await send(ws, {"action": "subscribe", "symbols": ["eth", "SOL", "BTC"]})
        assert await next_frame(ws) == {"type": "subscribed", "symbols": ["BTC", "ETH", "SOL"]}
        sol = await gateway.price("SOL", "150")
        assert (await frames_until(ws, price_of(sol)))[-1]["base"] == "SOL"

        await send(ws, {"action": "unsubscribe", "symbols": ["BTC", "SOL", "XRP"]})
        assert await next_frame(ws) == {"type": "subscribed", "symbols": ["ETH"]}
        await gateway.price("BTC", "1")
        await gateway.price("SOL", "2")
        eth = await gateway.price("ETH", "3")
        assert [f["base"] for f in await frames_until(ws, price_of(eth))] == ["ETH"]

        await send(ws, {"action": "subscribe", "symbols": ["NOPE"]})
        assert (await next_frame(ws))["code"] == "unknown_symbol"
        await send(ws, {"action": "subscribe", "symbols": [f"X{i}" for i in range(51)]})
        assert (await next_frame(ws))["code"] == "too_many_symbols"
        await send(ws, {"action": "ping"})
        assert await next_frame(ws) == {"type": "pong"}
        await send(ws, {"action": "unsubscribe", "symbols": ["ETH"]})
        assert await next_frame(ws) == {"type": "subscribed", "symbols": []}


async def test_symbols_per_socket_are_limited(settings, db, redis):
    async with running(settings, db, redis, live_max_symbols=2) as gw, gw.connect("symbols=BTC,ETH") as ws:
        await next_frame(ws)
        await send(ws, {"action": "subscribe", "symbols": ["SOL"]})
        error = await next_frame(ws)
        assert error["code"] == "too_many_symbols" and "2" in error["message"]
        async with gw.connect("symbols=BTC,ETH,SOL") as refused:
            assert (await next_frame(refused))["code"] == "too_many_symbols"
            assert (await closed(refused))[0] == 1008


# --- alert events ----------------------------------------------------------------------------------


async def test_alert_events_reach_their_owner_only(gateway):
    ada_id, ada_token = await gateway.user("ada@example.com")
    bob_id, bob_token = await gateway.user("bob@example.com")
    async with (
        gateway.connect("symbols=BTC", additional_headers=bearer(ada_token)) as ada,
        gateway.connect("symbols=BTC", subprotocols=["bearer", bob_token]) as bob,
        gateway.connect("symbols=BTC") as anonymous,
    ):
        for ws, signed_in in ((ada, True), (bob, True), (anonymous, False)):
            assert (await next_frame(ws))["authenticated"] is signed_in
        assert bob.subprotocol == "bearer"

        event_id = await gateway.alert(ada_id)
        (frame,) = await frames_until(ada, of_type("alert.triggered"))
        assert frame == {
            "id": event_id, "type": "alert.triggered", "alert_id": frame["alert_id"], "user_id": ada_id,
            "symbol": "BTC", "vs": "USD", "condition": "above", "threshold": Decimal("100000.5"),
            "window_minutes": None, "value": Decimal("100001.25"), "previous": 99999, "price": Decimal("100001.25"),
            "price_at": "2026-11-25T09:59:59Z", "created_at": "2026-11-25T10:00:00Z",
        }  # fmt: skip
        await gateway.alert(str(uuid.uuid4()))  # somebody without a socket
        # The hub has handled Ada's event: anything it gave Bob or the anonymous socket precedes this price.
        marker = await gateway.price("BTC", "101")
        for ws in (ada, bob, anonymous):
            assert [f["type"] for f in await frames_until(ws, price_of(marker))] == ["price"]

        bob_event = await gateway.alert(bob_id)
        assert (await frames_until(bob, of_type("alert.triggered")))[0]["id"] == bob_event
        marker = await gateway.price("BTC", "102")
        for ws in (ada, anonymous):
            assert [f["type"] for f in await frames_until(ws, price_of(marker))] == ["price"]


async def test_an_anonymous_socket_can_sign_in_later(gateway):
    ada_id, ada_token = await gateway.user("ada@example.com")
    _, bob_token = await gateway.user("bob@example.com")
    async with gateway.connect("symbols=BTC") as ws:
        await next_frame(ws)
        await send(ws, {"action": "auth", "token": "not-a-token"})
        assert (await next_frame(ws))["code"] == "unauthorized"
        await send(ws, {"action": "auth", "token": ada_token})
        assert (await next_frame(ws))["type"] == "authenticated"
        event_id = await gateway.alert(ada_id)
        assert (await frames_until(ws, of_type("alert.triggered")))[0]["id"] == event_id
        await send(ws, {"action": "auth", "token": bob_token})
        assert (await next_frame(ws))["code"] == "forbidden"


# --- tokens ----------------------------------------------------------------------------------------


async def test_each_way_of_presenting_a_token(gateway):
    _, token = await gateway.user("ada@example.com")
    cookie = {"Cookie": f"{COOKIE_NAME}={token}"}
    for kwargs in (
        {"additional_headers": bearer(token)},
        {"subprotocols": ["bearer", token]},
        {"additional_headers": cookie, "origin": gateway.url},
    ):
        async with gateway.connect("", **kwargs) as ws:
            welcome = await next_frame(ws)
            assert welcome["authenticated"] is True and welcome["symbols"] == [], kwargs
            assert welcome["vs"] == "USD"


async def test_a_signed_in_socket_without_symbols_follows_the_watchlist(gateway):
    _, token = await gateway.user("ada@example.com")
    patched = await gateway.http.patch(
        "/api/v1/users/me", json={"watchlist": ["ETH", "SOL"], "vs_currency": "EUR"}, headers=bearer(token)
    )
    assert patched.status_code == 200, patched.text
    async with gateway.connect("", additional_headers=bearer(token)) as ws:
        assert await next_frame(ws) == {
            "type": "welcome", "symbols": ["ETH", "SOL"], "vs": "EUR", "authenticated": True, "heartbeat_seconds": 0.5
        }  # fmt: skip
        sol = await gateway.price("SOL", "150", "EUR")
        assert (await frames_until(ws, price_of(sol)))[-1]["vs"] == "EUR"


REFUSED = {
    "bad-bearer": ({"additional_headers": {"Authorization": "Bearer not-a-token"}}, 4401, "unauthorized"),
    "not-bearer": ({"additional_headers": {"Authorization": "Basic YWRhOnB3"}}, 4401, "unauthorized"),
    "bad-subprotocol": ({"subprotocols": ["bearer", "not-a-token"]}, 4401, "unauthorized"),
    "subprotocol-without-token": ({"subprotocols": ["bearer"]}, 4401, "unauthorized"),
    # A valid token in the cookie, sent from another site's page or by a client that names no origin.
    "cookie-foreign-origin": ({"origin": "https://evil.example"}, 4403, "forbidden"),
    "cookie-lookalike-origin": ({"origin": "http://127.0.0.1.evil.example"}, 4403, "forbidden"),
    "cookie-without-origin": ({}, 4403, "forbidden"),
}


@pytest.mark.parametrize(("kwargs", "close_code", "code"), list(REFUSED.values()), ids=list(REFUSED))
async def test_refused_credentials(gateway, kwargs, close_code, code):
    _, token = await gateway.user("ada@example.com")
    if close_code == 4403:
        kwargs = {**kwargs, "additional_headers": {"Cookie": f"{COOKIE_NAME}={token}"}}
    async with gateway.connect("symbols=BTC", **kwargs) as ws:
        error = await next_frame(ws)
        assert error["type"] == "error" and error["code"] == code
        received_code, reason = await closed(ws)
        assert received_code == close_code and reason


async def test_signing_out_closes_the_open_socket(gateway):
    _, token = await gateway.user("ada@example.com")
    async with gateway.connect("symbols=BTC", additional_headers=bearer(token)) as ws:
        await next_frame(ws)
        marker = await gateway.price("BTC", "1")
        await frames_until(ws, price_of(marker))
        assert (await gateway.http.post("/api/v1/auth/logout", headers=bearer(token))).status_code == 204
        code, reason = await closed(ws)
        assert code == 4401 and "revoked" in (reason or "")


async def test_an_expired_token_closes_the_socket(gateway):
    settings = gateway.settings
    now = int(time.time())
    claims = {
        "iss": settings.jwt_issuer, "aud": settings.jwt_audience, "sub": str(uuid.uuid4()), "iat": now,
        "exp": now + 3, "typ": "access", "role": "user", "jti": secrets.token_hex(16),
    }  # fmt: skip
    token = jwt.encode(claims, settings.jwt_secret_value(), algorithm="HS256")
    async with gateway.connect("symbols=BTC", additional_headers=bearer(token)) as ws:
        assert (await next_frame(ws))["authenticated"] is True
        code, reason = await closed(ws)
        assert code == 4401 and "expired" in (reason or "")


# --- bad input -------------------------------------------------------------------------------------


async def test_bad_messages_get_an_error_frame_and_the_socket_stays_open(gateway):
    async with gateway.connect("symbols=BTC") as ws:
        await next_frame(ws)
        for message in [
            "not json",
            "[1, 2]",
            '"ping"',
            "{}",
            json.dumps({"action": "fly"}),
            json.dumps({"action": "subscribe", "symbols": "BTC"}),
            json.dumps({"action": "subscribe", "symbols": []}),
            json.dumps({"action": "subscribe", "symbols": ["B$C"]}),
            json.dumps({"action": "subscribe", "symbols": [{"a": 1}]}),
            json.dumps({"action": "auth"}),
            json.dumps({"action": "ping", "pad": "x" * 5000}),
            b"\x00\x01binary",
            json.dumps({"action": "subscribe", "symbols": ["A" * 16]}),
        ]:
            await send(ws, message)
            error = await next_frame(ws)
            assert error["type"] == "error" and error["code"] in ("bad_message", "validation_error"), (message, error)
            assert error["message"]
        marker = await gateway.price("BTC", "42")
        assert (await frames_until(ws, price_of(marker)))[-1]["price"] == Decimal("42")


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("symbols=NOPE&vs=USD", "unknown_symbol"),
        ("symbols=BTC,NOPE", "unknown_symbol"),
        ("symbols=BTC&vs=XYZ", "unknown_currency"),
        ("symbols=BTC&vs=US-D", "validation_error"),
        ("vs=USD", "validation_error"),
        ("", "validation_error"),
        ("symbols=B$C", "validation_error"),
        ("symbols=BTC,,ETH", "validation_error"),
        ("symbols=" + ",".join(f"A{i}" for i in range(51)), "too_many_symbols"),
    ],
)
async def test_a_bad_query_is_answered_then_closed(gateway, query, code):
    async with gateway.connect(query) as ws:
        error = await next_frame(ws)
        assert error["type"] == "error" and error["code"] == code, error
        close_code, reason = await closed(ws)
        assert close_code == 1008 and reason


async def test_sockets_beyond_the_process_limit_are_refused(settings, db, redis):
    async with running(settings, db, redis, live_max_sockets=2) as gw, gw.connect() as one, gw.connect() as two:
        for ws in (one, two):
            assert (await next_frame(ws))["type"] == "welcome"
        async with gw.connect() as three:
            assert (await next_frame(three))["code"] == "server_full"
            assert (await closed(three))[0] == 1013
        marker = await gw.price("BTC", "7")
        for ws in (one, two):
            await frames_until(ws, price_of(marker))


async def test_unreadable_stream_entries_are_skipped(gateway, redis):
    prices = gateway.settings.key("stream", PRICES_STREAM)
    alerts = gateway.settings.key("stream", ALERT_EVENTS_STREAM)
    async with gateway.connect("symbols=BTC") as ws:
        await next_frame(ws)
        garbage: list[dict[Any, Any]] = [
            {"data": "not json"},
            {"other": "field"},
            {"data": "[1, 2]"},
            {"data": json.dumps({"base": "BTC"})},
            {"data": json.dumps({"base": 5, "vs": "USD", "price": "1"})},
            {"data": json.dumps(price_payload("BTC", "NaN", "USD", "x"))},
            {"data": json.dumps(price_payload("BTC", "abc", "USD", "y"))},
            {"data": json.dumps(price_payload("btc", "1", "USD", "z"))},
            {b"data": b"\xff\xfe"},
        ]
        for fields in garbage:
            await redis.xadd(prices, fields)
        for fields in ({"data": "{"}, {"data": json.dumps({"id": "no user"})}):
            await redis.xadd(alerts, fields)
        marker = await gateway.price("BTC", "5")
        assert [f["event_id"] for f in await frames_until(ws, price_of(marker))] == [marker]
        assert await gateway.metric("live_bad_entries_total", '{stream="prices"}') == len(garbage)
        assert await gateway.metric("live_bad_entries_total", '{stream="alert-events"}') == 2


# --- slow clients ----------------------------------------------------------------------------------


async def _never_reading(gw: Gateway, query: str, **kwargs: Any) -> Any:
    """A client that stops reading at once: a tiny receive buffer and a one-message queue, so what the server
    sends stays in the server's buffers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    port = int(gw.url.rsplit(":", 1)[1])
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return gw.connect(query, sock=sock, max_queue=1, ping_interval=None, compression=None, **kwargs)


@pytest.mark.parametrize("cause", ["send_timeout", "alert_queue"])
async def test_a_slow_client_is_disconnected_and_the_others_miss_nothing(settings, db, redis, cause):
    overrides: dict[str, Any] = (
        {"live_send_timeout_seconds": 0.5} if cause == "send_timeout" else {"live_queue_frames": 3}
    )
    async with running(settings, db, redis, live_heartbeat_seconds=30, **overrides) as gw:
        user_id, token = await gw.user("slow@example.com")
        async with (
            await _never_reading(gw, "symbols=" + ",".join(COINS), additional_headers=bearer(token)) as slow,
            gw.connect("symbols=BTC") as normal,
        ):
            await next_frame(normal)
            published: list[str] = []
            received: list[str] = []
            for step in range(4000):
                if step % 20 == 0 and await gw.metric("live_closed_total", '{code="4408"}'):
                    break
                batch = [(c, uuid.uuid4().hex) for c in COINS]
                await gw.publisher.publish_many(
                    PRICES_STREAM, [price_payload(c, f"{1000 + step}.5", "USD", e) for c, e in batch]
                )
                if cause == "alert_queue":
                    await gw.alert(user_id, pad="x" * 200)
                published.append(batch[0][1])
                received += [f["event_id"] for f in await frames_until(normal, price_of(batch[0][1]))]
            else:
                pytest.fail("the client that never reads was not disconnected")

            code, reason = await closed(slow)
            assert (code, reason) == (4408, "client too slow")
            assert await gw.metric("live_closed_total", '{code="4408"}') == 1
            for _ in range(5):
                published.append(await gw.price("BTC", "1"))
                received += [f["event_id"] for f in await frames_until(normal, price_of(published[-1]))]
            assert received == published


async def test_the_hub_runs_under_the_supervisor_and_reports_no_problem(gateway):
    async def running_without_problems() -> bool:
        body = (await gateway.http.get("/readyz")).json()
        details = (body.get("error") or {}).get("details") or {}
        tasks = {t["name"]: t["state"] for t in body.get("tasks") or details.get("tasks") or []}
        return tasks.get("live-hub") == "running" and "live-hub" not in (details.get("problems") or {})

    assert await eventually(running_without_problems)


async def test_the_hub_rides_out_a_redis_outage_and_open_sockets_stay_open(tmp_path, clean_db, namespace, db):
    own = EmbeddedRedis(tmp_path / "redis")
    own.start(preferred_port=free_port())
    direct: Redis | None = None
    try:
        settings = make_settings(clean_db, own.url(), namespace)
        direct = Redis.from_url(own.url())
        async with running(settings, db, direct) as gw, gw.connect("symbols=BTC") as ws:
            await next_frame(ws)
            before = await gw.price("BTC", "1")
            await frames_until(ws, price_of(before))

            port = own.port
            own.stop()
            await send(ws, {"action": "ping"})
            assert await next_frame(ws) == {"type": "pong"}, "the socket is served while Redis is away"

            async def redis_down() -> bool:
                checks = (await gw.http.get("/readyz")).json().get("error", {}).get("details", {})
                return str(checks.get("redis", "")).startswith("unavailable")

            await eventually(redis_down)
            own.start(preferred_port=port)
            assert own.port == port

            async def delivered() -> bool:
                # Published until one arrives: the hub may still be waiting out its backoff.
                marker = await gw.price("BTC", "2")
                with contextlib.suppress(TimeoutError):
                    return bool(await frames_until(ws, price_of(marker), timeout=1))
                return False

            await eventually(delivered, timeout=30)
    finally:
        if direct is not None:
            await direct.aclose()
        own.stop()


async def test_a_plain_http_request_to_the_socket_address_is_told_to_upgrade(gateway):
    response = await gateway.http.get("/api/v1/ws", params={"symbols": "BTC"})
    assert response.status_code == 426, response.text
    assert response.headers["upgrade"] == "websocket"
    assert response.json()["error"]["code"] == "upgrade_required"
