"""Account flows through the real gateway and alerting service: registration (welcome email over real SMTP),
sign-in, refresh rotation with reuse detection, logout, password reset by email, profile, activity, throttling,
rehashing, and the create-admin command."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from datetime import timedelta
from urllib.parse import urlsplit

import httpx
import pytest
from argon2 import PasswordHasher

from services.alerting.app import create_app as alerting_app
from services.gateway.app import create_app as gateway_app
from tests.accounts import PASSWORD, bearer, login, register, reset_link, settle, tokens
from tests.conftest import ROOT, eventually, free_port, serve_app

NEW_PASSWORD = "an entirely different passphrase"


@pytest.fixture
async def platform(settings, smtp):
    """Gateway and alerting (the email sender); the gateway's public URL is where it really listens."""
    port = free_port()
    # The test client stands in for a trusted proxy, so X-Forwarded-For picks the client address.
    common = settings.model_copy(
        update={"smtp_url": smtp.url, "public_url": f"http://127.0.0.1:{port}", "trusted_proxies": ["127.0.0.1"]}
    )
    async with (
        serve_app(alerting_app(common)),
        serve_app(gateway_app(common), port=port) as url,
        httpx.AsyncClient(base_url=url, timeout=20) as client,
    ):
        yield client


async def test_register_sends_welcome_email_and_stores_an_argon2id_hash(platform, smtp, db):
    body = await register(platform, "Ada@Example.com")
    assert body["email"] == "ada@example.com"
    assert body["role"] == "user"
    assert "password" not in str(body)
    welcome = await smtp.wait_for("ada@example.com", "Welcome")
    assert "ada@example.com" in welcome.get_body().get_content()
    stored = await db.fetchval("SELECT password_hash FROM users WHERE email = 'ada@example.com'")
    assert stored.startswith("$argon2id$")
    assert "m=19456,t=2,p=1" in stored
    again = await platform.post("/api/v1/auth/register", json={"email": "ADA@example.com", "password": PASSWORD})
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "conflict"


@pytest.mark.parametrize(
    "body",
    [
        {"email": "eve@example.com", "password": PASSWORD, "role": "admin"},
        {"email": "eve@example.com", "password": "short"},
        {"email": "not-an-address", "password": PASSWORD},
        {"email": "eve@example.com"},
    ],
)
async def test_register_refuses_bad_or_privileged_bodies(platform, db, body):
    response = await platform.post("/api/v1/auth/register", json=body)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "validation_error"
    assert await db.fetchval("SELECT count(*) FROM users") == 0


async def test_login_answers_unknown_account_and_wrong_password_identically(platform):
    await register(platform, "bob@example.com")
    good = await login(platform, "bob@example.com")
    assert good.status_code == 200
    pair = good.json()
    assert pair["token_type"] == "bearer"
    assert pair["expires_in"] == 15 * 60
    assert good.headers["cache-control"] == "no-store"
    wrong = await login(platform, "bob@example.com", "not the password at all")
    unknown = await login(platform, "nobody@example.com", "not the password at all")
    malformed = await login(platform, "not an email", "not the password at all")
    assert wrong.status_code == unknown.status_code == malformed.status_code == 401
    assert wrong.json() == unknown.json() == malformed.json()
    assert wrong.headers["www-authenticate"] == unknown.headers["www-authenticate"] == "Bearer"
    me = await platform.get("/api/v1/users/me", headers=bearer(pair["access_token"]))
    assert me.status_code == 200
    assert me.json()["email"] == "bob@example.com"


