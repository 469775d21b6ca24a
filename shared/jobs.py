"""Scheduled and queued jobs (arq), run inside the owning service's process by its lifespan."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.typing import WorkerCoroutine
from arq.worker import Worker

from shared.db import BatchDelete, delete_in_batches
from shared.settings import Settings
from shared.supervisor import Supervisor

log = structlog.get_logger("jobs")


def arq_redis_settings(settings: Settings) -> RedisSettings:
    return RedisSettings.from_dsn(settings.require_redis_url())


def queue_name(settings: Settings, service: str) -> str:
    return settings.key("arq", service)


def supervise_worker(
    supervisor: Supervisor,
    settings: Settings,
    service: str,
    *,
    functions: Sequence[Any] = (),
    cron_jobs: Sequence[Any] = (),
    ctx: dict[str, Any] | None = None,
    max_jobs: int = 4,
    job_timeout: float = 300,
    poll_delay: float = 0.5,
) -> None:
    """An arq worker for ``service``'s queue, run (and restarted when it fails) by the service's supervisor.

    Jobs get ``ctx`` (the service's resources) and must be idempotent: arq retries on failure and a
    cron run may repeat after a restart."""
    if not functions and not cron_jobs:
        return  # arq refuses a worker with nothing to run

    async def run(stop: asyncio.Event) -> None:
        worker = Worker(
            functions=list(functions),
            cron_jobs=list(cron_jobs) or None,
            redis_settings=arq_redis_settings(settings),
            queue_name=queue_name(settings, service),
            ctx=dict(ctx or {}),
            handle_signals=False,
            max_jobs=max_jobs,
            # A worker that dies mid-job leaves it "in progress" for this long plus 10 s; then it runs again.
            job_timeout=job_timeout,
            keep_result=3600,
            health_check_key=queue_name(settings, service) + ":health",
            # arq polls its queue (no blocking pop): how long a queued job may wait for the worker to look.
            poll_delay=poll_delay,
        )
        log.info("job_worker_started", service=service, queue=queue_name(settings, service),
                 cron=[getattr(c, "name", str(c)) for c in cron_jobs])  # fmt: skip
        main = asyncio.create_task(worker.async_run(), name=f"arq:{service}")
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({main, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not main.done():
                await worker.close()
                main.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await main
            else:
                with contextlib.suppress(Exception):
                    await worker.close()
        if main.done() and not main.cancelled() and not stop.is_set():
            # arq's loop ended on its own (a Redis error it gave up on): the supervisor starts a new one.
            main.result()
            raise RuntimeError("the job worker stopped")

    supervisor.start(f"jobs:{service}", run)


class JobQueue:
    """Enqueues jobs for a service's worker (arq). A job id makes enqueueing idempotent: while a job with that
    id is queued, running, or its result is kept, enqueueing it again does nothing."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pool: ArqRedis | None = None

    async def start(self) -> None:
        if self.pool is None:
            self.pool = await create_pool(arq_redis_settings(self.settings), retry=0)

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.aclose()
            self.pool = None

    async def enqueue(
        self,
        service: str,
        function: str,
        *args: Any,
        job_id: str,
        defer_seconds: float | None = None,
        expires: timedelta | None = None,
    ) -> bool:
        """True when the job was queued, False when one with this id already exists. ``expires``: how long the
        job may wait in the queue, retries included (arq's default is a day)."""
        await self.start()
        assert self.pool is not None
        job = await self.pool.enqueue_job(
            function,
            *args,
            _job_id=job_id,
            _queue_name=queue_name(self.settings, service),
            _defer_by=timedelta(seconds=defer_seconds) if defer_seconds else None,
            _expires=expires,
        )
        return job is not None


RETENTION_BATCH = 5000


def retention_job(table: str, delete: BatchDelete, retention_days: Callable[[Settings], float]) -> WorkerCoroutine:
    """An arq job expiring ``table``, for the worker of the service that owns it: rows older than
    ``retention_days(settings)`` go, ``RETENTION_BATCH`` at a time (short transactions, no long locks).
    The job's context needs ``settings`` and ``sessions``."""

    async def expire(ctx: dict[str, Any]) -> dict[str, int]:
        settings: Settings = ctx["settings"]
        cutoff = datetime.now(UTC) - timedelta(days=retention_days(settings))
        deleted = await delete_in_batches(ctx["sessions"], delete, cutoff, RETENTION_BATCH)
        log.info("retention", table=table, deleted=deleted)
        return {table: deleted}

    expire.__name__ = expire.__qualname__ = f"{table}_retention"
    return expire
