"""Findings of the security review (issue 8, section 4), each through the real servers: forwarded client
addresses, refresh versus revocation races, the login throttle under parallel guesses, admin roles on the
services' own routes, the internal credential's binding and its bad headers, out-of-range dates, OIDC key
refetches, reset-mail flooding, development secrets on a public address, and password resets that answer
alike for known and unknown addresses while Redis fails."""

from __future__ import annotations

import asyncio
import json
import re
import time
import tomllib
import uuid
from typing import Any

import httpx
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jose import jwk, jwt
from packaging.requirements import Requirement

from services.alerting.app import create_app as alerting_app
from services.conversion.app import create_app as conversion_app
from services.gateway.app import create_app as gateway_app
from services.ingest.app import create_app as ingest_app
from services.pricing.app import create_app as pricing_app
from shared.auth import OidcTokenVerifier, Principal, TokenError, sign_internal
from shared.settings import ConfigurationError, load_settings
from tests.accounts import InternalCredential, bearer, login, register, reset_link, tokens
from tests.conftest import ROOT, eventually, free_port, serve_app, strong

ADMIN = Principal(user_id=str(uuid.uuid4()), role="admin")
USER = Principal(user_id=str(uuid.uuid4()), role="user")


# --- 1. X-Forwarded-For only from trusted proxies ---------------------------------------------------


async def test_forwarded_for_is_ignored_unless_the_peer_is_a_trusted_proxy(settings):
    limited = settings.model_copy(update={"rate_limit_anonymous": 3, "login_max_attempts_per_ip": 3})
    async with serve_app(gateway_app(limited)) as url, httpx.AsyncClient(base_url=url) as client:
        spoofed = [
            (await client.get("/api/v1/status", headers={"X-Forwarded-For": f"203.0.113.{n}"})).status_code
            for n in range(4)
        ]
    assert spoofed == [200, 200, 200, 429]
    roomy = limited.model_copy(update={"rate_limit_anonymous": 100})
    async with serve_app(gateway_app(roomy)) as url, httpx.AsyncClient(base_url=url) as client:
        guesses = [
            (
                await login(client, "nobody@example.com", "wrong guess", headers={"X-Forwarded-For": f"192.0.2.{n}"})
            ).status_code
            for n in range(4)
        ]
    # The per-address sign-in limit (3) counts the real peer, whatever address the caller claims.
    assert guesses[-1] == 429

    trusted = limited.model_copy(update={"trusted_proxies": ["127.0.0.0/8"]})
    async with serve_app(gateway_app(trusted)) as url, httpx.AsyncClient(base_url=url) as client:
        forwarded = [
            (await client.get("/api/v1/status", headers={"X-Forwarded-For": f"203.0.113.{n}"})).status_code
            for n in range(4)
        ]
        assert forwarded == [200, 200, 200, 200]
        # Entries left of the right-most untrusted hop are the caller's own words: they don't count.
        prefixed = [
            (await client.get("/api/v1/status", headers={"X-Forwarded-For": f"198.51.100.{n}, 192.0.2.7"})).status_code
            for n in range(4)
        ]
        assert prefixed == [200, 200, 200, 429]


def test_trusted_proxies_setting_parses_networks_and_refuses_wildcards(env):
    env.setenv("COINLYTICS_ENV", "test")
    env.setenv("COINLYTICS_JWT_SECRET", strong())
    env.setenv("COINLYTICS_HMAC_KEY", strong())
    env.setenv("COINLYTICS_TRUSTED_PROXIES", "10.0.0.0/8, 192.168.1.10")
    assert load_settings().trusted_proxies == ["10.0.0.0/8", "192.168.1.10"]
    env.delenv("COINLYTICS_TRUSTED_PROXIES")
    assert load_settings().trusted_proxies == []
    env.setenv("COINLYTICS_TRUSTED_PROXIES", "*")
    with pytest.raises(ConfigurationError, match="COINLYTICS_TRUSTED_PROXIES"):
        load_settings()


