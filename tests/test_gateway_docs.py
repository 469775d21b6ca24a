"""The gateway's merged API explorer and the operations endpoints every service has, with the pricing,
ingest and gateway apps running on real servers (ingest polling the recorded Binance payloads)."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from services.gateway.app import create_app as gateway_app
from services.ingest.app import create_app as ingest_app
from services.pricing.app import create_app as pricing_app
from tests.browser import CHROMIUM_ARGS, chromium_or_skip, on_this_machine
from tests.conftest import free_port, make_settings, serve_app
from tests.replay import ReplayServer, serve_binance


@dataclass
class Platform:
    gateway: str
    pricing: str
    ingest: str

    def services(self) -> dict[str, str]:
        return {"gateway": self.gateway, "pricing": self.pricing, "ingest": self.ingest}


@pytest.fixture
async def platform(settings, replay: ReplayServer, exchange_fixtures, monkeypatch) -> AsyncIterator[Platform]:
    serve_binance(replay, exchange_fixtures)
    monkeypatch.setenv("COINLYTICS_SOURCE_BINANCE_REST_URL", replay.base_url)
    common = make_settings(
        settings.database_url,
        settings.redis_url,
        settings.redis_namespace,
        sources=["binance"],
        coins=["BTC", "ETH"],
        rate_limit_anonymous=10_000,
    )
    async with serve_app(pricing_app(common)) as pricing_url, serve_app(ingest_app(common)) as ingest_url:
        closed = f"http://127.0.0.1:{free_port()}"
        gw_settings = common.model_copy(
            update={
                "pricing_url": pricing_url,
                "ingest_url": ingest_url,
                "conversion_url": closed,
                "analytics_url": closed,
                "alerting_url": closed,
            }
        )
        async with serve_app(gateway_app(gw_settings)) as gateway_url:
            yield Platform(gateway=gateway_url, pricing=pricing_url, ingest=ingest_url)


async def test_gateway_openapi_merges_the_services_public_paths(platform):
    async with httpx.AsyncClient(base_url=platform.gateway) as client:
        response = await client.get("/openapi.json")
    assert response.status_code == 200
    spec = response.json()
    assert spec["openapi"].startswith("3.")
    assert spec["info"]["title"] == "Coinlytics API"
    paths = spec["paths"]
    assert "get" in paths["/api/v1/prices"]  # from pricing
    assert "get" in paths["/api/v1/admin/sources"]  # from ingest
    assert "get" in paths["/api/v1/status"]  # the gateway's own
    # Internal operations endpoints and the forwarding catch-all are not part of the public API.
    for internal in ("/metrics", "/api/v1/{path}", "/api/v1/{path:path}"):
        assert internal not in paths
    # Services that are not running are named, not silently missing.
    assert set(spec["info"].get("x-unavailable-services", [])) == {"conversion", "analytics", "alerting"}
    # Every schema a merged path refers to is in the merged components.
    schemas = spec.get("components", {}).get("schemas", {})
    refs = set(re.findall(r'"#/components/schemas/([^"]+)"', response.text))
    assert refs, "the merged paths refer to no schema"
    assert refs <= set(schemas), refs - set(schemas)
    prices = paths["/api/v1/prices"]["get"]
    assert {p["name"] for p in prices["parameters"]} >= {"symbols", "vs"}


async def test_gateway_serves_the_api_explorer(platform):
    async with httpx.AsyncClient(base_url=platform.gateway) as client:
        for path, marker in (("/docs", "swagger-ui"), ("/redoc", "redoc")):
            response = await client.get(path)
            assert response.status_code == 200, path
            assert response.headers["content-type"].startswith("text/html"), path
            assert marker in response.text.lower(), path
            assert "/openapi.json" in response.text, path


async def test_every_service_has_health_readiness_and_metrics(platform):
    async with httpx.AsyncClient() as client:
        for name, base in platform.services().items():
            health = await client.get(f"{base}/healthz")
            assert health.status_code == 200, (name, health.text)
            assert health.json() == {"status": "ok", "service": name}

            ready = await client.get(f"{base}/readyz")
            assert ready.status_code == 200, (name, ready.text)
            body = ready.json()
            assert body["status"] == "ready"
            assert body["service"] == name
            assert body["checks"]["postgres"] == "ok"
            assert body["checks"]["redis"] == "ok"

            metrics = await client.get(f"{base}/metrics")
            assert metrics.status_code == 200, name
            assert metrics.headers["content-type"].startswith("text/plain")
            assert "# TYPE http_requests_total counter" in metrics.text
            # The requests above are counted by route template and status.
            counted = re.search(
                r'^http_requests_total\{[^}]*route="/healthz"[^}]*\} ([0-9.e+]+)$', metrics.text, re.MULTILINE
            )
            assert counted, f"{name}: /healthz not counted:\n{metrics.text[:2000]}"
            assert float(counted.group(1)) >= 1


async def test_correlation_id_sent_to_the_gateway_comes_back(platform):
    cid = f"test-{uuid.uuid4().hex}"
    async with httpx.AsyncClient(base_url=platform.gateway) as client:
        # Answered by the gateway itself, by a service behind it, and as an error.
        for path in ("/healthz", "/api/v1/prices?symbols=BTC", "/api/v1/prices?symbols=NOPE", "/api/v1/nope"):
            response = await client.get(path, headers={"X-Correlation-ID": cid})
            assert response.status_code != 500, (path, response.text)
            assert response.headers.get_list("x-correlation-id") == [cid], path
            names = [name.lower() for name, _value in response.headers.raw]
            assert len(names) == len(set(names)), f"{path}: a header is sent twice: {sorted(names)}"
        # Without one (or with an unusable one) the gateway makes one up and says which.
        fresh = await client.get("/healthz")
        made_up = fresh.headers.get_list("x-correlation-id")
        assert len(made_up) == 1 and re.fullmatch(r"[0-9a-f]{32}", made_up[0])
        bad = await client.get("/healthz", headers={"X-Correlation-ID": "not ok; <script>"})
        replaced = bad.headers.get_list("x-correlation-id")
        assert len(replaced) == 1 and replaced[0] != "not ok; <script>"


REDOC_VENDOR_LOGO = {"https://cdn.redoc.ly/redoc/logo-mini.svg"}


async def test_api_explorer_works_in_a_browser_without_leaving_the_machine(platform):
    executable = chromium_or_skip()
    from playwright.async_api import async_playwright, expect

    email_address = f"docs-{uuid.uuid4().hex[:8]}@example.com"
    password = "correct horse battery staple"
    async with httpx.AsyncClient(base_url=platform.gateway) as client:
        registered = await client.post("/api/v1/auth/register", json={"email": email_address, "password": password})
        assert registered.status_code == 201, registered.text

    requested: list[str] = []
    blocked: list[tuple[str, str | None]] = []
    logins: list[int] = []
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            page.on("request", lambda request: requested.append(request.url))
            page.on("requestfailed", lambda request: blocked.append((request.url, request.failure)))

            def record_login(response: Any) -> None:
                if response.url.endswith("/api/v1/auth/login"):
                    logins.append(response.status)

            page.on("response", record_login)

            await page.goto(f"{platform.gateway}/docs")
            # An operation block of a path merged from the pricing service.
            prices = page.locator(".opblock-get .opblock-summary-path[data-path='/api/v1/prices']")
            await expect(prices.first).to_be_visible(timeout=30_000)

            await page.locator(".auth-wrapper .btn.authorize").first.click()
            dialog = page.locator(".dialog-ux .modal-ux")
            await expect(dialog).to_be_visible()
            await dialog.locator("#oauth_username").fill(email_address)
            await dialog.locator("#oauth_password").fill(password)
            await dialog.locator(".auth-btn-wrapper .btn.authorize").first.click()
            # Swagger UI shows Logout once the token endpoint answered with a token.
            await expect(dialog.locator(".auth-btn-wrapper .btn", has_text="Logout").first).to_be_visible()
            assert logins == [200], logins

            await page.goto(f"{platform.gateway}/redoc")
            await expect(page.get_by_text("/api/v1/prices").first).to_be_visible(timeout=30_000)
            await expect(page.locator("h1", has_text="Coinlytics API").first).to_be_visible()
        finally:
            await browser.close()

    assert requested, "the browser recorded no request"
    # ReDoc's bundle hard-codes its vendor's logo; the page's Content-Security-Policy stops that one in the
    # browser, before any connection. Anything else addressed elsewhere is a leak, blocked or not.
    stopped_by_csp = {url for url, failure in blocked if failure and "csp" in failure.lower()}
    tolerated = REDOC_VENDOR_LOGO & stopped_by_csp
    outside = sorted({url for url in requested if not on_this_machine(url) and url not in tolerated})
    assert not outside, f"the explorer loaded from outside the machine: {outside}"


async def test_the_gateway_root_is_a_page_that_points_the_way(platform):
    async with httpx.AsyncClient(base_url=platform.gateway) as client:
        response = await client.get("/")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/html")
        links = [link for link in re.findall(r'href="([^"]+)"', response.text) if not link.startswith("#")]
        assert {"/docs", "/redoc", "/api/v1/status"} <= set(links)
        assert all(link.startswith("/") for link in links)  # nothing from outside
        # Every link is a route the gateway has (this platform runs no conversion service, and market data
        # may still answer 503 "no fresh data" this early: both are answers of a real route, not a 404).
        for link in links:
            status = (await client.get(link.replace("&amp;", "&"))).status_code
            assert status == 200 or (status in (502, 503) and link.startswith("/api/v1/")), (link, status)
