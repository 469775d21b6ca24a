"""Alert rules through the real gateway and alerting service (internal credentials enforced, as deployed):
CRUD, two-user isolation, every validation refusal, the webhook secret shown once, pause and resume, the
activity log (written by the gateway from the alerting service's messages), the change events, expiry."""

from __future__ import annotations

import base64
import json
import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest

from services.alerting.app import create_app as alerting_app
from services.alerting.service import AlertService
from services.gateway.app import create_app as gateway_app
from shared.service_app import redis_client
from shared.streams import StreamPublisher
from tests.accounts import bearer, register, tokens
from tests.conftest import eventually, serve_app

HOOK = "https://93.184.215.14/hooks/coinlytics"  # a public address literal: no DNS needed
SECRET = re.compile(r"^whsec_[A-Za-z0-9+/]+=*$")


def alert(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "symbol": "btc",
        "vs": "usd",
        "condition": "above",
        "threshold": 100000.5,
        "channels": [{"type": "webhook", "url": HOOK}],
    }
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not None}


async def _platform(settings, db, **overrides: Any) -> AsyncIterator[httpx.AsyncClient]:
    await db.execute("INSERT INTO coins (symbol, name, active) VALUES ('BTC', 'Bitcoin', true), ('ETH', 'Ether', true)")
    common = settings.model_copy(update={"internal_auth_required": True, **overrides})
    async with serve_app(alerting_app(common)) as alerting_url:
        gw = common.model_copy(update={"alerting_url": alerting_url})
        async with serve_app(gateway_app(gw)) as url, httpx.AsyncClient(base_url=url, timeout=20) as client:
            yield client


@pytest.fixture
async def platform(settings, db):
    async for client in _platform(settings, db):
        yield client


async def user(client: httpx.AsyncClient, email: str) -> dict[str, str]:
    await register(client, email)
    return bearer((await tokens(client, email))["access_token"])


async def changes(redis, settings) -> list[dict[str, Any]]:
    entries = await redis.xrange(settings.key("stream", "alert-changes"))
    return [json.loads(fields[b"data"]) for _, fields in entries]


async def activity_kinds(client: httpx.AsyncClient, headers: dict[str, str]) -> list[str]:
    response = await client.get("/api/v1/users/me/activity", headers=headers)
    assert response.status_code == 200, response.text
    return [item["kind"] for item in response.json()["items"]]