def test_deployments_trust_no_wildcard_proxy():
    for path in (ROOT / "deploy" / "k8s" / "configmap.yaml", ROOT / "docker-compose.yml"):
        text = path.read_text()
        assert "FORWARDED_ALLOW_IPS" not in text, path
        assert not re.search(r"COINLYTICS_TRUSTED_PROXIES:\s*['\"]?\*", text), path


# --- 2. refresh racing logout / password reset -------------------------------------------------------


async def _refresh_chain(
    client: httpx.AsyncClient, token: str, ready: asyncio.Event, revoked: asyncio.Event
) -> tuple[str, bool]:
    """Refreshes one sign-in back to back; returns its last token and whether the chain was refused.

    A refresh that begins after the revocation finished must be refused, and so must the next one
    after a refresh that was in flight during it."""
    for step in range(1000):
        after_revocation = revoked.is_set()
        response = await client.post("/api/v1/auth/refresh", json={"refresh_token": token})
        if response.status_code != 200:
            assert response.status_code == 401, response.text
            ready.set()
            return token, True
        token = response.json()["refresh_token"]
        if step == 1:
            ready.set()
        if after_revocation:
            return token, False
    raise AssertionError("the revocation never happened")


@pytest.fixture
async def accounts_gateway(settings, smtp):
    roomy = settings.model_copy(
        update={
            "rate_limit_anonymous": 100_000,
            "login_max_attempts_per_ip": 100_000,
            "password_reset_mail_interval_seconds": 0,
            "smtp_url": smtp.url,
        }
    )
    async with (
        serve_app(alerting_app(roomy)),
        serve_app(gateway_app(roomy)) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as client,
    ):
        yield client


async def test_a_refresh_during_logout_does_not_survive_it(accounts_gateway):
    client = accounts_gateway
    await register(client, "race@example.com")

    async def one_sign_in(pair: dict[str, Any]) -> None:
        ready, revoked = asyncio.Event(), asyncio.Event()

        async def sign_out() -> None:
            await ready.wait()
            response = await client.post("/api/v1/auth/logout", headers=bearer(pair["access_token"]))
            assert response.status_code == 204
            revoked.set()

        (last, refused), _ = await asyncio.gather(
            _refresh_chain(client, pair["refresh_token"], ready, revoked), sign_out()
        )
        assert refused, "a refresh token issued while signing out outlived the logout"
        assert (await client.post("/api/v1/auth/refresh", json={"refresh_token": last})).status_code == 401

    # Sign-ins of one account racing side by side, a few rounds: the window is milliseconds wide.
    for _ in range(4):
        # Signed in one after the other: parallel sign-ins of one account count against its login throttle.
        pairs = [await tokens(client, "race@example.com") for _ in range(8)]
        await asyncio.gather(*(one_sign_in(pair) for pair in pairs))


async def test_refreshes_during_a_password_reset_do_not_survive_it(accounts_gateway, smtp):
    client = accounts_gateway
    email = "reset-race@example.com"
    password = "the first passphrase of many"
    await register(client, email, password)
    for round_no in range(5):
        pairs = [await tokens(client, email, password) for _ in range(3)]
        assert (await client.post("/api/v1/auth/password-reset", json={"email": email})).status_code == 202

        async def mail_arrived(count: int = round_no + 1) -> Any:
            mails = [m for m in smtp.messages if m["To"] == email and "Reset" in m["Subject"]]
            return mails[-1] if len(mails) >= count else None

        token = reset_link(await eventually(mail_arrived)).split("#token=")[1]
        new_password = f"passphrase number {round_no} of the race"
        readies = [asyncio.Event() for _ in pairs]
        revoked = asyncio.Event()

        async def reset(token: str = token, new_password: str = new_password, readies=readies, revoked=revoked) -> None:
            for ready in readies:
                await ready.wait()
            response = await client.post(
                "/api/v1/auth/password-reset/confirm", json={"token": token, "new_password": new_password}
            )
            assert response.status_code == 204, response.text
            revoked.set()

        results = await asyncio.gather(
            *(_refresh_chain(client, p["refresh_token"], r, revoked) for p, r in zip(pairs, readies, strict=True)),
            reset(),
        )
        password = new_password
        for last, refused in results[:-1]:
            assert refused, "a refresh token issued during the password reset outlived it"
            assert (await client.post("/api/v1/auth/refresh", json={"refresh_token": last})).status_code == 401


