"""Routes of the gateway: status, the merged API explorer, and forwarding of /api/v1."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse
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


@router.get("/", include_in_schema=False)
async def home() -> HTMLResponse:
    """Where a browser pointed at the gateway lands: what is here and where to start (no external assets)."""
    return HTMLResponse(HOME_PAGE)


@router.get("/reset-password", include_in_schema=False)
async def reset_password_page() -> HTMLResponse:
    """Where the emailed reset link lands; the token stays in the URL fragment, so no server log sees it."""
    return HTMLResponse(RESET_PAGE, headers={"Cache-Control": "no-store"})


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


RESET_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Reset your Coinlytics password</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body style="font-family: sans-serif; max-width: 28rem; margin: 3rem auto">
<h1>Choose a new password</h1>
<form id="f"><label>New password <input id="p" type="password" minlength="10" maxlength="256" required
 autocomplete="new-password"></label> <button>Save</button></form>
<p id="m" role="status"></p>
<script>
const token = new URLSearchParams(location.hash.slice(1)).get("token");
history.replaceState(null, "", location.pathname);
document.getElementById("f").addEventListener("submit", async (e) => {
  e.preventDefault();
  const r = await fetch("/api/v1/auth/password-reset/confirm", {method: "POST",
    headers: {"Content-Type": "application/json"},
    body: JSON.stringify({token, new_password: document.getElementById("p").value})});
  document.getElementById("m").textContent = r.status === 204
    ? "Done: sign in with your new password." : (await r.json()).error.message;
});
</script></body></html>
"""


HOME_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Coinlytics</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body style="font-family: sans-serif; max-width: 40rem; margin: 3rem auto; line-height: 1.5">
<h1>Coinlytics</h1>
<p>Self-hosted, real-time crypto market data: prices consolidated from many exchanges, conversions between any
crypto and fiat currency, history.</p>
<ul>
<li><a href="/docs">API explorer</a> (Swagger UI: try every endpoint, sign in with <em>Authorize</em>)</li>
<li><a href="/redoc">API reference</a> (ReDoc)</li>
<li><a href="/api/v1/status">Platform status</a>: each service and each source</li>
<li><a href="/api/v1/prices?symbols=BTC,ETH&amp;vs=USD,EUR">Prices of BTC and ETH</a>,
<a href="/api/v1/coins?vs=USD">tracked coins</a>,
<a href="/api/v1/convert?from=BTC&amp;to=EUR&amp;amount=1">1 BTC in EUR</a></li>
</ul>
<p>The live dashboard arrives here in a later release.</p>
</body></html>
"""
