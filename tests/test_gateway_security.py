"""The gateway as the only door: forged tokens, roles, the signed internal credential, rate limits, CORS,
size limits, security headers and HTTPS enforcement."""

from __future__ import annotations

import base64
import json
import time
import uuid

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jose import jwt

from services.gateway.app import create_app as gateway_app
from services.ingest.app import create_app as ingest_app
from services.pricing.app import create_app as pricing_app
from shared.auth import Principal, sign_internal
from tests.accounts import bearer, register, tokens
from tests.conftest import serve_app


@pytest.fixture
async def platform(settings):
    """Gateway, pricing and ingest, the services enforcing the gateway's signed credential."""
    enforced = settings.model_copy(update={"internal_auth_required": True, "sources": ["sim"]})
    async with serve_app(pricing_app(enforced)) as pricing_url, serve_app(ingest_app(enforced)) as ingest_url:
        gw = enforced.model_copy(update={"pricing_url": pricing_url, "ingest_url": ingest_url})
        async with serve_app(gateway_app(gw)) as url, httpx.AsyncClient(base_url=url, timeout=20) as client:
            client.services = {"pricing": pricing_url, "ingest": ingest_url}  # type: ignore[attr-defined]
            yield client


def claims_for(settings, user_id: str, **changes):
    now = int(time.time())
    claims = {
        "iss": settings.jwt_issuer,
        "aud": settings.jwt_audience,
        "sub": user_id,
        "iat": now,
        "exp": now + 600,
        "jti": uuid.uuid4().hex,
        "typ": "access",
        "role": "user",
        "fam": uuid.uuid4().hex,
    }
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


def b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


