"""Routes of the task monitor (administrators): ``/api/v1/admin/tasks*``."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path, Query, Response

from services.gateway.guard import require_admin_principal
from services.gateway.tasks_monitor.schemas import RetryOut, TaskJobOut, TasksOut
from services.gateway.tasks_monitor.service import TaskMonitor
from shared.auth import Principal
from shared.errors import error_responses
from shared.service_app import lifespan_state

router = APIRouter(tags=["admin"])

Monitor = Annotated[TaskMonitor, Depends(lifespan_state("tasks_monitor", TaskMonitor))]
Admin = Annotated[Principal, Depends(require_admin_principal)]
# arq job ids are free text; cron ids and ours (``<id>:retry:<hex>``) stay far below this.
JobId = Annotated[str, Path(min_length=1, max_length=300, description="the job's id")]


@router.get(
    "/api/v1/admin/tasks",
    response_model=TasksOut,
    summary="Task monitor: the job queues (administrators)",
    description="Per arq queue: live counts (queued and deferred from arq's own queue, running, and the "
    "completed, failed and retried runs of the last 24 hours), the queued jobs, the running ones and the "
    "recent completed and failed ones with their durations, attempts and errors, and the cron schedule "
    "with each job's last and next run. Example: `/api/v1/admin/tasks?queue=alerting-delivery&status=failed`.",
    responses=error_responses(401, 403, 404, 422, 429),
)
async def list_tasks(
    monitor: Monitor,
    _admin: Admin,
    queue: str | None = Query(default=None, max_length=100, description="one queue (see `queues[].name`)"),
    status: Literal["queued", "running", "completed", "failed"] | None = Query(
        default=None, description="list only the jobs in this state (the counts are always there)"
    ),
    limit: int = Query(default=50, ge=1, le=1000, description="jobs per list and queue"),
) -> TasksOut:
    return TasksOut.model_validate(await monitor.overview(queue=queue, status=status, limit=limit))


@router.get(
    "/api/v1/admin/tasks/{job_id}",
    response_model=TaskJobOut,
    summary="One job of the task monitor (administrators)",
    description="A job queued now or run in the last 24 hours. Example: `/api/v1/admin/tasks/cron:sweep_deliveries:"
    "1796133247123`.",
    responses=error_responses(401, 403, 404, 422, 429),
)
async def get_task(monitor: Monitor, _admin: Admin, job_id: JobId) -> TaskJobOut:
    return TaskJobOut.model_validate(await monitor.job(job_id))


@router.post(
    "/api/v1/admin/tasks/{job_id}/retry",
    status_code=202,
    response_model=RetryOut,
    summary="Run a failed job again (administrators)",
    description="Enqueues the failed job's function with the same arguments on the same queue, under a new job "
    "id (returned, 202). Jobs are idempotent, so this is safe. Once per failed job: asked again (a second click, "
    "two administrators at once), it answers 200 with the retry already made and its current status, and "
    "enqueues nothing. 404: no such job in the last 24 hours; 409: the job has not failed (queued, running or "
    "completed).",
    responses=error_responses(401, 403, 404, 409, 422, 429)
    | {200: {"model": RetryOut, "description": "the job was retried already: that retry"}},
)
async def retry_task(monitor: Monitor, _admin: Admin, job_id: JobId, response: Response) -> RetryOut:
    body, created = await monitor.retry(job_id)
    if not created:
        response.status_code = 200
    return RetryOut.model_validate(body)
