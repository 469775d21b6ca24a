"""Routes of the gateway: status, the merged API explorer, and forwarding of /api/v1."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route

from services.gateway.guard import resolve
from services.gateway.schemas import StatusOut
from services.gateway.service import Upstreams, not_routed, owning_service
from shared.errors import Forbidden, Unauthorized, error_responses
from shared.service_app import lifespan_state

router = APIRouter()

API_DESCRIPTION = """
Coinlytics: real-time crypto market data from many exchanges, consolidated into one trustworthy price.

Market-data reads work without a token. Errors always have the shape
`{"error": {"code": "...", "message": "...", "details": ...}}`.

Try it: `GET /api/v1/prices?symbols=BTC,ETH&vs=USD`.
"""


# Also called directly: the forwarding route is a plain Starlette route, without dependency injection.
_upstreams = lifespan_state("upstreams", Upstreams)
_own_routes = lifespan_state("own_routes", list)


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
    allowed = _own_methods(request)
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


def _own_methods(request: Request) -> set[str]:
    methods: set[str] = set()
    for route in _own_routes(request):
        if route.path_regex.match(request.url.path):
            methods |= route.methods or set()
    return methods


def own_routes(*routers: APIRouter) -> list[APIRoute]:
    """The gateway's own documented routes, for 405 answers."""
    return [route for r in routers for route in r.routes if isinstance(route, APIRoute)]


# A plain Starlette route, not a FastAPI one: forwarding needs no parameter parsing or dependency solving,
# and it is the gateway's hot path. It goes last, after every documented route.
FORWARD_ROUTE = Route(
    "/api/v1/{path:path}",
    forward,
    methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
    include_in_schema=False,
)
