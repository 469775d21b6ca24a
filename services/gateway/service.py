"""Gateway logic: which service owns a path, forwarding to it, the merged OpenAPI spec, status."""

from __future__ import annotations

import asyncio
import copy
import json
import time
from typing import Any

import aiohttp
import structlog
from fastapi import Request, Response
from yarl import URL

from services.gateway.guard import API_KEY_HEADERS
from services.gateway.memo import ReadMemo, Ticket
from shared.auth import INTERNAL_HEADERS, Principal, sign_internal
from shared.errors import BadGateway, GatewayTimeout, NotFound
from shared.logging import CORRELATION_HEADER, get_correlation_id
from shared.responses import MEMO_HEADER, MemoHint
from shared.service_app import ROUTE_HEADER, ROUTE_TEMPLATE_KEY, UPSTREAM_KEEPALIVE_SECONDS
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
OWN_RESPONSE_HEADERS = frozenset({CORRELATION_HEADER, ROUTE_HEADER, MEMO_HEADER, "date", "server"})
# A route template is short; anything longer is not one of ours.
MAX_TEMPLATE = 200
# Never passed on: the token (or API key) stays at the door, and identity travels only in the gateway's signature.
STRIPPED = HOP_BY_HOP | {"authorization", "cookie", *API_KEY_HEADERS, *INTERNAL_HEADERS}
# The same sets as bytes, compared with the ASGI scope's (already lower-case) header names and aiohttp's raw
# response headers without decoding every header first.
_STRIPPED_BYTES = frozenset(name.lower().encode() for name in STRIPPED | {CORRELATION_HEADER, "x-forwarded-for"})
_NOT_PASSED_BACK = frozenset(name.lower().encode() for name in HOP_BY_HOP | OWN_RESPONSE_HEADERS)
_ROUTE_HEADER_BYTES = ROUTE_HEADER.lower().encode()
_MEMO_HEADER_BYTES = MEMO_HEADER.encode()
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
    """A keep-alive connection pool to the internal services.

    aiohttp rather than httpx here: under load the gateway spent most of its CPU in httpx's connection
    pool bookkeeping (measured with py-spy while benchmarking conversions through the gateway)."""

    def __init__(self, settings: Settings, memo: ReadMemo | None = None) -> None:
        self.settings = settings
        self.memo = memo
        self.timeout = aiohttp.ClientTimeout(total=settings.upstream_timeout_seconds, sock_connect=2.0)
        self.session = aiohttp.ClientSession(
            # Closed before the service closes them (SERVICE_KEEPALIVE_SECONDS), never reused as they go.
            connector=aiohttp.TCPConnector(limit=200, limit_per_host=100, keepalive_timeout=UPSTREAM_KEEPALIVE_SECONDS),
            timeout=self.timeout,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        self.internal_key = settings.purpose_key("internal")
        self._spec: dict[str, Any] | None = None
        self._spec_at = 0.0
        self._spec_complete = False

    async def close(self) -> None:
        await self.session.close()

    async def forward(self, request: Request, service: str, principal: Principal) -> Response:
        """Passes the request on with the caller's identity in a signed credential instead of its token; or
        answers it from the read memo (services/gateway/memo.py) when the service said that would do."""
        path: str = request.scope["path"]
        memo = self.memo if request.method == "GET" else None
        memo_key = ""
        ticket: Ticket = (0, False)
        if memo is not None:
            memo_key = service + " " + (request.scope.get("raw_path") or path.encode()).decode("latin-1") + "?"
            memo_key += request.scope.get("query_string", b"").decode("latin-1")
            copy = memo.lookup(memo_key)
            if copy is not None:
                return _response(request, copy.status, copy.body, copy.headers, copy.template)
            ticket = memo.ticket()
        headers = {
            k.decode("latin-1"): v.decode("latin-1")
            for k, v in request.scope["headers"]
            if k.lower() not in _STRIPPED_BYTES
        }
        # The path and query as the client encoded them: a decoded "%3F" or "%23" would change the URL's meaning.
        raw_path = (request.scope.get("raw_path") or request.url.path.encode()).decode("latin-1")
        query = request.scope.get("query_string", b"").decode("latin-1")
        body = await request.body()
        # Bound to the query and body too, so a captured credential can't be replayed with other ones.
        # Signed over the decoded path exactly as the service's middleware reads it (scope["path"]);
        # request.url.path re-quotes some characters ("\\" as "%5C") and would never match.
        signed_path = request.scope.get("path", path)
        headers.update(sign_internal(self.internal_key, request.method, signed_path, principal, query=query, body=body))
        url = URL(self.settings.service_url(service) + raw_path + (f"?{query}" if query else ""), encoded=True)
        headers[CORRELATION_HEADER] = get_correlation_id() or ""
        # The client as the gateway resolved it (trusted proxies only): a caller's own X-Forwarded-For is not
        # passed on.
        headers["x-forwarded-for"] = request.client.host if request.client else ""
        try:
            async with self.session.request(
                request.method, url, headers=headers, data=body or None, allow_redirects=False
            ) as upstream:
                content = await upstream.read()
                status = upstream.status
                raw = upstream.raw_headers
        except TimeoutError:
            log.warning("upstream_timeout", service=service, path=request.url.path)
            raise GatewayTimeout(
                f"the {service} service did not answer in time", details={"service": service}
            ) from None
        except aiohttp.ClientError as exc:
            log.warning("upstream_unreachable", service=service, path=request.url.path, error=str(exc))
            raise BadGateway(f"the {service} service is unavailable", details={"service": service}) from None
        # The service's headers as bytes, passed on without decoding and re-encoding each one.
        passed: dict[bytes, bytes] = {}
        template: str | None = None
        hint: MemoHint | None = None
        for name, value in raw:
            lower = name.lower()
            if lower == _ROUTE_HEADER_BYTES:
                text = value.decode("latin-1")
                if text.startswith("/"):
                    template = text[:MAX_TEMPLATE]
            elif lower == _MEMO_HEADER_BYTES:
                hint = MemoHint.parse(value.decode("latin-1"))
            elif lower not in _NOT_PASSED_BACK:
                passed[lower] = value
        headers_out = list(passed.items())
        if memo is not None and hint is not None and status == 200:
            memo.store(memo_key, ticket, hint, status=status, body=content, headers=headers_out, template=template)
        return _response(request, status, content, headers_out, template)

    async def fetch_json(self, service: str, path: str, wait_seconds: float = 3.0) -> dict[str, Any] | None:
        headers = sign_internal(self.internal_key, "GET", path, GATEWAY_PRINCIPAL)
        try:
            async with self.session.get(
                self.settings.service_url(service) + path,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=wait_seconds),
            ) as response:
                data = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    async def readiness(self) -> dict[str, dict[str, Any]]:
        async def one(service: str) -> tuple[str, dict[str, Any]]:
            try:
                async with self.session.get(
                    self.settings.service_url(service) + "/readyz", timeout=aiohttp.ClientTimeout(total=3.0)
                ) as response:
                    status = response.status
                    body = await response.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                return service, {"status": "unreachable", "detail": type(exc).__name__}
            parsed = _safe_json(body)
            if status == 200:
                # The service's background tasks and their restarts, so a flapping one is visible while ready.
                tasks = parsed.get("tasks") if isinstance(parsed, dict) else None
                return service, {"status": "ready", "tasks": tasks} if tasks else {"status": "ready"}
            return service, {"status": "not_ready", "detail": parsed}

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


def _response(
    request: Request, status: int, content: bytes, headers: list[tuple[bytes, bytes]], template: str | None
) -> Response:
    """A service's answer as the gateway passes it back; the length is the one Response computes for it."""
    if template is not None:
        request.scope[ROUTE_TEMPLATE_KEY] = template
    response = Response(content=content, status_code=status)
    response.raw_headers = [*response.raw_headers, *headers]
    return response


def _safe_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return body[:200].decode("utf-8", "replace")


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