# --- 3. the per-account login throttle under parallel guesses ---------------------------------------


async def test_parallel_wrong_passwords_get_at_most_the_allowed_attempts(settings):
    async with serve_app(gateway_app(settings)) as url, httpx.AsyncClient(base_url=url, timeout=60) as client:
        await register(client, "target@example.com")
        answers = await asyncio.gather(
            *(login(client, "target@example.com", f"wrong guess number {n}") for n in range(20))
        )
    codes = [a.status_code for a in answers]
    assert set(codes) <= {401, 429}
    assert len([c for c in codes if c != 429]) <= settings.login_max_failures


# --- 4. admin role on the services' admin routes; internal auth only off in tests -------------------


async def test_service_admin_routes_check_the_role_themselves(settings):
    # Tests run with internal_auth_required off, the way a misconfigured deployment would.
    assert settings.internal_auth_required is False
    ingest_settings = settings.model_copy(update={"sources": ["sim"]})
    async with serve_app(pricing_app(settings)) as pricing, serve_app(ingest_app(ingest_settings)) as ingest:
        checks = [
            ("GET", f"{pricing}/api/v1/admin/coins", None),
            ("POST", f"{pricing}/api/v1/admin/coins", {"symbol": "MATIC"}),
            ("DELETE", f"{pricing}/api/v1/admin/coins/MATIC", None),
            ("GET", f"{ingest}/api/v1/admin/sources", None),
            ("GET", f"{ingest}/api/v1/admin/errors", None),
        ]
        async with (
            httpx.AsyncClient() as anonymous,
            httpx.AsyncClient(auth=InternalCredential(settings, USER)) as user,
            httpx.AsyncClient(auth=InternalCredential(settings, ADMIN)) as admin,
        ):
            for method, url, body in checks:
                assert (await anonymous.request(method, url, json=body)).status_code == 401, url
                assert (await user.request(method, url, json=body)).status_code == 403, url
            for method, url, body in checks:
                assert (await admin.request(method, url, json=body)).status_code in (200, 201), url


@pytest.mark.parametrize("environment", ["production", "development"])
def test_internal_auth_can_only_be_switched_off_in_tests(env, environment):
    env.setenv("COINLYTICS_ENV", environment)
    env.setenv("COINLYTICS_JWT_SECRET", strong())
    env.setenv("COINLYTICS_HMAC_KEY", strong())
    env.setenv("COINLYTICS_INTERNAL_AUTH_REQUIRED", "false")
    with pytest.raises(ConfigurationError, match="COINLYTICS_INTERNAL_AUTH_REQUIRED=false is only accepted"):
        load_settings()
    env.setenv("COINLYTICS_ENV", "test")
    assert load_settings().internal_auth_required is False


# --- 5. and 6. the internal credential: query, body, purpose key, bad header bytes -------------------