async def test_forged_and_misused_tokens_are_all_401(platform, settings):
    user = await register(platform, "mallory@example.com")
    pair = await tokens(platform, "mallory@example.com")
    secret = settings.jwt_secret_value()
    uid = user["id"]
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = rsa_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    header, payload, signature = pair["access_token"].split(".")
    tampered_payload = {**json.loads(base64.urlsafe_b64decode(payload + "==")), "role": "admin"}
    attacks = {
        "alg none": f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims_for(settings, uid))}.",
        "other key": jwt.encode(claims_for(settings, uid), "another-secret-" * 4, algorithm="HS256"),
        "HS512 with the right key": jwt.encode(claims_for(settings, uid), secret, algorithm="HS512"),
        "RS256": jwt.encode(claims_for(settings, uid), pem.decode(), algorithm="RS256"),
        "no exp": jwt.encode(claims_for(settings, uid, exp=None), secret, algorithm="HS256"),
        "expired": jwt.encode(claims_for(settings, uid, exp=int(time.time()) - 120), secret, algorithm="HS256"),
        "no jti": jwt.encode(claims_for(settings, uid, jti=None), secret, algorithm="HS256"),
        "no iat": jwt.encode(claims_for(settings, uid, iat=None), secret, algorithm="HS256"),
        "wrong aud": jwt.encode(claims_for(settings, uid, aud="someone-else"), secret, algorithm="HS256"),
        "wrong iss": jwt.encode(claims_for(settings, uid, iss="https://evil.example"), secret, algorithm="HS256"),
        "no typ": jwt.encode(claims_for(settings, uid, typ=None), secret, algorithm="HS256"),
        "refresh as access": pair["refresh_token"],
        "tampered payload": f"{header}.{b64(tampered_payload)}.{signature}",
        "not a jwt": "abc.def",
    }
    # The genuine token works, so each refusal below is the attack's doing.
    assert (await platform.get("/api/v1/users/me", headers=bearer(pair["access_token"]))).status_code == 200
    for name, token in attacks.items():
        for path in ("/api/v1/users/me", "/api/v1/admin/users", "/api/v1/prices?symbols=BTC"):
            response = await platform.get(path, headers=bearer(token))
            assert response.status_code == 401, (name, path, response.text)
            assert response.json()["error"]["code"] == "unauthorized"
    basic = await platform.get("/api/v1/users/me", headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert basic.status_code == 401


async def test_roles_admin_routes_and_other_users_objects(platform, db):
    alice = await register(platform, "alice@example.com")
    bob = await register(platform, "bob@example.com")
    await db.execute("UPDATE users SET role = 'admin' WHERE email = 'alice@example.com'")
    admin = await tokens(platform, "alice@example.com")
    user = await tokens(platform, "bob@example.com")
    admin_h, user_h = bearer(admin["access_token"]), bearer(user["access_token"])

    for method, path in (
        ("GET", "/api/v1/admin/users"),
        ("PATCH", f"/api/v1/admin/users/{alice['id']}"),
        ("GET", "/api/v1/admin/sources"),
        ("GET", "/api/v1/admin/errors"),
        ("GET", "/api/v1/admin/not-routed-yet"),
    ):
        body = {"role": "user"} if method == "PATCH" else None
        anonymous = await platform.request(method, path, json=body)
        assert anonymous.status_code == 401, (path, anonymous.text)
        forbidden = await platform.request(method, path, json=body, headers=user_h)
        assert forbidden.status_code == 403, (path, forbidden.text)
    # The admin passes the gateway, and the service accepts the gateway's signed admin credential.
    sources = await platform.get("/api/v1/admin/sources", headers=admin_h)
    assert sources.status_code == 200, sources.text
    assert (await platform.get("/api/v1/admin/not-routed-yet", headers=admin_h)).status_code == 404

    listed = await platform.get("/api/v1/admin/users", headers=admin_h)
    assert listed.status_code == 200
    assert {u["email"] for u in listed.json()["users"]} == {"alice@example.com", "bob@example.com"}
    for response in (listed, await platform.get("/api/v1/users/me", headers=user_h)):
        assert "argon2" not in response.text and "password" not in response.text

    # Each user sees only their own profile; an unknown id is 404; privileged fields are refused.
    assert (await platform.get("/api/v1/users/me", headers=user_h)).json()["id"] == bob["id"]
    missing = await platform.patch(f"/api/v1/admin/users/{uuid.uuid4()}", json={"role": "admin"}, headers=admin_h)
    assert missing.status_code == 404
    smuggled = await platform.patch(
        f"/api/v1/admin/users/{bob['id']}", json={"role": "admin", "password_hash": "x"}, headers=admin_h
    )
    assert smuggled.status_code == 422
    self_demote = await platform.patch(f"/api/v1/admin/users/{alice['id']}", json={"role": "user"}, headers=admin_h)
    assert self_demote.status_code == 409

    # Promotion signs bob out; his next sign-in carries the new role.
    promoted = await platform.patch(f"/api/v1/admin/users/{bob['id']}", json={"role": "admin"}, headers=admin_h)
    assert promoted.status_code == 200 and promoted.json()["role"] == "admin"
    assert (await platform.get("/api/v1/users/me", headers=user_h)).status_code == 401
    bob_admin = await tokens(platform, "bob@example.com")
    assert (await platform.get("/api/v1/admin/users", headers=bearer(bob_admin["access_token"]))).status_code == 200
    disabled = await platform.patch(f"/api/v1/admin/users/{bob['id']}", json={"is_active": False}, headers=admin_h)
    assert disabled.status_code == 200
    assert (await platform.get("/api/v1/users/me", headers=bearer(bob_admin["access_token"]))).status_code == 401
    assert (
        await platform.post("/api/v1/auth/login", data={"username": "bob@example.com", "password": "x" * 12})
    ).status_code == 401


async def test_services_refuse_calls_without_the_gateways_credential(platform, settings):
    ingest = platform.services["ingest"]
    pricing = platform.services["pricing"]
    key = settings.purpose_key("internal")
    path = "/api/v1/admin/sources"
    async with httpx.AsyncClient() as direct:
        assert (await direct.get(ingest + path)).status_code == 401
        assert (await direct.get(pricing + "/api/v1/prices?symbols=BTC")).status_code == 401
        # Probes and the spec stay open.
        assert (await direct.get(ingest + "/healthz")).status_code == 200
        assert (await direct.get(pricing + "/openapi.json")).status_code == 200
        admin = Principal(user_id=str(uuid.uuid4()), role="admin")
        good = sign_internal(key, "GET", path, admin)
        assert (await direct.get(ingest + path, headers=good)).status_code == 200
        forged = {**good, "x-coinlytics-role": "admin", "x-coinlytics-user": str(uuid.uuid4())}
        assert (await direct.get(ingest + path, headers=forged)).status_code == 401
        other_path = sign_internal(key, "GET", "/api/v1/admin/errors", admin)
        assert (await direct.get(ingest + path, headers=other_path)).status_code == 401
        stale = sign_internal(key, "GET", path, admin, now=time.time() - 600)
        assert (await direct.get(ingest + path, headers=stale)).status_code == 401
        wrong_key = sign_internal(b"not-the-key" * 4, "GET", path, admin)
        assert (await direct.get(ingest + path, headers=wrong_key)).status_code == 401
        as_user = sign_internal(key, "GET", path, Principal(user_id=str(uuid.uuid4()), role="user"))
        assert (await direct.get(ingest + path, headers=as_user)).status_code == 403
    # Anonymous market reads through the gateway are signed as such and accepted (503: no prices yet).
    assert (await platform.get("/api/v1/prices?symbols=BTC")).status_code in (200, 503)
    # A client can't smuggle its own credential headers through the gateway.
    smuggled = await platform.get(path, headers=sign_internal(key, "GET", path, admin))
    assert smuggled.status_code == 401


async def test_rate_limits_per_address_and_per_user(settings):
    # The test client stands in for a trusted proxy, so X-Forwarded-For picks the address.
    limited = settings.model_copy(
        update={"rate_limit_anonymous": 3, "rate_limit_user": 4, "trusted_proxies": ["127.0.0.1"]}
    )
    async with serve_app(gateway_app(limited)) as url, httpx.AsyncClient(base_url=url) as client:
        codes = [(await client.get("/api/v1/status")).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        blocked = await client.get("/api/v1/status")
        assert 1 <= int(blocked.headers["retry-after"]) <= 60
        assert blocked.json()["error"]["code"] == "rate_limited"
        # Another address has its own budget.
        other = await client.get("/api/v1/status", headers={"X-Forwarded-For": "203.0.113.9"})
        assert other.status_code == 200
    async with serve_app(gateway_app(limited)) as url, httpx.AsyncClient(base_url=url) as client:
        ip = {"X-Forwarded-For": "203.0.113.20"}
        response = await client.post(
            "/api/v1/auth/register", json={"email": "rita@example.com", "password": "x" * 12}, headers=ip
        )
        assert response.status_code == 201
        login = await client.post(
            "/api/v1/auth/login", data={"username": "rita@example.com", "password": "x" * 12}, headers=ip
        )
        token = login.json()["access_token"]
        # A user's budget follows the account, whatever address it calls from.
        codes = [
            (
                await client.get("/api/v1/users/me", headers={**bearer(token), "X-Forwarded-For": f"198.51.100.{n}"})
            ).status_code
            for n in range(5)
        ]
        assert codes == [200, 200, 200, 200, 429]


async def test_cors_is_closed_by_default_and_explicit_when_configured(settings):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "GET"}
    async with serve_app(gateway_app(settings)) as url, httpx.AsyncClient(base_url=url) as client:
        plain = await client.get("/api/v1/status", headers={"Origin": "https://app.example"})
        assert "access-control-allow-origin" not in plain.headers
        assert "access-control-allow-origin" not in (await client.options("/api/v1/status", headers=preflight)).headers
    configured = settings.model_copy(update={"cors_origins": ["https://app.example"]})
    async with serve_app(gateway_app(configured)) as url, httpx.AsyncClient(base_url=url) as client:
        allowed = await client.options(
            "/api/v1/users/me", headers={**preflight, "Access-Control-Request-Headers": "authorization"}
        )
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "https://app.example"
        assert "access-control-allow-credentials" not in allowed.headers
        other = await client.options("/api/v1/users/me", headers={**preflight, "Origin": "https://evil.example"})
        assert other.status_code == 400
        assert "access-control-allow-origin" not in other.headers
        simple = await client.get("/api/v1/status", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in simple.headers


async def test_oversized_bodies_are_413(settings):
    small = settings.model_copy(update={"max_body_bytes": 2048})
    big = {"email": "big@example.com", "password": "x" * 3000}
    async with serve_app(gateway_app(small)) as url, httpx.AsyncClient(base_url=url) as client:
        response = await client.post("/api/v1/auth/register", json=big)
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "payload_too_large"

        async def chunks():
            for _ in range(10):
                yield b"x" * 512

        streamed = await client.post("/api/v1/alerts", content=chunks(), headers={"Content-Type": "application/json"})
        assert streamed.status_code == 413
        assert streamed.json()["error"]["code"] == "payload_too_large"
        fine = await client.post("/api/v1/auth/register", json={"email": "ok@example.com", "password": "x" * 12})
        assert fine.status_code == 201


async def test_security_headers_and_https_enforcement(settings):
    async with serve_app(gateway_app(settings)) as url, httpx.AsyncClient(base_url=url) as client:
        response = await client.get("/api/v1/status")
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
        assert response.headers["referrer-policy"] == "no-referrer"
        assert "strict-transport-security" not in response.headers
        error = await client.get("/api/v1/nothing-here")
        assert error.status_code == 404 and error.headers["x-content-type-options"] == "nosniff"
    tls = settings.model_copy(
        update={"https_only": True, "public_url": "https://coinlytics.example.com", "trusted_proxies": ["127.0.0.1"]}
    )
    async with serve_app(gateway_app(tls)) as url, httpx.AsyncClient(base_url=url) as client:
        redirected = await client.get("/api/v1/status?x=1", headers={"Host": "evil.example"})
        assert redirected.status_code == 308
        assert redirected.headers["location"] == "https://coinlytics.example.com/api/v1/status?x=1"
        assert (await client.get("/healthz")).status_code == 200
        # Behind the TLS-terminating proxy (a trusted peer), the original scheme is https: served, with HSTS.
        served = await client.get("/api/v1/status", headers={"X-Forwarded-Proto": "https"})
        assert served.status_code == 200
        assert served.headers["strict-transport-security"].startswith("max-age=31536000")