async def test_refresh_rotates_and_reuse_revokes_the_whole_family(platform, db):
    await register(platform, "carol@example.com")
    first = await tokens(platform, "carol@example.com")
    second_response = await platform.post("/api/v1/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert second_response.status_code == 200
    second = second_response.json()
    assert second["refresh_token"] != first["refresh_token"]
    assert (await platform.get("/api/v1/users/me", headers=bearer(second["access_token"]))).status_code == 200

    # A separate sign-in (another family) must survive the reuse below.
    other = await tokens(platform, "carol@example.com")

    replay = await platform.post("/api/v1/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert replay.status_code == 401
    # The thief's replay ended the legitimate holder's chain too: the rotated token and its access token.
    stolen_chain = await platform.post("/api/v1/auth/refresh", json={"refresh_token": second["refresh_token"]})
    assert stolen_chain.status_code == 401
    assert (await platform.get("/api/v1/users/me", headers=bearer(second["access_token"]))).status_code == 401
    assert (await platform.get("/api/v1/users/me", headers=bearer(other["access_token"]))).status_code == 200
    live = await db.fetchval(
        "SELECT count(*) FROM refresh_tokens WHERE revoked_at IS NULL AND used_at IS NULL AND family_id = "
        "(SELECT family_id FROM refresh_tokens WHERE used_at IS NOT NULL LIMIT 1)"
    )
    assert live == 0
    await settle()
    kinds = await db.fetch("SELECT kind FROM user_activity")
    assert "refresh_reuse_detected" in {r["kind"] for r in kinds}


async def test_refresh_refuses_an_access_token_and_garbage(platform):
    await register(platform, "dan@example.com")
    pair = await tokens(platform, "dan@example.com")
    for candidate in (pair["access_token"], "garbage", pair["refresh_token"] + "x"):
        response = await platform.post("/api/v1/auth/refresh", json={"refresh_token": candidate})
        assert response.status_code == 401, candidate


async def test_logout_revokes_the_access_token_and_its_refresh_family(platform, redis, settings):
    await register(platform, "erin@example.com")
    pair = await tokens(platform, "erin@example.com")
    headers = bearer(pair["access_token"])
    assert (await platform.get("/api/v1/users/me", headers=headers)).status_code == 200
    out = await platform.post("/api/v1/auth/logout", headers=headers)
    assert out.status_code == 204
    after = await platform.get("/api/v1/users/me", headers=headers)
    assert after.status_code == 401
    assert after.json()["error"]["code"] == "unauthorized"
    # Forwarded routes are checked at the same door, before any service is asked.
    assert (await platform.get("/api/v1/prices?symbols=BTC", headers=headers)).status_code == 401
    assert (
        await platform.post("/api/v1/auth/refresh", json={"refresh_token": pair["refresh_token"]})
    ).status_code == 401
    denied = [key async for key in redis.scan_iter(match=f"{settings.redis_namespace}:auth:deny:jti:*")]
    assert len(denied) == 1
    assert 0 < await redis.ttl(denied[0]) <= 15 * 60 + 1
    assert (await platform.post("/api/v1/auth/logout")).status_code == 401


async def test_password_reset_by_email_link(platform, smtp, db):
    await register(platform, "fay@example.com")
    old = await tokens(platform, "fay@example.com")
    # A key minted before the reset (perhaps by whoever had the account): used once, so the gateway remembers it.
    made = await platform.post(
        "/api/v1/users/me/api-keys", json={"name": "script"}, headers=bearer(old["access_token"])
    )
    assert made.status_code == 201, made.text
    minted = {"X-API-Key": made.json()["key"]}
    assert (await platform.get("/api/v1/users/me", headers=minted)).status_code == 200
    # A forged Host header must not end up in the link.
    asked = await platform.post(
        "/api/v1/auth/password-reset", json={"email": "FAY@example.com"}, headers={"Host": "evil.example"}
    )
    nobody = await platform.post("/api/v1/auth/password-reset", json={"email": "nobody@example.com"})
    assert asked.status_code == nobody.status_code == 202
    assert asked.json() == nobody.json()

    message = await smtp.wait_for("fay@example.com", "Reset")
    link = reset_link(message)
    assert urlsplit(link).netloc == urlsplit(str(platform.base_url)).netloc
    stored = await db.fetchval("SELECT token_hash FROM password_reset_tokens")
    token = urlsplit(link).fragment.removeprefix("token=")
    assert token not in stored and len(token) >= 43  # 256 bits, url-safe base64; only a hash is kept
    expires = await db.fetchval("SELECT expires_at - created_at FROM password_reset_tokens")
    assert expires == timedelta(minutes=30)

    # Follow the link: the page is served from the configured host, then the token confirms.
    async with httpx.AsyncClient() as browser:
        page = await browser.get(link.split("#")[0])
        assert page.status_code == 200
        # The dashboard's reset page; its script confirms with the token from the fragment.
        script = re.search(r'<script type="module" src="(/static/js/reset\.js)"', page.text)
        assert script, page.text[:500]
        code = await browser.get(link.split("/reset-password")[0] + script.group(1))
    assert "/api/v1/auth/password-reset/confirm" in code.text
    confirm = await platform.post(
        "/api/v1/auth/password-reset/confirm", json={"token": token, "new_password": NEW_PASSWORD}
    )
    assert confirm.status_code == 204

    assert (await login(platform, "fay@example.com")).status_code == 401
    assert (await login(platform, "fay@example.com", NEW_PASSWORD)).status_code == 200
    # Every earlier session ended: the access token and the refresh token, and the keys made meanwhile.
    assert (await platform.get("/api/v1/users/me", headers=minted)).status_code == 401
    assert (await platform.get("/api/v1/users/me", headers=bearer(old["access_token"]))).status_code == 401
    assert (
        await platform.post("/api/v1/auth/refresh", json={"refresh_token": old["refresh_token"]})
    ).status_code == 401
    again = await platform.post(
        "/api/v1/auth/password-reset/confirm", json={"token": token, "new_password": "yet another passphrase"}
    )
    assert again.status_code == 400
    assert (await login(platform, "fay@example.com", NEW_PASSWORD)).status_code == 200
    assert len([m for m in smtp.messages if m["To"] == "nobody@example.com"]) == 0


async def test_expired_reset_token_is_refused(platform, smtp, db):
    await register(platform, "gus@example.com")
    await platform.post("/api/v1/auth/password-reset", json={"email": "gus@example.com"})
    token = urlsplit(reset_link(await smtp.wait_for("gus@example.com", "Reset"))).fragment.removeprefix("token=")
    await db.execute("UPDATE password_reset_tokens SET expires_at = now() - interval '1 second'")
    response = await platform.post(
        "/api/v1/auth/password-reset/confirm", json={"token": token, "new_password": NEW_PASSWORD}
    )
    assert response.status_code == 400
    assert (await login(platform, "gus@example.com")).status_code == 200


async def test_profile_preferences_and_activity_log(platform):
    await register(platform, "hal@example.com")
    await login(platform, "hal@example.com", "wrong password here")
    pair = await tokens(platform, "hal@example.com")
    headers = bearer(pair["access_token"])
    patched = await platform.patch(
        "/api/v1/users/me", json={"vs_currency": "eur", "watchlist": ["btc", "ETH", "btc"]}, headers=headers
    )
    assert patched.status_code == 200, patched.text
    assert patched.json()["vs_currency"] == "EUR"
    assert patched.json()["watchlist"] == ["BTC", "ETH"]
    for body in ({"role": "admin"}, {"is_active": False}, {"email": "x@example.com"}, {"vs_currency": "XYZ"}):
        refused = await platform.patch("/api/v1/users/me", json=body, headers=headers)
        assert refused.status_code == 422, body
    assert (await platform.get("/api/v1/users/me", headers=headers)).json()["role"] == "user"
    await settle()
    activity = await platform.get("/api/v1/users/me/activity", headers=headers)
    assert activity.status_code == 200
    items = activity.json()["items"]
    kinds = [item["kind"] for item in items]
    assert kinds[:2] == ["preferences_changed", "login"]
    assert {"register", "login_failed"} <= set(kinds)
    assert all(item["client_address"] == "127.0.0.1" for item in items)
    assert items[0]["details"] == {"vs_currency": "EUR", "watchlist": ["BTC", "ETH"]}
    assert items[0]["created_at"].endswith("Z")
    assert (await platform.get("/api/v1/users/me/activity")).status_code == 401


async def test_failed_logins_are_throttled_per_account_across_addresses(platform):
    await register(platform, "ivy@example.com")
    for n in range(5):
        # Each attempt from another client address (the test client is a trusted proxy).
        response = await login(
            platform, "ivy@example.com", "wrong password here", headers={"X-Forwarded-For": f"198.51.100.{n}"}
        )
        assert response.status_code == 401
    blocked = await login(platform, "ivy@example.com", headers={"X-Forwarded-For": "198.51.100.99"})
    assert blocked.status_code == 429
    assert int(blocked.headers["retry-after"]) > 0
    assert blocked.json()["error"]["code"] == "rate_limited"
    # An unknown account is throttled the same way, so throttling reveals nothing either.
    for _ in range(5):
        await login(platform, "ghost@example.com", "wrong password here")
    assert (await login(platform, "ghost@example.com")).status_code == 429


async def test_login_attempts_are_throttled_per_address(settings, smtp):
    tight = settings.model_copy(update={"login_max_attempts_per_ip": 3, "trusted_proxies": ["127.0.0.1"]})
    async with serve_app(gateway_app(tight)) as url, httpx.AsyncClient(base_url=url) as client:
        codes = [(await login(client, f"u{n}@example.com", "wrong password here")).status_code for n in range(4)]
        elsewhere = await login(
            client, "u9@example.com", "wrong password here", headers={"X-Forwarded-For": "192.0.2.1"}
        )
    assert codes == [401, 401, 401, 429]
    assert elsewhere.status_code == 401


async def test_login_rehashes_when_the_cost_rises(settings, db):
    async with serve_app(gateway_app(settings)) as url, httpx.AsyncClient(base_url=url) as client:
        await register(client, "jay@example.com")
    before = await db.fetchval("SELECT password_hash FROM users")
    stronger = settings.model_copy(update={"argon2_time_cost": 3})
    async with serve_app(gateway_app(stronger)) as url, httpx.AsyncClient(base_url=url) as client:
        assert (await login(client, "jay@example.com")).status_code == 200
    after = await db.fetchval("SELECT password_hash FROM users")
    assert "t=2" in before and "t=3" in after
    assert PasswordHasher().verify(after, PASSWORD)


async def test_create_admin_command(settings, db):
    env = {
        **os.environ,
        "COINLYTICS_ENV": "test",
        "COINLYTICS_DATABASE_URL": settings.database_url,
        "COINLYTICS_REDIS_URL": settings.redis_url,
        "COINLYTICS_REDIS_NAMESPACE": settings.redis_namespace,
        "COINLYTICS_JWT_SECRET": settings.jwt_secret_value(),
        "COINLYTICS_HMAC_KEY": settings.hmac_key_bytes().decode(),
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "coinlytics", "create-admin", "--email", "Root@Example.com", "--password-stdin",
        cwd=ROOT, env=env, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await process.communicate((PASSWORD + "\n").encode())
    assert process.returncode == 0, err.decode()
    assert b"created administrator" in out
    row = await db.fetchrow("SELECT role, password_hash FROM users WHERE email = 'root@example.com'")
    assert row["role"] == "admin"
    assert PasswordHasher().verify(row["password_hash"], PASSWORD)
    async with serve_app(gateway_app(settings)) as url, httpx.AsyncClient(base_url=url) as client:
        pair = await tokens(client, "root@example.com")
        listed = await client.get("/api/v1/admin/users", headers=bearer(pair["access_token"]))
    assert listed.status_code == 200
    assert listed.json()["users"][0]["role"] == "admin"


async def test_welcome_email_without_smtp_is_logged_not_fatal(settings, redis):
    async with serve_app(alerting_app(settings)) as alerting, serve_app(gateway_app(settings)) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            await register(client, "kim@example.com")
        stream = f"{settings.redis_namespace}:stream:emails"

        async def consumed():
            groups = await redis.xinfo_groups(stream)
            return groups and groups[0]["pending"] == 0 and groups[0]["last-delivered-id"] != b"0-0"

        await eventually(consumed)
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"{alerting}/healthz")).status_code == 200


async def test_reset_request_for_unknown_address_sends_nothing(platform, smtp):
    response = await platform.post("/api/v1/auth/password-reset", json={"email": "none@example.com"})
    assert response.status_code == 202
    await register(platform, "lou@example.com")
    await smtp.wait_for("lou@example.com", "Welcome")
    assert [m["To"] for m in smtp.messages] == ["lou@example.com"]