async def test_internal_credential_is_bound_to_query_and_body(settings):
    enforced = settings.model_copy(update={"internal_auth_required": True, "sources": ["sim"]})
    key = settings.purpose_key("internal")
    async with (
        serve_app(pricing_app(enforced)) as pricing,
        serve_app(ingest_app(enforced)) as ingest,
        httpx.AsyncClient() as client,
    ):
        path = "/api/v1/admin/errors"
        signed = sign_internal(key, "GET", path, ADMIN, query="limit=5")
        assert (await client.get(f"{ingest}{path}?limit=5", headers=signed)).status_code == 200
        assert (await client.get(f"{ingest}{path}?limit=6", headers=signed)).status_code == 401
        assert (await client.get(f"{ingest}{path}", headers=signed)).status_code == 401

        path = "/api/v1/admin/coins"
        body = b'{"symbol": "MATIC"}'
        signed = sign_internal(key, "POST", path, ADMIN, body=body)
        json_type = {"content-type": "application/json"}
        other = await client.post(f"{pricing}{path}", content=b'{"symbol": "SHIB"}', headers={**signed, **json_type})
        assert other.status_code == 401
        good = await client.post(f"{pricing}{path}", content=body, headers={**signed, **json_type})
        assert good.status_code == 201
        # The raw HMAC key is not the internal credential's key.
        raw = sign_internal(settings.hmac_key_bytes(), "GET", path, ADMIN)
        assert (await client.get(f"{pricing}{path}", headers=raw)).status_code == 401


async def test_gateway_forwards_queries_and_bodies_with_a_matching_credential(settings, db):
    enforced = settings.model_copy(update={"internal_auth_required": True, "sources": ["sim"]})
    async with serve_app(pricing_app(enforced)) as pricing_url, serve_app(ingest_app(enforced)) as ingest_url:
        gw = enforced.model_copy(update={"pricing_url": pricing_url, "ingest_url": ingest_url})
        async with serve_app(gateway_app(gw)) as url, httpx.AsyncClient(base_url=url) as client:
            await register(client, "root@example.com")
            await db.execute("UPDATE users SET role = 'admin' WHERE email = 'root@example.com'")
            admin = bearer((await tokens(client, "root@example.com"))["access_token"])
            added = await client.post("/api/v1/admin/coins", json={"symbol": "MATIC", "name": "Polygon"}, headers=admin)
            assert added.status_code == 201, added.text
            errors = await client.get("/api/v1/admin/errors?limit=3&source=sim", headers=admin)
            assert errors.status_code == 200, errors.text