async def test_crud_round_trip_with_secret_shown_once_activity_and_change_events(platform, db, redis, settings):
    headers = await user(platform, "ada@example.com")
    created = await platform.post("/api/v1/alerts", json=alert(cooldown_seconds=60), headers=headers)
    assert created.status_code == 201, created.text
    body = created.json()
    alert_id = body["id"]
    assert (body["symbol"], body["vs"], body["condition"], body["status"]) == ("BTC", "USD", "above", "active")
    assert Decimal(str(body["threshold"])) == Decimal("100000.5")
    assert body["cooldown_seconds"] == 60 and body["one_shot"] is False and body["window_minutes"] is None
    secret = body["channels"][0]["secret"]
    assert SECRET.match(secret) and len(base64.b64decode(secret.removeprefix("whsec_"))) >= 24
    stored = await db.fetchrow("SELECT threshold, channels FROM alerts WHERE id = $1", uuid.UUID(alert_id))
    assert stored["threshold"] == Decimal("100000.5")
    assert json.loads(stored["channels"])[0]["secret"] == secret

    one = await platform.get(f"/api/v1/alerts/{alert_id}", headers=headers)
    assert one.status_code == 200
    assert one.json()["channels"] == [{"type": "webhook", "url": HOOK}]
    listed = (await platform.get("/api/v1/alerts", headers=headers)).json()
    assert listed["total"] == 1 and [a["id"] for a in listed["items"]] == [alert_id]
    assert "secret" not in json.dumps(listed)

    patched = await platform.patch(
        f"/api/v1/alerts/{alert_id}",
        json={"threshold": "95000", "condition": "below", "channels": [{"type": "webhook", "url": HOOK}]},
        headers=headers,
    )
    assert patched.status_code == 200, patched.text
    assert patched.json()["condition"] == "below" and Decimal(str(patched.json()["threshold"])) == 95000
    assert "secret" not in patched.json()["channels"][0], "the same endpoint keeps its secret, not shown again"
    moved = await platform.patch(
        f"/api/v1/alerts/{alert_id}",
        json={"channels": [{"type": "webhook", "url": HOOK + "/v2"}]},
        headers=headers,
    )
    new_secret = moved.json()["channels"][0]["secret"]
    assert SECRET.match(new_secret) and new_secret != secret

    paused = await platform.post(f"/api/v1/alerts/{alert_id}/pause", headers=headers)
    assert paused.status_code == 200 and paused.json()["status"] == "paused" and paused.json()["paused"] is True
    resumed = await platform.patch(f"/api/v1/alerts/{alert_id}", json={"paused": False}, headers=headers)
    assert resumed.json()["status"] == "active"
    again = await platform.post(f"/api/v1/alerts/{alert_id}/pause", headers=headers)
    assert again.json()["status"] == "paused"
    assert (await platform.post(f"/api/v1/alerts/{alert_id}/resume", headers=headers)).json()["status"] == "active"

    events = await platform.get(f"/api/v1/alerts/{alert_id}/events", headers=headers)
    assert events.status_code == 200 and events.json() == {"items": []}

    assert (await platform.delete(f"/api/v1/alerts/{alert_id}", headers=headers)).status_code == 204
    assert (await platform.get(f"/api/v1/alerts/{alert_id}", headers=headers)).status_code == 404
    assert await db.fetchval("SELECT count(*) FROM alerts") == 0

    expected = ["created", "updated", "updated", "paused", "resumed", "paused", "resumed", "deleted"]
    published = await changes(redis, settings)
    assert [c["action"] for c in published] == expected
    assert {c["id"] for c in published} == {alert_id}

    async def logged() -> list[str] | None:
        kinds = [k for k in await activity_kinds(platform, headers) if k.startswith("alert_")]
        return kinds if len(kinds) == len(expected) else None

    kinds = await eventually(logged)
    assert kinds == [f"alert_{action}" for action in reversed(expected)]
    rows = await db.fetch("SELECT details FROM user_activity WHERE kind LIKE 'alert_%' ORDER BY id")
    assert all(json.loads(r["details"])["alert_id"] == alert_id for r in rows)


async def test_activity_messages_are_recorded_once_by_message_id(platform, db, settings):
    headers = await user(platform, "once@example.com")
    assert (await platform.post("/api/v1/alerts", json=alert(), headers=headers)).status_code == 201
    await eventually(lambda: db.fetchval("SELECT count(*) FROM user_activity WHERE kind = 'alert_created'"))
    row = await db.fetchrow("SELECT user_id, details FROM user_activity WHERE kind = 'alert_created'")
    message_id = json.loads(row["details"])["message_id"]
    # The same message again (a redelivery, or a publish repeated after a timeout), then a marker message.
    redis = redis_client(settings.require_redis_url())
    try:
        publisher = StreamPublisher(redis, namespace=settings.redis_namespace, maxlen=1000)
        base = {"user_id": str(row["user_id"]), "at": datetime.now(UTC).isoformat(), "details": {}}
        await publisher.publish("user-activity", {**base, "id": message_id, "kind": "alert_created"})
        await publisher.publish("user-activity", {**base, "id": uuid.uuid4().hex, "kind": "alert_marker"})
    finally:
        await redis.aclose()
    await eventually(lambda: db.fetchval("SELECT count(*) FROM user_activity WHERE kind = 'alert_marker'"))
    assert await db.fetchval("SELECT count(*) FROM user_activity WHERE kind = 'alert_created'") == 1


async def test_another_users_alert_is_not_found_and_sign_in_is_required(platform):
    ada = await user(platform, "ada@example.com")
    bob = await user(platform, "bob@example.com")
    alert_id = (await platform.post("/api/v1/alerts", json=alert(), headers=ada)).json()["id"]
    for method, path, body in [
        ("GET", f"/api/v1/alerts/{alert_id}", None),
        ("PATCH", f"/api/v1/alerts/{alert_id}", {"threshold": 1}),
        ("DELETE", f"/api/v1/alerts/{alert_id}", None),
        ("POST", f"/api/v1/alerts/{alert_id}/pause", None),
        ("POST", f"/api/v1/alerts/{alert_id}/resume", None),
        ("GET", f"/api/v1/alerts/{alert_id}/events", None),
    ]:
        response = await platform.request(method, path, json=body, headers=bob)
        assert response.status_code == 404, (method, path, response.text)
        assert response.json()["error"]["code"] == "not_found"
        anonymous = await platform.request(method, path, json=body)
        assert anonymous.status_code == 401, (method, path, anonymous.text)
    assert (await platform.get("/api/v1/alerts", headers=bob)).json()["items"] == []
    assert (await platform.get("/api/v1/alerts")).status_code == 401
    assert (await platform.post("/api/v1/alerts", json=alert())).status_code == 401
    assert (await platform.get(f"/api/v1/alerts/{alert_id}", headers=ada)).json()["paused"] is False
    assert (await platform.get(f"/api/v1/alerts/{uuid.uuid4()}", headers=ada)).status_code == 404
    assert (await platform.get("/api/v1/alerts/not-a-uuid", headers=ada)).status_code == 422


