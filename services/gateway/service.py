"""Gateway logic: which service owns a path, forwarding to it, the merged OpenAPI spec, status."""

from __future__ import annotations

import asyncio
import copy
import time
from typing import Any

import httpx
import structlog
from fastapi import Request, Response

from shared.auth import INTERNAL_HEADERS, Principal, sign_internal
from shared.errors import BadGateway, GatewayTimeout, NotFound
from shared.logging import CORRELATION_HEADER, get_correlation_id
from shared.settings import Settings

log = structlog.get_logger("gateway")

SERVICES = ("ingest", "pricing", "conversion", "analytics", "alerting")

# First path segment(s) after /api/v1 -> owning service. Longest prefix wins.
ROUTES: dict[str, str] = {
    "prices": "pricing",
    "coins": "pricing",
    "convert": "conversion",
    "rates": "conversion",
    "analytics": "analytics",
    "charts": "analytics",
    "alerts": "alerting",
    "admin/sources": "ingest",
    "admin/errors": "ingest",
    "admin/coins": "pricing",
}
HOP_BY_HOP = frozenset(
    {
        "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
        "transfer-encoding", "upgrade", "host", "content-length", "content-encoding",
    }
)  # fmt: skip
# Set on every response by the gateway itself (its correlation-id middleware, its server): a service's are not
# passed on, or the client would get each twice.
OWN_RESPONSE_HEADERS = frozenset({CORRELATION_HEADER, "date", "server"})
# Never passed on: the token stays at the door, and identity travels only in the gateway's signature.
STRIPPED = HOP_BY_HOP | {"authorization", "cookie", *INTERNAL_HEADERS}
GATEWAY_PRINCIPAL = Principal(user_id="gateway", role="service")
SPEC_TTL_SECONDS = 30.0


def owning_service(path: str) -> str | None:
    """``path`` is what follows ``/api/v1/``."""
    best: tuple[int, str] | None = None
    for prefix, service in ROUTES.items():
        if (path == prefix or path.startswith(prefix + "/")) and (best is None or len(prefix) > best[0]):
            best = (len(prefix), service)
    return best[1] if best else None