async def test_a_non_ascii_internal_signature_is_401_not_500(settings):
    enforced = settings.model_copy(update={"internal_auth_required": True, "sources": ["sim"]})
    async with serve_app(ingest_app(enforced)) as ingest, httpx.AsyncClient() as client:
        path = "/api/v1/admin/sources"
        signed = sign_internal(settings.purpose_key("internal"), "GET", path, ADMIN)
        headers = [(k.encode(), v.encode()) for k, v in signed.items() if k != "x-coinlytics-sig"]
        headers.append((b"x-coinlytics-sig", "signatur\u00e9".encode("latin-1")))
        response = await client.get(ingest + path, headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"


# --- 7. dates out of range ---------------------------------------------------------------------------


OUT_OF_RANGE = [
    "0001-01-01T00:00:00+01:00",
    "0001-01-01T00:00:00",
    "1969-12-31T23:59:59Z",
    "9999-12-31T23:59:59-01:00",
    "9999-12-31T12:00:00Z",
    "1e20",
    "253402300799",
    "-1",
]


async def test_out_of_range_dates_are_422_in_history_and_conversion(settings):
    async with (
        serve_app(pricing_app(settings)) as pricing,
        serve_app(conversion_app(settings)) as conversion,
        httpx.AsyncClient() as client,
    ):
        for value in OUT_OF_RANGE:
            for url, params in (
                (f"{pricing}/api/v1/prices/BTC/history", {"start": value}),
                (f"{pricing}/api/v1/prices/BTC/history", {"start": "2021-01-01T00:00:00Z", "end": value}),
                (f"{conversion}/api/v1/convert", {"from": "BTC", "to": "USD", "at": value}),
            ):
                response = await client.get(url, params=params)
                assert response.status_code == 422, (url, params, response.text)
                error = response.json()["error"]
                assert error["code"] == "validation_error"
                assert "1970-01-01" in error["message"] and "9999-12-30" in error["message"], error
        # The bounds themselves are accepted (no data: 200 with no candles, or 404/503 for conversion).
        edge = await client.get(
            f"{pricing}/api/v1/prices/BTC/history", params={"start": "1970-01-01T00:00:00Z", "end": "1970-01-02"}
        )
        assert edge.status_code == 200, edge.text
        late = await client.get(f"{conversion}/api/v1/convert", params={"from": "BTC", "to": "USD", "at": "1000000"})
        assert late.status_code != 422, late.text


# --- 8. OIDC: unknown key ids refetch the JWKS at most every 30 s ------------------------------------


def _rsa_key() -> tuple[str, dict[str, Any]]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public = (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return pem, jwk.construct(public, "RS256").to_dict()


def _oidc_token(pem: str, kid: str) -> str:
    now = int(time.time())
    claims = {
        "iss": "https://issuer.example",
        "aud": "coinlytics-api",
        "sub": "someone",
        "iat": now,
        "exp": now + 300,
        "jti": uuid.uuid4().hex,
        "typ": "Bearer",
    }
    token: str = jwt.encode(claims, pem, algorithm="RS256", headers={"kid": kid})
    return token


async def test_unknown_key_ids_refetch_the_issuer_keys_at_most_once_per_interval():
    known_pem, known_jwk = _rsa_key()
    rotated_pem, rotated_jwk = _rsa_key()
    forger_pem, _ = _rsa_key()
    served = {"keys": [{**known_jwk, "kid": "known", "use": "sig"}]}
    fetches = 0

    async def jwks(_request: web.Request) -> web.Response:
        nonlocal fetches
        fetches += 1
        return web.json_response(served)

    app = web.Application()
    app.router.add_get("/jwks", jwks)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with httpx.AsyncClient() as http:

            def verifier(**options: Any) -> OidcTokenVerifier:
                return OidcTokenVerifier(
                    issuer="https://issuer.example",
                    jwks_url=f"http://127.0.0.1:{port}/jwks",
                    audience="coinlytics-api",
                    algorithms=["RS256"],
                    admin_role="admin",
                    client=http,
                    **options,
                )

            oidc = verifier()
            assert (await oidc.verify(_oidc_token(known_pem, "known")))["sub"] == "someone"
            assert fetches == 1
            for _ in range(10):
                with pytest.raises(TokenError):
                    await oidc.verify(_oidc_token(forger_pem, f"forged-{uuid.uuid4().hex}"))
            assert fetches == 2
            # A real rotation is still picked up once the interval has passed (here: no interval).
            served["keys"].append({**rotated_jwk, "kid": "rotated", "use": "sig"})
            eager = verifier(unknown_kid_refetch_seconds=0)
            await eager.verify(_oidc_token(known_pem, "known"))
            served["keys"] = [{**rotated_jwk, "kid": "rotated2", "use": "sig"}]
            assert (await eager.verify(_oidc_token(rotated_pem, "rotated2")))["sub"] == "someone"
    finally:
        await runner.cleanup()


# --- 9. password-reset mails per address ------------------------------------------------------------


async def test_repeated_reset_requests_send_one_mail(settings, smtp, redis):
    common = settings.model_copy(update={"smtp_url": smtp.url})
    gateway = gateway_app(common)
    async with (
        serve_app(alerting_app(common)),
        serve_app(gateway) as url,
        httpx.AsyncClient(base_url=url, timeout=20) as client,
    ):
        await register(client, "flood@example.com")
        for _ in range(5):
            response = await client.post("/api/v1/auth/password-reset", json={"email": "flood@example.com"})
            assert response.status_code == 202
            assert response.json()["message"]
        # Every mail the requests could have started is queued once the background work is done.
        await gateway.state.auth.close()
        queued = await redis.xrange(f"{settings.redis_namespace}:stream:emails")
        subjects = [json.loads(fields[b"data"])["subject"] for _, fields in queued]
        assert sorted(subjects) == ["Reset your Coinlytics password", "Welcome to Coinlytics"]
        await smtp.wait_for("flood@example.com", "Reset")
        assert len([m for m in smtp.messages if "Reset" in m["Subject"]]) == 1
        # Another account has its own allowance.
        await register(client, "other@example.com")
        other = await client.post("/api/v1/auth/password-reset", json={"email": "other@example.com"})
        assert other.status_code == 202
        await smtp.wait_for("other@example.com", "Reset")


# --- 10. development placeholders on a public address; python-jose ----------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "::", "coinlytics.example.com"])
def test_development_placeholders_are_refused_on_a_public_address(env, host):
    env.setenv("COINLYTICS_ENV", "development")
    env.setenv("COINLYTICS_HOST", host)
    with pytest.raises(ConfigurationError, match="COINLYTICS_HOST") as caught:
        load_settings()
    assert "COINLYTICS_JWT_SECRET" in str(caught.value) and "COINLYTICS_HMAC_KEY" in str(caught.value)
    env.setenv("COINLYTICS_JWT_SECRET", strong())
    env.setenv("COINLYTICS_HMAC_KEY", strong())
    assert load_settings().host == host


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.5"])
def test_development_placeholders_stay_fine_on_loopback(env, host):
    env.setenv("COINLYTICS_ENV", "development")
    env.setenv("COINLYTICS_HOST", host)
    assert load_settings().jwt_secret is not None


def test_python_jose_requirement_excludes_vulnerable_releases():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    jose = next(Requirement(d) for d in project["dependencies"] if d.startswith("python-jose"))
    assert not jose.specifier.contains("3.3.0")
    assert jose.specifier.contains("3.4.0")


# --- 11. password reset while Redis fails: known and unknown addresses answer alike -----------------


class CuttingRedisProxy:
    """A TCP relay to Redis that drops the connection of any command naming ``poison``: Redis going away at
    exactly that step, after every earlier command of the request (the rate limit) was answered."""

    def __init__(self, upstream_port: int, poison: bytes) -> None:
        self.upstream_port = upstream_port
        self.poison = poison
        self.server: asyncio.Server | None = None
        self.open: set[asyncio.StreamWriter] = set()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{port}/0"

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            # Connections the gateway still holds go too: Redis is gone for good now.
            for writer in self.open:
                writer.close()
            await self.server.wait_closed()

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self.open |= {client_writer, upstream_writer}

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, inspect: bool) -> None:
            try:
                while chunk := await reader.read(65536):
                    if inspect and self.poison in chunk:
                        break
                    writer.write(chunk)
                    await writer.drain()
            except OSError:
                pass
            finally:
                client_writer.close()
                upstream_writer.close()

        await asyncio.gather(pipe(client_reader, upstream_writer, True), pipe(upstream_reader, client_writer, False))


async def test_reset_requests_answer_alike_for_known_and_unknown_addresses_when_redis_fails(
    settings, smtp, server_redis_url
):
    """Redis failing at the mail-interval slot, then down altogether: a known and an unknown address get the
    same answer each time, so the status code never tells which addresses have an account."""
    common = settings.model_copy(update={"smtp_url": smtp.url})
    async with serve_app(gateway_app(common)) as url, httpx.AsyncClient(base_url=url, timeout=20) as client:
        await register(client, "known@example.com")
    upstream = httpx.URL(server_redis_url).port or 6379
    proxy = CuttingRedisProxy(upstream, poison=b"reset-mail")
    failing = common.model_copy(update={"redis_url": await proxy.start()})
    try:
        async with serve_app(gateway_app(failing)) as url, httpx.AsyncClient(base_url=url, timeout=20) as client:

            async def answers() -> list[tuple[int, str | None]]:
                out = []
                for address in ("known@example.com", "unknown@example.com"):
                    response = await client.post("/api/v1/auth/password-reset", json={"email": address})
                    out.append((response.status_code, response.json().get("error", {}).get("code")))
                return out

            assert await answers() == [(503, "service_unavailable")] * 2
            await proxy.stop()
            assert await answers() == [(503, "service_unavailable")] * 2
    finally:
        await proxy.stop()
