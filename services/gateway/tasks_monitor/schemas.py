"""Response bodies of the task monitor (``/api/v1/admin/tasks*``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

JobStatus = Literal["queued", "running", "completed", "failed"]


class TaskJobOut(BaseModel):
    job_id: str = Field(examples=["alert-delivery:3f0c9a5e-1b7d-4c1e-9a53-0f9e3c2b7d11:0"])
    task: str = Field(description="the arq function (cron jobs: `cron:<name>`)", examples=["deliver_alert"])
    queue: str = Field(description="the queue's name (see `queues[].name`)", examples=["alerting-delivery"])
    status: JobStatus = Field(
        description="queued: waiting in arq's queue (a first run, the next attempt after a retryable failure, "
        "or a manual retry); running; completed; failed (no attempt left)",
        examples=["failed"],
    )
    attempt: int | None = Field(
        default=None, description="the run this record describes: 1 for the first, 2 after one retry, ...", examples=[3]
    )
    max_tries: int | None = Field(default=None, description="runs arq allows this job", examples=[50])
    enqueued_at: datetime | None = Field(default=None, examples=["2026-12-01T13:54:59.100000Z"])
    scheduled_for: datetime | None = Field(
        default=None, description="queued jobs: when the job is due (later than now for a deferred one)"
    )
    started_at: datetime | None = Field(default=None, examples=["2026-12-01T13:55:00.004000Z"])
    finished_at: datetime | None = Field(default=None, examples=["2026-12-01T13:55:00.250000Z"])
    duration_ms: float | None = Field(default=None, examples=[246.2])
    error: str | None = Field(
        default=None, description="the last attempt's error (truncated)", examples=["ConnectError: connection refused"]
    )
    will_retry: bool | None = Field(default=None, description="arq runs the job again after this failure")
    args: list[Any] | str | None = Field(
        default=None,
        description="the job's arguments: a JSON list, or their Python repr when they are not JSON",
        examples=[["3f0c9a5e-1b7d-4c1e-9a53-0f9e3c2b7d11", 0]],
    )
    # Named apart from ``kwargs`` in Python: pydantic's generated __init__ takes **kwargs.
    keyword_args: dict[str, Any] | str | None = Field(default=None, serialization_alias="kwargs", examples=[{}])
    retry_of: str | None = Field(default=None, description="the failed job this one retries (a manual retry)")
    retried_as: str | None = Field(default=None, description="the job that retried this failed one")


class QueueCounts(BaseModel):
    queued: int = Field(description="due now, waiting for a worker", examples=[2])
    deferred: int = Field(description="waiting for a later moment (a retry's backoff, a cron run)", examples=[1])
    running: int = Field(examples=[1])
    completed: int = Field(description="runs completed in the window", examples=[1440])
    failed: int = Field(description="jobs failed (no attempt left) in the window", examples=[3])
    retried: int = Field(description="failed runs arq runs again, in the window", examples=[12])


class CronOut(BaseModel):
    name: str = Field(examples=["cron:sweep_deliveries"])
    schedule: str = Field(
        description="the times it runs (arq's cron fields), in the worker's time zone",
        examples=["every minute at second=7"],
    )
    timezone: str = Field(examples=["UTC"])
    run_at_startup: bool = Field(examples=[True])
    next_run: datetime | None = Field(default=None, examples=["2026-12-01T13:56:07.123456Z"])
    last_run: datetime | None = Field(default=None, examples=["2026-12-01T13:55:07.130000Z"])
    last_status: Literal["completed", "failed", "retried"] | None = Field(default=None, examples=["completed"])
    last_job_id: str | None = Field(default=None, examples=["cron:sweep_deliveries:1796133307123"])
    last_duration_ms: float | None = Field(default=None, examples=[12.5])


class QueueOut(BaseModel):
    name: str = Field(examples=["alerting-delivery"])
    service: str | None = Field(default=None, description="the service whose worker runs it", examples=["alerting"])
    redis_key: str = Field(description="arq's sorted set of the queue", examples=["coinlytics:arq:alerting-delivery"])
    functions: list[str] = Field(default_factory=list, examples=[["deliver_alert"]])
    worker_started_at: datetime | None = Field(default=None, description="when a worker last started on it")
    counts: QueueCounts
    queued: list[TaskJobOut] = Field(description="next due first (queued and deferred)")
    running: list[TaskJobOut]
    completed: list[TaskJobOut] = Field(description="newest first")
    failed: list[TaskJobOut] = Field(description="newest first")
    cron: list[CronOut]


class TasksOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "generated_at": "2026-12-01T13:55:30Z",
                    "window_hours": 24,
                    "queues": [
                        {
                            "name": "alerting",
                            "service": "alerting",
                            "redis_key": "coinlytics:arq:alerting",
                            "functions": ["delete_expired_alerts", "sweep_deliveries"],
                            "worker_started_at": "2026-12-01T08:00:00Z",
                            "counts": {
                                "queued": 0,
                                "deferred": 1,
                                "running": 0,
                                "completed": 1440,
                                "failed": 1,
                                "retried": 0,
                            },
                            "queued": [],
                            "running": [],
                            "completed": [],
                            "failed": [
                                {
                                    "job_id": "cron:sweep_deliveries:1796133247123",
                                    "task": "cron:sweep_deliveries",
                                    "queue": "alerting",
                                    "status": "failed",
                                    "attempt": 1,
                                    "max_tries": 1,
                                    "started_at": "2026-12-01T13:54:07.130000Z",
                                    "finished_at": "2026-12-01T13:54:07.190000Z",
                                    "duration_ms": 60.1,
                                    "error": "OperationalError: connection refused",
                                    "will_retry": False,
                                    "args": [],
                                    "kwargs": {},
                                }
                            ],
                            "cron": [
                                {
                                    "name": "cron:sweep_deliveries",
                                    "schedule": "every minute at second=7",
                                    "timezone": "UTC",
                                    "run_at_startup": True,
                                    "next_run": "2026-12-01T13:56:07.123456Z",
                                    "last_run": "2026-12-01T13:55:07.130000Z",
                                    "last_status": "completed",
                                }
                            ],
                        }
                    ],
                }
            ]
        }
    )

    generated_at: datetime
    window_hours: int = Field(description="completed, failed and retried count this many hours", examples=[24])
    queues: list[QueueOut]


class RetryOut(BaseModel):
    job_id: str = Field(description="the new job's id", examples=["cron:sweep_deliveries:1796133247123:retry:5d1f0a"])
    retry_of: str = Field(examples=["cron:sweep_deliveries:1796133247123"])
    task: str = Field(examples=["cron:sweep_deliveries"])
    queue: str = Field(examples=["alerting"])
    status: JobStatus = Field(
        default="queued", description="the retry's status: queued when made; now, when it was made before (200)"
    )