class Upstreams:
    """A keep-alive connection pool to the internal services."""

    def __init__(self, settings: Settings, client: httpx.AsyncClient | None = None) -> None:
        self.settings = settings
        self.client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(settings.upstream_timeout_seconds, connect=2.0),
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=50, keepalive_expiry=30),
            follow_redirects=False,
        )
        self._spec: dict[str, Any] | None = None
        self._spec_at = 0.0
        self._spec_complete = False

    async def close(self) -> None:
        await self.client.aclose()

    async def forward(self, request: Request, service: str, principal: Principal) -> Response:
        """Passes the request on with the caller's identity in a signed credential instead of its token."""
        path = request.url.path
        headers = {k: v for k, v in request.headers.items() if k.lower() not in STRIPPED}
        headers.update(sign_internal(self.settings.hmac_key_bytes(), request.method, path, principal))
        # The path as the client encoded it: a decoded "%3F" or "%23" would otherwise change the URL's meaning.
        raw_path = request.scope.get("raw_path") or path.encode()
        url = self.settings.service_url(service) + raw_path.decode("latin-1")
        headers[CORRELATION_HEADER] = get_correlation_id() or ""
        client_host = request.client.host if request.client else ""
        prior = request.headers.get("x-forwarded-for")
        headers["x-forwarded-for"] = f"{prior}, {client_host}" if prior else client_host
        body = await request.body()
        try:
            upstream = await self.client.request(
                request.method, url, params=str(request.query_params), headers=headers, content=body
            )
        except httpx.TimeoutException:
            log.warning("upstream_timeout", service=service, path=request.url.path)
            raise GatewayTimeout(
                f"the {service} service did not answer in time", details={"service": service}
            ) from None
        except httpx.TransportError as exc:
            log.warning("upstream_unreachable", service=service, path=request.url.path, error=str(exc))
            raise BadGateway(f"the {service} service is unavailable", details={"service": service}) from None
        passed = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP | OWN_RESPONSE_HEADERS}
        return Response(content=upstream.content, status_code=upstream.status_code, headers=passed)

    async def fetch_json(self, service: str, path: str, wait_seconds: float = 3.0) -> dict[str, Any] | None:
        headers = sign_internal(self.settings.hmac_key_bytes(), "GET", path, GATEWAY_PRINCIPAL)
        try:
            response = await self.client.get(
                self.settings.service_url(service) + path, headers=headers, timeout=wait_seconds
            )
            data = response.json()
        except (httpx.HTTPError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    async def readiness(self) -> dict[str, dict[str, Any]]:
        async def one(service: str) -> tuple[str, dict[str, Any]]:
            try:
                response = await self.client.get(self.settings.service_url(service) + "/readyz", timeout=3.0)
            except httpx.HTTPError as exc:
                return service, {"status": "unreachable", "detail": type(exc).__name__}
            if response.status_code == 200:
                return service, {"status": "ready"}
            return service, {"status": "not_ready", "detail": _safe_json(response)}

        results = await asyncio.gather(*(one(s) for s in SERVICES))
        return dict(results)

    async def merged_spec(self, own: dict[str, Any]) -> dict[str, Any]:
        now = time.monotonic()
        fresh_enough = now - self._spec_at < (SPEC_TTL_SECONDS if self._spec_complete else 3.0)
        if self._spec is not None and fresh_enough:
            return self._spec
        specs = await asyncio.gather(*(self.fetch_json(s, "/openapi.json") for s in SERVICES))
        merged = merge_specs(own, dict(zip(SERVICES, specs, strict=True)))
        self._spec, self._spec_at = merged, now
        self._spec_complete = all(s is not None for s in specs)
        return merged


def _safe_json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text[:200]


def merge_specs(own: dict[str, Any], services: dict[str, dict[str, Any] | None]) -> dict[str, Any]:
    """The gateway's spec plus every service's public (/api/v1) paths and the schemas they use."""
    merged = copy.deepcopy(own)
    paths: dict[str, Any] = merged.setdefault("paths", {})
    schemas: dict[str, Any] = merged.setdefault("components", {}).setdefault("schemas", {})
    missing = []
    for service, spec in services.items():
        if spec is None:
            missing.append(service)
            continue
        own_schemas: dict[str, Any] = spec.get("components", {}).get("schemas", {})
        # Two services may both name a model e.g. "SourcesOut": the later one is renamed, refs included.
        renames = {
            name: f"{service}_{name}"
            for name, schema in own_schemas.items()
            if name in schemas and schemas[name] != schema
        }
        spec = _rename_refs(spec, renames) if renames else spec
        for path, item in spec.get("paths", {}).items():
            if path.startswith("/api/v1/") and owning_service(path.removeprefix("/api/v1/")) == service:
                paths[path] = item
        for name, schema in spec.get("components", {}).get("schemas", {}).items():
            schemas.setdefault(renames.get(name, name), schema)
        for name, scheme in spec.get("components", {}).get("securitySchemes", {}).items():
            merged["components"].setdefault("securitySchemes", {}).setdefault(name, scheme)
    if missing:
        merged.setdefault("info", {})["x-unavailable-services"] = missing
    return merged


def _rename_refs(node: Any, renames: dict[str, str]) -> Any:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str) and value.startswith("#/components/schemas/"):
                name = value.removeprefix("#/components/schemas/")
                out[key] = "#/components/schemas/" + renames.get(name, name)
            else:
                out[key] = _rename_refs(value, renames)
        return out
    if isinstance(node, list):
        return [_rename_refs(item, renames) for item in node]
    return node


def not_routed(path: str) -> NotFound:
    return NotFound(f"no such endpoint: /api/v1/{path}")
