"""Routes of the gateway: status, the merged API explorer, and forwarding of /api/v1."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match, Route
from starlette.types import Scope

from services.gateway.guard import resolve
from services.gateway.schemas import StatusOut
from services.gateway.service import ROUTES, Upstreams, not_routed, owning_service
from shared.errors import Forbidden, Unauthorized, error_responses
from shared.service_app import lifespan_getter

router = APIRouter()

API_DESCRIPTION = """
Coinlytics: real-time crypto market data from many exchanges, consolidated into one trustworthy price.

Market-data reads work without a token. Errors always have the shape
`{"error": {"code": "...", "message": "...", "details": ...}}`.

Try it: `GET /api/v1/prices?symbols=BTC,ETH&vs=USD`.
"""


# Also called directly: the forwarding route is a plain Starlette route, without dependency injection.
_upstreams = lifespan_getter("upstreams", Upstreams)


@router.get(
    "/api/v1/status",
    response_model=StatusOut,
    tags=["operations"],
    summary="Platform status",
    description="Each service's readiness and each source's health. Example: `curl /api/v1/status`.",
    responses=error_responses(401, 429),
)
async def status(request: Request) -> StatusOut:
    await resolve(request)
    upstreams = _upstreams(request)
    services = await upstreams.readiness()
    sources_doc = await upstreams.fetch_json("ingest", "/api/v1/admin/sources")
    sources: list[dict[str, Any]] = (sources_doc or {}).get("sources", [])
    summary = {
        s["name"]: {
            "state": s.get("state"),
            "last_message_at": s.get("last_message_at"),
            "last_error": s.get("last_error"),
            "enabled": s.get("enabled", True),
        }
        for s in sources
    }
    ok = all(v["status"] == "ready" for v in services.values())
    connected = any(s.get("state") == "connected" for s in sources)
    overall = "ok" if ok and connected else "degraded"
    return StatusOut(status=overall, services=services, sources=summary)


@router.get("/openapi.json", include_in_schema=False)
async def openapi(request: Request) -> JSONResponse:
    app = request.app
    own = get_openapi(title="Coinlytics API", version=app.version, description=API_DESCRIPTION, routes=app.routes)
    return JSONResponse(await _upstreams(request).merged_spec(own))


async def forward(request: Request) -> Response:
    path: str = request.path_params["path"]
    # The decoded path, as the router matched the own routes against it.
    allowed = _own_methods_table(request).at(request.scope["path"])
    if allowed:
        # One of the gateway's own paths, asked with another method.
        raise StarletteHTTPException(405, headers={"Allow": ", ".join(sorted(allowed))})
    principal = await resolve(request)
    if path == "admin" or path.startswith("admin/"):
        # Deny by default: any admin path, routed or not, needs an administrator before anything else.
        if principal.user_id is None:
            raise Unauthorized("sign in as an administrator", headers={"WWW-Authenticate": "Bearer"})
        if not principal.is_admin:
            raise Forbidden("this route needs an administrator")
    service = owning_service(path)
    if service is None:
        raise not_routed(path)
    return await _upstreams(request).forward(request, service, principal)


class OwnMethods:
    """Which methods the gateway's own routes accept at a path, for the 405 of a forwarded request that
    names one of them with another method. Built once at startup: a dict for the fixed paths, and the
    (few) templated paths' regexes, instead of every route's regex on every forwarded request."""

    def __init__(self, routes: Iterable[APIRoute]) -> None:
        self._fixed: dict[str, set[str]] = {}
        self._templated: list[tuple[re.Pattern[str], set[str]]] = []
        for route in routes:
            methods = set(route.methods or ())
            if route.param_convertors:
                self._templated.append((route.path_regex, methods))
            else:
                self._fixed.setdefault(route.path, set()).update(methods)

    def at(self, path: str) -> set[str]:
        methods = set(self._fixed.get(path, ()))
        for pattern, more in self._templated:
            if pattern.match(path):
                methods |= more
        return methods


_own_methods_table = lifespan_getter("own_methods", OwnMethods)


def own_routes(*routers: APIRouter) -> list[APIRoute]:
    """The gateway's own documented routes, for 405 answers."""
    return [route for r in routers for route in r.routes if isinstance(route, APIRoute)]


FORWARD_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
# A plain Starlette route, not a FastAPI one: forwarding needs no parameter parsing or dependency solving,
# and it is the gateway's hot path. It goes last, after every documented route.
FORWARD_ROUTE = Route("/api/v1/{path:path}", forward, methods=FORWARD_METHODS, include_in_schema=False)


class ForwardFirstRoute(Route):
    """The forwarding route again, tried before every other route, for the first path segments that only a
    service owns (``/api/v1/prices/...``): the router then skips matching the request against each of the
    gateway's own routes. Anything else (another segment, another method, a root path) is left to the
    normal order, which ends at FORWARD_ROUTE."""

    def __init__(self, segments: frozenset[str]) -> None:
        super().__init__("/api/v1/{path:path}", forward, methods=FORWARD_METHODS, include_in_schema=False)
        self.segments = segments

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] == "http" and self.methods is not None and scope["method"] in self.methods:
            path: str = scope["path"]
            if path.startswith("/api/v1/") and path[8:].partition("/")[0] in self.segments:
                return super().matches(scope)
        return Match.NONE, {}


def service_only_segments(routes: Iterable[BaseRoute]) -> frozenset[str]:
    """The first segments after /api/v1/ of ROUTES that none of ``routes`` (the gateway's own, all of them)
    could answer; empty when a route's shape can't be told from its path (safe: the normal order then)."""
    segments = {prefix.partition("/")[0] for prefix in ROUTES}
    for route in routes:
        path = getattr(route, "path", None)
        if not isinstance(path, str):
            return frozenset()
        if not path.startswith("/api/v1/"):
            continue
        first = path[8:].partition("/")[0]
        if "{" in first:
            return frozenset()
        segments.discard(first)
    return frozenset(segments)