FUTURE = (datetime.now(UTC) + timedelta(days=3)).isoformat()
REFUSED = [
    (alert(condition="pct_change_up", threshold=5), "window_minutes: Field required"),
    (alert(condition="pct_change_down", threshold=5, window_minutes=0), "window_minutes"),
    (alert(condition="pct_change_down", threshold=5, window_minutes=10081), "window_minutes"),
    (alert(window_minutes=60), "window_minutes applies only to pct_change_up and pct_change_down"),
    (alert(condition="spread_above", window_minutes=5), "window_minutes applies only"),
    (alert(condition="sideways"), "condition"),
    (alert(threshold=0), "threshold must be greater than 0"),
    (alert(threshold=-3), "threshold must be greater than 0"),
    (alert(threshold="abc"), "threshold must be a number"),
    (alert(threshold="NaN"), "threshold"),
    (alert(threshold=True), "threshold must be a number"),
    (alert(threshold=1e16), "threshold must be at most 1e15"),
    (alert(condition="spread_above", threshold=0), "threshold must be greater than 0"),
    (alert(channels=[]), "channels"),
    (alert(channels=[{"type": "webhook", "url": f"{HOOK}/{i}"} for i in range(6)]), "channels"),
    (alert(channels=[{"type": "webhook", "url": HOOK}, {"type": "webhook", "url": HOOK}]), "only once"),
    (alert(channels=[{"type": "webhook", "url": "ftp://example.com/x"}]), "url"),
    (alert(channels=[{"type": "pigeon", "to": "x"}]), "channels"),
    (
        alert(channels=[{"type": "email", "to": "ada@example.com"}]),
        "email channel is not configured (COINLYTICS_SMTP_URL)",
    ),
    (alert(channels=[{"type": "sms", "to": "+14155550100"}]), "sms channel is not configured (COINLYTICS_SMS_URL)"),
    (alert(cooldown_seconds=-1), "cooldown_seconds"),
    (alert(cooldown_seconds=604801), "cooldown_seconds"),
    (alert(cooldown_seconds="60"), "cooldown_seconds"),
    (alert(expires_at="2020-01-01T00:00:00Z"), "expires_at must be in the future"),
    (alert(expires_at="tomorrow"), "expires_at"),
    (alert(symbol="BTC$"), "symbol"),
    (alert(owner="someone-else"), "Extra inputs are not permitted"),
    (alert(one_shot="yes"), "one_shot"),
]
PRIVATE_HOOKS = [
    "http://127.0.0.1/hook",
    "http://10.0.0.1/hook",
    "http://192.168.1.20:8080/hook",
    "http://169.254.169.254/latest/meta-data",
    "http://100.64.0.1/hook",
    "http://[::1]/hook",
    "http://[fe80::1]/hook",
    "http://[::ffff:127.0.0.1]/hook",
    "http://2130706433/hook",
    "http://0x7f000001/hook",
    "http://0/hook",
    "https://localhost:8443/hook",
]


@pytest.mark.parametrize(("body", "reason"), REFUSED)
async def test_bad_alerts_are_refused_with_422_and_the_reason(platform, db, body, reason):
    headers = await user(platform, "ada@example.com")
    response = await platform.post("/api/v1/alerts", json=body, headers=headers)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "validation_error"
    assert reason in error["message"], error
    assert await db.fetchval("SELECT count(*) FROM alerts") == 0


