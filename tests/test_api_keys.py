"""Personal API keys: shown once and kept only as a hash, refused at once when revoked (on every gateway
replica) or expired, acting as their owner and nobody else, never opening an admin route, accepted as
X-API-Key everywhere and under CoinGecko's names on /api/v3 only, counted toward the owner's rate limit,
with their use in the key list and the owner's activity log."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from services.alerting.app import create_app as alerting_app
from services.gateway.app import create_app as gateway_app
from tests.accounts import bearer, register, tokens
from tests.conftest import eventually, free_port, serve_app
from tests.test_alerts import alert

MAX_KEYS = 3


@dataclass
class Platform:
    one: httpx.AsyncClient  # a gateway replica
    two: httpx.AsyncClient  # another replica of the same gateway


@pytest.fixture
async def platform(settings: Any, db: Any) -> AsyncIterator[Platform]:
    await db.execute("INSERT INTO coins (symbol, name, active) VALUES ('BTC', 'Bitcoin', true)")
    common = settings.model_copy(update={"internal_auth_required": True, "api_keys_max_per_user": MAX_KEYS})
    async with serve_app(alerting_app(common)) as alerting_url:
        gw = common.model_copy(update={"alerting_url": alerting_url})
        async with (
            serve_app(gateway_app(gw)) as one_url,
            serve_app(gateway_app(gw)) as two_url,
            httpx.AsyncClient(base_url=one_url, timeout=20) as one,
            httpx.AsyncClient(base_url=two_url, timeout=20) as two,
        ):
            yield Platform(one, two)


async def user(client: httpx.AsyncClient, email: str) -> dict[str, str]:
    await register(client, email)
    return bearer((await tokens(client, email))["access_token"])


async def new_key(
    client: httpx.AsyncClient, headers: dict[str, str], name: str = "script", **body: Any
) -> dict[str, Any]:
    created = await client.post("/api/v1/users/me/api-keys", json={"name": name, **body}, headers=headers)
    assert created.status_code == 201, created.text
    answer: dict[str, Any] = created.json()
    return answer


def api_key(secret: str) -> dict[str, str]:
    return {"X-API-Key": secret}


async def listed(client: httpx.AsyncClient, headers: dict[str, str]) -> list[dict[str, Any]]:
    response = await client.get("/api/v1/users/me/api-keys", headers=headers)
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


async def test_key_is_shown_once_and_only_its_hash_is_stored(platform: Platform, db: Any) -> None:
    ada = await user(platform.one, "ada@example.com")
    created = await new_key(platform.one, ada, "portfolio script")
    secret = created["key"]
    assert secret.startswith("cl_live_") and len(secret) >= 8 + 43
    assert created["name"] == "portfolio script" and created["expires_at"] is None
    assert created["prefix"] == secret[:12] and created["last_used_at"] is None
    # The list never shows the secret again.
    items = await listed(platform.one, ada)
    assert [item["id"] for item in items] == [created["id"]]
    assert "key" not in items[0] and secret not in str(items)
    # At rest: the SHA-256 of the secret and the prefix, nothing from which the secret could be read.
    row = await db.fetchrow("SELECT * FROM api_keys")
    assert row["key_hash"] == hashlib.sha256(secret.encode()).hexdigest()
    assert row["prefix"] == secret[:12]
    assert all(secret not in str(value) for value in row.values())
    logged = await db.fetch("SELECT details::text AS d FROM user_activity WHERE details IS NOT NULL")
    assert logged and all(secret not in r["d"] for r in logged)
    # The key works, and a second key is another secret.
    assert (await platform.one.get("/api/v1/users/me", headers=api_key(secret))).json()["email"] == "ada@example.com"
    assert (await new_key(platform.one, ada, "other"))["key"] != secret


async def test_revoked_key_is_refused_at_once_by_every_replica(platform: Platform) -> None:
    ada = await user(platform.one, "ada@example.com")
    created = await new_key(platform.one, ada)
    for _ in range(3):  # the other replica has served this key
        assert (await platform.two.get("/api/v1/alerts", headers=api_key(created["key"]))).status_code == 200
    assert (await platform.one.delete(f"/api/v1/users/me/api-keys/{created['id']}", headers=ada)).status_code == 204
    refused = await platform.two.get("/api/v1/alerts", headers=api_key(created["key"]))
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "unauthorized"
    compat = await platform.two.get("/api/v3/ping", headers={"x-cg-demo-api-key": created["key"]})
    assert compat.status_code == 401 and compat.json()["status"]["error_code"] == 401
    assert await listed(platform.one, ada) == []
    activity = (await platform.one.get("/api/v1/users/me/activity", headers=ada)).json()["items"]
    revoked = [a for a in activity if a["kind"] == "api_key_revoked"]
    assert len(revoked) == 1 and revoked[0]["details"]["key_id"] == created["id"]
    # Revoking twice, or an unknown id: 404.
    assert (await platform.one.delete(f"/api/v1/users/me/api-keys/{created['id']}", headers=ada)).status_code == 404


async def test_expired_key_is_refused_and_expiry_must_be_in_the_future(platform: Platform, db: Any) -> None:
    ada = await user(platform.one, "ada@example.com")
    later = (datetime.now(UTC) + timedelta(days=30)).isoformat()
    assert datetime.fromisoformat((await new_key(platform.one, ada, expires_at=later))["expires_at"]) == (
        datetime.fromisoformat(later)
    )
    soon = datetime.now(UTC) + timedelta(seconds=2)
    created = await new_key(platform.one, ada, expires_at=soon.isoformat())
    # Used (and so remembered) by both replicas before it expires...
    for replica in (platform.one, platform.two):
        assert (await replica.get("/api/v1/users/me", headers=api_key(created["key"]))).status_code == 200
    while datetime.now(UTC) <= soon:
        await asyncio.sleep(0.2)
    # ...and refused by both after.
    for replica in (platform.one, platform.two):
        assert (await replica.get("/api/v1/users/me", headers=api_key(created["key"]))).status_code == 401
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    for expires_at in (past, "2030-01-01T00:00:00", "soon", 12):
        response = await platform.one.post(
            "/api/v1/users/me/api-keys", json={"name": "x", "expires_at": expires_at}, headers=ada
        )
        assert response.status_code == 422, (expires_at, response.text)


async def test_a_key_acts_as_its_owner_only(platform: Platform) -> None:
    ada = await user(platform.one, "ada@example.com")
    bob = await user(platform.one, "bob@example.com")
    ada_key = api_key((await new_key(platform.one, ada))["key"])
    bobs_alert = (await platform.one.post("/api/v1/alerts", json=alert(), headers=bob)).json()["id"]
    # Ada's key creates and reads Ada's alerts...
    mine = await platform.one.post("/api/v1/alerts", json=alert(threshold=5), headers=ada_key)
    assert mine.status_code == 201, mine.text
    assert [a["id"] for a in (await platform.one.get("/api/v1/alerts", headers=ada_key)).json()["items"]] == [
        mine.json()["id"]
    ]
    # ...and nothing of Bob's.
    assert (await platform.one.get(f"/api/v1/alerts/{bobs_alert}", headers=ada_key)).status_code == 404
    assert (await platform.one.delete(f"/api/v1/alerts/{bobs_alert}", headers=ada_key)).status_code == 404
    assert (await platform.one.get(f"/api/v1/alerts/{bobs_alert}", headers=bob)).status_code == 200
    # Bob can't revoke or see Ada's key: 404 and an empty list.
    ada_keys = await listed(platform.one, ada)
    assert (await platform.one.delete(f"/api/v1/users/me/api-keys/{ada_keys[0]['id']}", headers=bob)).status_code == 404
    assert await listed(platform.one, bob) == []
    assert (await platform.one.get("/api/v1/alerts", headers=ada_key)).status_code == 200


async def test_a_key_never_opens_an_admin_route_even_an_administrators(platform: Platform, db: Any) -> None:
    await register(platform.one, "root@example.com")
    await db.execute("UPDATE users SET role = 'admin' WHERE email = 'root@example.com'")
    root = bearer((await tokens(platform.one, "root@example.com"))["access_token"])
    assert (await platform.one.get("/api/v1/admin/users", headers=root)).status_code == 200
    key = api_key((await new_key(platform.one, root))["key"])
    assert (await platform.one.get("/api/v1/users/me", headers=key)).json()["role"] == "admin"
    own = await platform.one.get("/api/v1/admin/users", headers=key)
    assert own.status_code == 403 and "API key" in own.json()["error"]["message"]
    # The admin routes of the services behind the gateway too, before anything is forwarded.
    for path in ("/api/v1/admin/sources", "/api/v1/admin/coins", "/api/v1/admin/anything"):
        assert (await platform.one.get(path, headers=key)).status_code == 403, path
    # A key doesn't manage keys either: a leaked one can't mint fresh ones.
    assert (await platform.one.post("/api/v1/users/me/api-keys", json={"name": "x"}, headers=key)).status_code == 403
    assert (await platform.one.get("/api/v1/users/me/api-keys", headers=key)).status_code == 403


async def test_where_a_key_is_read_and_what_a_wrong_one_gets(platform: Platform) -> None:
    ada = await user(platform.one, "ada@example.com")
    secret = (await new_key(platform.one, ada))["key"]
    # /api/v1: the X-API-Key header only.
    assert (await platform.one.get("/api/v1/users/me", headers=api_key(secret))).status_code == 200
    for name in ("x_cg_demo_api_key", "x_cg_pro_api_key"):
        assert (await platform.one.get("/api/v1/users/me", params={name: secret})).status_code == 401, name
    assert (await platform.one.get("/api/v1/users/me", headers={"x-cg-demo-api-key": secret})).status_code == 401
    # /api/v3: X-API-Key, CoinGecko's headers and its query parameters; a wrong key is read (and refused).
    for name in ("X-API-Key", "x-cg-demo-api-key", "x-cg-pro-api-key"):
        assert (await platform.one.get("/api/v3/ping", headers={name: secret})).status_code == 200, name
        wrong = await platform.one.get("/api/v3/ping", headers={name: secret[:-2] + "xx"})
        assert wrong.status_code == 401, name
        assert wrong.json() == {"status": {"error_code": 401, "error_message": "invalid, expired or revoked API key"}}
    for name in ("x_cg_demo_api_key", "x_cg_pro_api_key"):
        assert (await platform.one.get("/api/v3/ping", params={name: secret})).status_code == 200, name
        assert (await platform.one.get("/api/v3/ping", params={name: "cl_live_nope"})).status_code == 401, name
    # Anything else: the error model's 401, whatever the key looks like; an empty one is no key.
    for bad in ("cl_live_unknown", "not-a-key", "cl_live_" + "a" * 300):
        response = await platform.one.get("/api/v1/alerts", headers=api_key(bad))
        assert response.status_code == 401, bad
        assert response.json()["error"]["code"] == "unauthorized"
    assert (await platform.one.get("/api/v3/ping", headers=api_key(""))).status_code == 200


async def test_limits_on_count_and_name(platform: Platform) -> None:
    ada = await user(platform.one, "ada@example.com")
    keys = [await new_key(platform.one, ada, f"k{i}") for i in range(MAX_KEYS - 1)]
    keys.append(await new_key(platform.one, ada, "  padded  "))
    assert keys[-1]["name"] == "padded"
    over = await platform.one.post("/api/v1/users/me/api-keys", json={"name": "one more"}, headers=ada)
    assert over.status_code == 409 and over.json()["error"]["details"] == {"limit": MAX_KEYS}
    assert (await platform.one.delete(f"/api/v1/users/me/api-keys/{keys[0]['id']}", headers=ada)).status_code == 204
    await new_key(platform.one, ada, "in its place")
    for body in (
        {"name": ""},
        {"name": "   "},
        {"name": "x" * 101},
        {"name": "a\nb"},
        {},
        {"name": "x", "role": "admin"},
    ):
        response = await platform.one.post("/api/v1/users/me/api-keys", json=body, headers=ada)
        assert response.status_code == 422, (body, response.text)
    assert (await platform.one.post("/api/v1/users/me/api-keys", json={"name": "anon"})).status_code == 401


async def test_use_is_recorded_rate_limited_as_the_owner_and_in_the_activity_log(settings: Any, db: Any) -> None:
    strict = settings.model_copy(update={"rate_limit_user": 4, "rate_limit_anonymous": 1000})
    async with serve_app(gateway_app(strict)) as url, httpx.AsyncClient(base_url=url, timeout=20) as client:
        ada = await user(client, "ada@example.com")
        created = await new_key(client, ada)  # the token's request: one of the account's four
        key = api_key(created["key"])

        async def used() -> bool:
            return (await db.fetchval("SELECT last_used_at FROM api_keys")) is not None

        assert (await client.get("/api/v3/ping", headers=key)).status_code == 200
        await eventually(used)
        listed_keys = (await client.get("/api/v1/users/me/api-keys", headers=ada)).json()["items"]  # third
        assert listed_keys[0]["last_used_at"] is not None
        assert (await client.get("/api/v3/ping", headers=key)).status_code == 200  # fourth
        # The budget is the account's: the key and the account's token are refused alike now.
        limited = await client.get("/api/v3/ping", headers=key)
        assert limited.status_code == 429 and limited.json()["status"]["error_code"] == 429
        assert (await client.get("/api/v1/users/me", headers=key)).status_code == 429
        assert (await client.get("/api/v1/users/me", headers=ada)).status_code == 429
        # Without a key, the address's own budget still serves.
        assert (await client.get("/api/v3/ping")).status_code == 200
    rows = await db.fetch("SELECT kind, details FROM user_activity ORDER BY id")
    kinds = [r["kind"] for r in rows]
    assert "api_key_created" in kinds and "api_key_first_used" in kinds
    first_use = next(r for r in rows if r["kind"] == "api_key_first_used")
    assert created["id"] in first_use["details"] and created["prefix"] in first_use["details"]
    # Used again within the minute: written once.
    assert kinds.count("api_key_first_used") == 1


async def test_a_disabled_accounts_keys_are_refused_at_once_by_every_replica(platform: Platform, db: Any) -> None:
    await register(platform.one, "root@example.com")
    await db.execute("UPDATE users SET role = 'admin' WHERE email = 'root@example.com'")
    root = bearer((await tokens(platform.one, "root@example.com"))["access_token"])
    ada = await user(platform.one, "ada@example.com")
    key = api_key((await new_key(platform.one, ada))["key"])
    for replica in (platform.one, platform.two):
        assert (await replica.get("/api/v1/alerts", headers=key)).status_code == 200
    ada_id = (await platform.one.get("/api/v1/users/me", headers=ada)).json()["id"]
    disabled = await platform.one.patch(f"/api/v1/admin/users/{ada_id}", json={"is_active": False}, headers=root)
    assert disabled.status_code == 200, disabled.text
    for replica in (platform.two, platform.one):
        assert (await replica.get("/api/v1/alerts", headers=key)).status_code == 401


async def test_a_key_cannot_sign_out_and_is_never_passed_on_to_the_services(settings: Any, db: Any) -> None:
    from aiohttp import web

    seen: list[dict[str, str]] = []

    async def upstream(request: web.Request) -> web.Response:
        seen.append({k.lower(): v for k, v in request.headers.items()})
        return web.json_response({"items": []})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", upstream)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        gw = settings.model_copy(update={"alerting_url": f"http://127.0.0.1:{port}"})
        async with serve_app(gateway_app(gw)) as url, httpx.AsyncClient(base_url=url, timeout=20) as client:
            ada = await user(client, "ada@example.com")
            secret = (await new_key(client, ada))["key"]
            sent = {"X-API-Key": secret, "x-cg-demo-api-key": secret, "x-cg-pro-api-key": secret}
            assert (await client.get("/api/v1/alerts", headers=sent)).status_code == 200
            # Signing out with a key would end no session and leave the key working: refused, not a 204.
            out = await client.post("/api/v1/auth/logout", headers=api_key(secret))
            assert out.status_code == 403, out.text
            assert (await client.get("/api/v1/users/me", headers=api_key(secret))).status_code == 200
    finally:
        await runner.cleanup()
    assert len(seen) == 1
    assert not [v for v in seen[0].values() if secret in v], seen[0]


async def test_guessing_keys_meets_the_address_rate_limit(settings: Any, db: Any) -> None:
    limited = settings.model_copy(update={"rate_limit_anonymous": 5, "rate_limit_window_seconds": 60})
    async with serve_app(gateway_app(limited)) as url, httpx.AsyncClient(base_url=url, timeout=20) as client:
        codes = [
            (await client.get("/api/v1/users/me", headers=api_key(f"cl_live_guess{n}"))).status_code for n in range(8)
        ]
    # Each wrong key is a lookup: counted like anonymous traffic, so the run of 401s ends in 429s.
    assert codes[:5] == [401] * 5 and set(codes[5:]) == {429}, codes
