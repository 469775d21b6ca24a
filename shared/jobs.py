"""Scheduled and queued jobs (arq), run inside the owning service's process by its lifespan."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import structlog
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.worker import Worker

from shared.settings import Settings

log = structlog.get_logger("jobs")


def arq_redis_settings(settings: Settings) -> RedisSettings:
    return RedisSettings.from_dsn(settings.require_redis_url())


def queue_name(settings: Settings, service: str) -> str:
    return settings.key("arq", service)


async def job_pool(settings: Settings) -> ArqRedis:
    return await create_pool(arq_redis_settings(settings))


@asynccontextmanager
async def run_worker(
    settings: Settings,
    service: str,
    *,
    functions: Sequence[Any] = (),
    cron_jobs: Sequence[Any] = (),
    ctx: dict[str, Any] | None = None,
    max_jobs: int = 4,
) -> AsyncIterator[Worker]:
    """An arq worker for ``service``'s queue as a task of the current event loop.

    Jobs get ``ctx`` (the service's resources) and must be idempotent: arq retries on failure and a
    cron run may repeat after a restart."""
    worker = Worker(
        functions=list(functions),
        cron_jobs=list(cron_jobs) or None,
        redis_settings=arq_redis_settings(settings),
        queue_name=queue_name(settings, service),
        ctx=dict(ctx or {}),
        handle_signals=False,
        max_jobs=max_jobs,
        keep_result=3600,
        health_check_key=queue_name(settings, service) + ":health",
        poll_delay=0.5,
    )
    task = asyncio.create_task(worker.async_run(), name=f"arq:{service}")
    log.info("job_worker_started", service=service, queue=queue_name(settings, service),
             cron=[getattr(c, "name", str(c)) for c in cron_jobs])  # fmt: skip
    try:
        yield worker
    finally:
        await worker.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
