"""Route of the log report: GET /api/v1/admin/report (administrators)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from services.gateway.guard import require_admin_principal
from services.gateway.reports.schemas import ReportOut
from services.gateway.reports.service import ReportService
from shared.auth import Principal
from shared.errors import error_responses
from shared.service_app import lifespan_state

router = APIRouter()

Reports = Annotated[ReportService, Depends(lifespan_state("reports", ReportService))]


@router.get(
    "/api/v1/admin/report",
    response_model=ReportOut,
    tags=["admin"],
    summary="Report of what the platform did in a window, from the system log (administrators)",
    description="Requests per route with p50/p95/p99 latency and error rates, task counts and failure rates, "
    "each source's uptime and errors, alert deliveries by outcome, stream reclaims and dead letters.\n\n"
    "Example: `GET /api/v1/admin/report?since=24h` (also `15m`, `7d`, or an ISO 8601 moment). "
    "`coinlytics report --since 24h --format html` draws the same as charts. A `since` older than the system "
    "log's retention starts the window there (`window_clamped`: true). One report is built at a time: a request "
    "that waits more than a few seconds for another's is answered 503 with Retry-After.",
    responses=error_responses(401, 403, 422, 429, 503),
)
async def report(
    reports: Reports,
    _admin: Principal = Depends(require_admin_principal),
    since: str = Query(
        default="24h", max_length=40, description="a span back from `until` (15m, 24h, 7d) or an ISO 8601 moment"
    ),
    until: str | None = Query(default=None, max_length=40, description="the window's end (default now)"),
) -> ReportOut:
    return await reports.report(since, until)
