"""Routes of the ingest service."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query

from services.ingest.schemas import ErrorEntryOut, ErrorsOut, SourceHealthOut, SourcePatch, SourcesOut
from services.ingest.service import IngestService
from shared.auth import Principal, require_admin
from shared.errors import error_responses
from shared.service_app import lifespan_state
from shared.timeparse import parse_time
from shared.validation import TIME_DESCRIPTION, TIME_SCHEMA

# Every ingest route is an admin route: the role is checked here as well as by the internal-auth middleware.
router = APIRouter(tags=["sources"], dependencies=[Depends(require_admin)])
Ingest = Annotated[IngestService, Depends(lifespan_state("ingest", IngestService))]


@router.get(
    "/api/v1/admin/sources",
    response_model=SourcesOut,
    summary="Health of every market-data source",
    responses=error_responses(401, 403),
)
async def list_sources(service: Ingest) -> SourcesOut:
    return SourcesOut(sources=[SourceHealthOut(**h) for h in await service.health()])


@router.patch(
    "/api/v1/admin/sources/{name}",
    response_model=SourceHealthOut,
    summary="Switch a source off or on at runtime",
    description='Body `{"enabled": false}` stops the source\'s loop at once (no restart), and the choice holds '
    'across restarts; `{"enabled": true}` starts it again. The answer comes once the loop has stopped or started. '
    "404 for a source ingest does not run; 409 for a scheduled job or a source its configuration keeps from "
    'starting.\n\nExample: `PATCH /api/v1/admin/sources/binance` with `{"enabled": false}`',
    responses=error_responses(401, 403, 404, 409, 422, 503),
)
async def patch_source(
    service: Ingest,
    body: SourcePatch,
    admin: Annotated[Principal, Depends(require_admin)],
    name: str = Path(max_length=50, examples=["binance"]),
) -> SourceHealthOut:
    return SourceHealthOut(**await service.set_enabled(name, body.enabled, changed_by=admin.user_id))


@router.get(
    "/api/v1/admin/errors",
    response_model=ErrorsOut,
    summary="Logged source failures, with counts per source",
    responses=error_responses(401, 403, 422),
)
async def list_errors(
    service: Ingest,
    source: str | None = Query(default=None, max_length=50, examples=["binance"]),
    since: str | None = Query(
        default=None, description=TIME_DESCRIPTION, json_schema_extra=TIME_SCHEMA, examples=["2026-11-25T00:00:00Z"]
    ),
    limit: int = Query(default=100, ge=1, le=1000),
) -> ErrorsOut:
    since_dt: datetime | None = parse_time(since, "since") if since is not None else None
    rows, counts = await service.errors(source=source, since=since_dt, limit=limit)
    return ErrorsOut(
        counts=counts,
        entries=[
            ErrorEntryOut(id=r.id, source=r.source, kind=r.kind, message=r.message, created_at=r.created_at)
            for r in rows
        ],
    )
