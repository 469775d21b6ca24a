"""The gateway's merged API explorer and the operations endpoints every service has, with the pricing,
ingest and gateway apps running on real servers (ingest polling the recorded Binance payloads)."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest

from services.gateway.app import create_app as gateway_app
from services.ingest.app import create_app as ingest_app
from services.pricing.app import create_app as pricing_app
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
