"""The gateway's per-request shortcuts keep their security properties: the verified-token cache never
outlives a revocation (on any replica) or the token's expiry and only ever matches the very same token;
forwarding tried first for service-only prefixes leaves 405s and not-found answers as they were; the
services' credential check still refuses what it refused."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
from jose import jwt

from services.gateway.app import create_app as gateway_app
from services.pricing.app import create_app as pricing_app
from shared.auth import ANONYMOUS, Authenticator, Denylist, LocalTokenVerifier, TokenType, sign_internal
from shared.errors import Unauthorized
from tests.accounts import bearer, register, tokens
from tests.conftest import serve_app


class CountingVerifier(LocalTokenVerifier):
    """The real verifier, counting how often a signature is actually checked."""

    calls = 0

    async def verify(self, token: str, *, expected_type: TokenType = "access") -> dict[str, Any]:
        self.calls += 1
        return await super().verify(token, expected_type=expected_type)


def signed(settings, **changes: Any) -> str:
    now = int(time.time())
    claims = {
        "iss": settings.jwt_issuer,
        "aud": settings.jwt_audience,
        "sub": str(uuid.uuid4()),
        "iat": now,
        "exp": now + 600,
        "jti": uuid.uuid4().hex,
        "typ": "access",
        "role": "user",
    }
    claims.update(changes)
    return str(jwt.encode(claims, settings.jwt_secret_value(), algorithm="HS256"))


async def test_verified_tokens_are_reused_but_revocation_and_expiry_still_hold(settings, redis):
    verifier = CountingVerifier(settings.jwt_secret_value(), issuer=settings.jwt_issuer, audience=settings.jwt_audience)
    denylist = Denylist(redis, settings)
    authenticator = Authenticator(verifier, denylist)
    token = signed(settings)
    first = await authenticator.authenticate(token)
    assert (await authenticator.authenticate(token)) == first
    assert verifier.calls == 1  # the second request skipped the signature check
    # Another token with the same id but a forged signature is not the cached one.
    forged = token.rsplit(".", 1)[0] + ".c2lnbmF0dXJl"
    try:
        await authenticator.authenticate(forged)
        raise AssertionError("a forged token was accepted")
    except Unauthorized:
        pass
    # Revoked: refused at once, although its verification is still remembered.
    assert first.jti is not None and first.expires_at is not None
    await denylist.deny_token(first.jti, first.expires_at)
    try:
        await authenticator.authenticate(token)
        raise AssertionError("a revoked token was accepted")
    except Unauthorized as exc:
        assert "revoked" in exc.message
    # A token about to expire is never served from the cache past its expiry.
    expiry = int(time.time()) + 1
    short = signed(settings, exp=expiry)
    await authenticator.authenticate(short)
    while time.time() < expiry + 1.05:
        await asyncio.sleep(0.2)
    try:
        await authenticator.authenticate(short)
        raise AssertionError("an expired token was accepted")
    except Unauthorized:
        pass


async def test_logout_on_one_gateway_is_refused_at_once_by_another_that_cached_the_token(settings):
    async with (
        serve_app(gateway_app(settings)) as first,
        serve_app(gateway_app(settings)) as second,
        httpx.AsyncClient(timeout=20) as client,
    ):
        async with httpx.AsyncClient(base_url=first, timeout=20) as one:
            await register(one, "nia@example.com")
            pair = await tokens(one, "nia@example.com")
        headers = bearer(pair["access_token"])
        for _ in range(3):  # the second gateway now holds the verified token
            assert (await client.get(second + "/api/v1/users/me", headers=headers)).status_code == 200
        assert (await client.post(first + "/api/v1/auth/logout", headers=headers)).status_code == 204
        after = await client.get(second + "/api/v1/users/me", headers=headers)
        assert after.status_code == 401
        assert (await client.get(second + "/api/v1/prices?symbols=BTC", headers=headers)).status_code == 401


async def test_forwarding_first_keeps_405_404_and_admin_answers(settings):
    async with serve_app(gateway_app(settings)) as url, httpx.AsyncClient(base_url=url, timeout=20) as client:
        # Own paths asked with another method: 405 with the allowed ones, never forwarded.
        wrong = await client.delete("/api/v1/status")
        assert wrong.status_code == 405
        assert "GET" in wrong.headers["allow"]
        login = await client.get("/api/v1/auth/login")
        assert login.status_code == 405
        assert "POST" in login.headers["allow"]
        # Not routed anywhere: the gateway's own 404 in the error shape.
        missing = await client.get("/api/v1/nothing-here/at-all")
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "not_found"
        # A service-only prefix is forwarded (pricing is not running here: 502 from the gateway itself).
        forwarded = await client.get("/api/v1/prices?symbols=BTC")
        assert forwarded.status_code == 502
        assert forwarded.json()["error"]["details"] == {"service": "pricing"}
        # Admin paths of a service are refused at the door without an administrator.
        assert (await client.get("/api/v1/admin/sources")).status_code == 401


async def test_services_refuse_credentials_with_stray_or_partial_internal_headers(settings):
    enforced = settings.model_copy(update={"internal_auth_required": True})
    key = settings.purpose_key("internal")
    async with serve_app(pricing_app(enforced)) as url, httpx.AsyncClient(base_url=url, timeout=20) as client:
        path = "/api/v1/prices"
        good = sign_internal(key, "GET", path, ANONYMOUS, query="symbols=BTC")
        assert (await client.get(path + "?symbols=BTC", headers=good)).status_code in (200, 503)
        # Only one of the credential's headers: present but invalid, refused.
        partial = {"x-coinlytics-sig": good["x-coinlytics-sig"]}
        assert (await client.get(path + "?symbols=BTC", headers=partial)).status_code == 401
        # The same credential for another query string: refused.
        assert (await client.get(path + "?symbols=ETH", headers=good)).status_code == 401
        # Upper-case header names arrive lower-cased and are checked all the same.
        shouted = {k.upper(): v for k, v in good.items()}
        assert (await client.get(path + "?symbols=ETH", headers=shouted)).status_code == 401