async def test_private_webhook_targets_are_refused(platform, db):
    headers = await user(platform, "ada@example.com")
    for url in PRIVATE_HOOKS:
        response = await platform.post(
            "/api/v1/alerts", json=alert(channels=[{"type": "webhook", "url": url}]), headers=headers
        )
        assert response.status_code == 422, (url, response.text)
        assert "webhooks must target a public address" in response.json()["error"]["message"], url
    assert await db.fetchval("SELECT count(*) FROM alerts") == 0


async def test_unknown_coin_and_currency_are_404(platform):
    headers = await user(platform, "ada@example.com")
    coin = await platform.post("/api/v1/alerts", json=alert(symbol="ZZZ"), headers=headers)
    assert coin.status_code == 404 and coin.json()["error"]["code"] == "unknown_symbol", coin.text
    currency = await platform.post("/api/v1/alerts", json=alert(vs="XYZ"), headers=headers)
    assert currency.status_code == 404 and currency.json()["error"]["code"] == "unknown_currency", currency.text


async def test_patch_checks_the_resulting_alert(platform, db):
    headers = await user(platform, "ada@example.com")
    alert_id = (await platform.post("/api/v1/alerts", json=alert(), headers=headers)).json()["id"]
    for body, reason in [
        ({"condition": "pct_change_up"}, "window_minutes (1 to 10080) is required for pct_change_up"),
        ({"window_minutes": 30}, "window_minutes applies only"),
        ({"expires_at": "2020-01-01T00:00:00Z"}, "expires_at must be in the future"),
        ({"channels": [{"type": "webhook", "url": "http://10.1.2.3/x"}]}, "public address"),
        ({"channels": [{"type": "email", "to": "ada@example.com"}]}, "email channel is not configured"),
        ({"threshold": 0}, "threshold must be greater than 0"),
        ({"symbol": "DOGE"}, "unknown coin"),
    ]:
        response = await platform.patch(f"/api/v1/alerts/{alert_id}", json=body, headers=headers)
        assert response.status_code in (404, 422), (body, response.text)
        assert reason in response.json()["error"]["message"], (body, response.json())
    unchanged = (await platform.get(f"/api/v1/alerts/{alert_id}", headers=headers)).json()
    assert unchanged["condition"] == "above" and unchanged["channels"] == [{"type": "webhook", "url": HOOK}]
    pct = await platform.patch(
        f"/api/v1/alerts/{alert_id}", json={"condition": "pct_change_up", "window_minutes": 15}, headers=headers
    )
    assert pct.status_code == 200 and pct.json()["window_minutes"] == 15
    back = await platform.patch(f"/api/v1/alerts/{alert_id}", json={"condition": "above"}, headers=headers)
    assert back.status_code == 200 and back.json()["window_minutes"] is None


async def test_configured_channels_and_private_targets_when_allowed(settings, db):
    allowed = {"smtp_url": "smtp://127.0.0.1:2525", "sms_url": "http://127.0.0.1:9/sms", "webhook_allow_private": True}
    async for client in _platform(settings, db, **allowed):
        headers = await user(client, "ada@example.com")
        channels = [
            {"type": "email", "to": "Ada@Example.com"},
            {"type": "sms", "to": "+14155550100"},
            {"type": "webhook", "url": "http://127.0.0.1:8080/hook"},
        ]
        body = alert(condition="pct_change_up", threshold="2.5", window_minutes=60, channels=channels, one_shot=True)
        created = await client.post("/api/v1/alerts", json=body, headers=headers)
        assert created.status_code == 201, created.text
        out = created.json()["channels"]
        assert out[0] == {"type": "email", "to": "ada@example.com"}
        assert out[1] == {"type": "sms", "to": "+14155550100"}
        assert SECRET.match(out[2]["secret"])
        assert created.json()["window_minutes"] == 60 and created.json()["one_shot"] is True
        bad_number = alert(channels=[{"type": "sms", "to": "4155550100"}])
        assert (await client.post("/api/v1/alerts", json=bad_number, headers=headers)).status_code == 422


async def test_alerts_per_user_are_limited(settings, db):
    async for client in _platform(settings, db, alerts_max_per_user=2):
        ada = await user(client, "ada@example.com")
        bob = await user(client, "bob@example.com")
        for _ in range(2):
            assert (await client.post("/api/v1/alerts", json=alert(), headers=ada)).status_code == 201
        third = await client.post("/api/v1/alerts", json=alert(), headers=ada)
        assert third.status_code == 422
        assert "COINLYTICS_ALERTS_MAX_PER_USER" in third.json()["error"]["message"]
        assert (await client.post("/api/v1/alerts", json=alert(), headers=bob)).status_code == 201
        page = (await client.get("/api/v1/alerts?per_page=1&page=2", headers=ada)).json()
        assert page["total"] == 2 and len(page["items"]) == 1


