"""Routes of the gateway: status, the merged API explorer, and forwarding of /api/v1."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse

from services.gateway.schemas import StatusOut
from services.gateway.service import Upstreams, not_routed, owning_service

router = APIRouter()

API_DESCRIPTION = """
Coinlytics: real-time crypto market data from many exchanges, consolidated into one trustworthy price.

Market-data reads work without a token. Errors always have the shape
`{"error": {"code": "...", "message": "...", "details": ...}}`.

Try it: `GET /api/v1/prices?symbols=BTC,ETH&vs=USD`.
"""


def _upstreams(request: Request) -> Upstreams:
    upstreams: Upstreams = request.app.state.upstreams
    return upstreams


@router.get("/api/v1/status", response_model=StatusOut, tags=["operations"], summary="Platform status")
async def status(request: Request) -> StatusOut:
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


@router.get("/docs", include_in_schema=False)
async def docs() -> HTMLResponse:
    return get_swagger_ui_html(openapi_url="/openapi.json", title="Coinlytics API explorer")


@router.get("/redoc", include_in_schema=False)
async def redoc() -> HTMLResponse:
    return get_redoc_html(openapi_url="/openapi.json", title="Coinlytics API reference")


@router.api_route("/api/v1/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
async def forward(path: str, request: Request) -> Response:
    service = owning_service(path)
    if service is None:
        raise not_routed(path)
    return await _upstreams(request).forward(request, service)