async def test_expiry_key_expired_status_and_cleanup(platform, db, redis, settings, sessions):
    headers = await user(platform, "ada@example.com")
    expires = datetime.now(UTC) + timedelta(hours=1)
    created = await platform.post("/api/v1/alerts", json=alert(expires_at=expires.isoformat()), headers=headers)
    assert created.status_code == 201, created.text
    alert_id = created.json()["id"]
    assert datetime.fromisoformat(created.json()["expires_at"].replace("Z", "+00:00")) == expires
    key = settings.key("alert", "expiry", alert_id)
    assert 0 < await redis.ttl(key) <= 3600
    unix = await platform.post(
        "/api/v1/alerts", json=alert(expires_at=int(expires.timestamp()), symbol="ETH"), headers=headers
    )
    assert unix.status_code == 201, unix.text
    assert (await platform.patch(f"/api/v1/alerts/{alert_id}", json={"expires_at": None}, headers=headers)).json()[
        "expires_at"
    ] is None
    assert await redis.exists(key) == 0
    assert (
        await platform.patch(f"/api/v1/alerts/{alert_id}", json={"expires_at": FUTURE}, headers=headers)
    ).status_code == 200
    assert await redis.ttl(key) > 3600

    # Time passes: one expired a minute ago (kept, listed as expired), the other two days ago (cleaned up).
    await db.execute("UPDATE alerts SET expires_at = now() - interval '1 minute' WHERE id = $1", uuid.UUID(alert_id))
    await db.execute("UPDATE alerts SET expires_at = now() - interval '2 days' WHERE symbol = 'ETH'")
    assert (await platform.get(f"/api/v1/alerts/{alert_id}", headers=headers)).json()["status"] == "expired"
    listed = (await platform.get("/api/v1/alerts", headers=headers)).json()["items"]
    assert {a["status"] for a in listed} == {"expired"}

    redis_conn = redis_client(settings.require_redis_url())
    try:
        publisher = StreamPublisher(redis_conn, namespace=settings.redis_namespace, maxlen=1000)
        service = AlertService(settings, sessions, redis_conn, publisher)
        assert await service.delete_expired() == 1
        assert await service.delete_expired() == 0
    finally:
        await redis_conn.aclose()
    remaining = (await platform.get("/api/v1/alerts", headers=headers)).json()["items"]
    assert [a["id"] for a in remaining] == [alert_id]
    assert (await changes(redis, settings))[-1]["action"] == "deleted"


async def test_spec_offers_the_configured_channels_with_examples(settings, db):
    async for client in _platform(settings, db):
        spec = (await client.get("/openapi.json")).json()
        schemas = spec["components"]["schemas"]
        assert "WebhookChannel" in schemas and "EmailChannel" not in schemas and "SmsChannel" not in schemas
        assert "EmailChannel" not in json.dumps(spec)
        post = spec["paths"]["/api/v1/alerts"]["post"]
        assert set(post["requestBody"]["content"]["application/json"]["examples"]) == {"above", "pct"}
        assert {"get", "patch", "delete"} <= set(spec["paths"]["/api/v1/alerts/{alert_id}"])
        assert "post" in spec["paths"]["/api/v1/alerts/{alert_id}/pause"]
        assert "get" in spec["paths"]["/api/v1/alerts/{alert_id}/events"]
    await db.execute("TRUNCATE coins CASCADE")
    async for client in _platform(settings, db, smtp_url="smtp://127.0.0.1:2525", sms_url="http://127.0.0.1:9/sms"):
        schemas = (await client.get("/openapi.json")).json()["components"]["schemas"]
        assert {"WebhookChannel", "EmailChannel", "SmsChannel"} <= set(schemas)


async def test_a_path_with_a_backslash_reaches_the_service_signed(platform):
    # The gateway signs the path as the service reads it: "%5C" is a bad id (422), not a forged credential (401).
    headers = await user(platform, "ada@example.com")
    response = await platform.get("/api/v1/alerts/%5C", headers=headers)
    assert response.status_code == 422, response.text
