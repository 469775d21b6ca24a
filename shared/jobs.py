"""Scheduled and queued jobs (arq), run inside the owning service's process by its lifespan.

The task monitor (Flower's job for arq). Every run of a job or cron job of a worker started by
``supervise_worker`` goes through a wrapper that logs ``task_started`` / ``task_completed`` / ``task_failed``,
observes ``job_duration_seconds{task,outcome}`` and ``jobs_total{task,queue,outcome}`` (outcome: completed,
failed, retried) in the service's registry, and records the run in Redis for the gateway's task monitor
(services/gateway/tasks_monitor). Recording is best effort: a Redis error is logged and the job goes on.

A queue is named by the ``service`` argument of ``supervise_worker`` ("alerting", "alerting-delivery", ...);
arq's own sorted set of it is ``queue_name(settings, queue)``. The monitor's keys, all in the deployment's
namespace (``<ns>`` is ``settings.redis_namespace``, built with ``settings.key``, see ``TaskKeys``):

- ``<ns>:tasks:job:<job id>``: hash, one per job, expiring 24 h after its last change: ``task``, ``queue``,
  ``status`` (``queued``: waiting for arq's next attempt or a manual retry's first; ``running``,
  ``completed``, ``failed``), ``enqueued_at``, ``started_at``, ``finished_at`` (ISO 8601 UTC),
  ``duration_ms``, ``attempt``, ``max_tries``, ``will_retry`` (1/0), ``error`` (truncated), ``args`` and
  ``kwargs`` (JSON, or their repr when they are not JSON-serialisable: ``args_json`` 1/0 says which), and for
  a manual retry ``retry_of`` (on the new job) and ``retried_as`` (on the failed one, set with HSETNX before
  the new job is enqueued: one retry per failed job, however many administrators click).
  arq settles some jobs without calling the wrapper (a worker killed mid-job whose job has no try left when
  the next worker takes it, an abort before the start, an expired job): their record stays ``running`` or
  ``queued``; the monitor reads the outcome from arq's result (or, gone, reports the worker's death).
- ``<ns>:tasks:queue:<queue>:running``: sorted set, job id -> start (Unix ms).
- ``<ns>:tasks:queue:<queue>:completed`` and ``...:failed``: sorted sets, job id -> finish (Unix ms), each the
  last 1000 of the past 24 h (failures apart, so a busy cron job's successes never push them out).
- ``<ns>:tasks:queue:<queue>:counts:<yyyymmddHH>``: hash, completed / failed / retried runs in that UTC hour,
  expiring after 25 h: the monitor sums the last 24.
- ``<ns>:tasks:queues``: hash, queue -> JSON ``{queue, service, redis_key, functions, max_tries, timezone,
  started_at}``, written when a worker starts.
- ``<ns>:tasks:queue:<queue>:cron``: hash, cron job name -> JSON ``{name, schedule, timezone, run_at_startup,
  next_run, last_run, last_status, last_job_id, last_duration_ms}``, written when the worker starts and after
  each cron run.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any

import structlog
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.cron import CronJob, next_cron
from arq.typing import WorkerCoroutine
from arq.worker import Function, Retry, Worker, func
from prometheus_client import CollectorRegistry, Counter, Histogram
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from shared.db import BatchDelete, delete_in_batches
from shared.settings import Settings
from shared.supervisor import Supervisor
from shared.timeparse import iso_z

log = structlog.get_logger("jobs")


def arq_redis_settings(settings: Settings) -> RedisSettings:
    return RedisSettings.from_dsn(settings.require_redis_url())


def queue_name(settings: Settings, service: str) -> str:
    return settings.key("arq", service)


# --- the task monitor ----------------------------------------------------------------------------------------

TASK_RECORD_TTL = timedelta(hours=24)
# Each list (completed, failed) keeps this many jobs of a queue within the record TTL.
RECENT_JOBS = 1000
COUNT_WINDOW_HOURS = 24
ERROR_MAX_CHARS = 1000
ARGS_MAX_CHARS = 4000
# A record may take this long; past it the job goes on without (a stalled Redis must not stall the jobs).
RECORD_TIMEOUT = 2.0
# arq's default, passed explicitly because the monitor reports it and decides ``will_retry`` with it.
WORKER_MAX_TRIES = 5
# The wrapper enforces a job's timeout itself, so that it can tell a timeout (a failure) from a cancellation
# (the worker stopping: arq runs the job again); arq's own timeout is set this much later and never fires first.
TIMEOUT_GRACE = 5.0
# arq keeps a started job's in-progress key this long past the worker's longest job timeout (its own constant).
ARQ_IN_PROGRESS_EXTRA = 10.0
JOB_DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
CRON_FIELDS = ("month", "day", "weekday", "hour", "minute", "second")


class TaskKeys:
    """The monitor's Redis keys (see the module docstring), for the writer here and the gateway's reader."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def job(self, job_id: str) -> str:
        return self.settings.key("tasks", "job", job_id)

    def queues(self) -> str:
        return self.settings.key("tasks", "queues")

    def running(self, queue: str) -> str:
        return self.settings.key("tasks", "queue", queue, "running")

    def finished(self, queue: str, status: str) -> str:
        """The completed or failed jobs of ``queue``."""
        return self.settings.key("tasks", "queue", queue, status)

    def cron(self, queue: str) -> str:
        return self.settings.key("tasks", "queue", queue, "cron")

    def counts(self, queue: str, at: datetime) -> str:
        return self.settings.key("tasks", "queue", queue, "counts", at.astimezone(UTC).strftime("%Y%m%d%H"))

    def count_window(self, queue: str, now: datetime) -> list[str]:
        """The hourly counters covering the last ``COUNT_WINDOW_HOURS`` hours, the current one included."""
        return [self.counts(queue, now - timedelta(hours=h)) for h in range(COUNT_WINDOW_HOURS)]


def truncate(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, an ellipsis saying so (records stay small, errors readable)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def encode_arguments(args: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple[str, str, bool]:
    """A job's arguments for its record: JSON (True) when they serialise and fit, so that a retry can use them
    again; else their repr (False), for reading only. JSON turns tuples into lists: jobs take plain values."""
    try:
        args_text, kwargs_text = json.dumps(list(args)), json.dumps(dict(kwargs))
    except (TypeError, ValueError):
        args_text, kwargs_text = repr(tuple(args)), repr(dict(kwargs))
    else:
        if len(args_text) <= ARGS_MAX_CHARS and len(kwargs_text) <= ARGS_MAX_CHARS:
            return args_text, kwargs_text, True
    return truncate(args_text, ARGS_MAX_CHARS), truncate(kwargs_text, ARGS_MAX_CHARS), False


def cron_schedule(job: CronJob) -> str:
    """A cron job's times in words: "every minute", "every minute at second=7", "hour=3 minute=47"."""
    spec = {name: getattr(job, name) for name in CRON_FIELDS if getattr(job, name) is not None}

    def value(v: Any) -> str:
        return ",".join(str(x) for x in sorted(v)) if isinstance(v, set | list | tuple) else str(v)

    if set(spec) <= {"second"}:
        second = spec.get("second")
        return "every minute" if second in (None, 0) else f"every minute at second={value(second)}"
    if spec.get("second") == 0:
        del spec["second"]  # the default: "minute=17" rather than "minute=17 second=0"
    return " ".join(f"{name}={value(v)}" for name, v in spec.items())


def in_progress_expiry(job_timeout: float) -> float:
    """Seconds arq's in-progress key of a job lasts once a worker takes it, for a worker whose longest job
    timeout (``supervise_worker``'s ``job_timeout`` or a function's own) is ``job_timeout``: a job whose worker
    died waits that long before another worker may take it (and run it again, or fail it: no try left)."""
    return job_timeout + TIMEOUT_GRACE + ARQ_IN_PROGRESS_EXTRA


def _ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


class JobMetrics:
    """``job_duration_seconds`` and ``jobs_total``: one set per registry, shared by the service's workers."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.duration = Histogram(
            "job_duration_seconds", "Run time of arq jobs", ["task", "outcome"], registry=registry,
            buckets=JOB_DURATION_BUCKETS,
        )  # fmt: skip
        self.total = Counter("jobs_total", "Runs of arq jobs", ["task", "queue", "outcome"], registry=registry)

    @classmethod
    def of(cls, supervisor: Supervisor) -> JobMetrics:
        """The set of ``supervisor``'s registry, kept on the supervisor: a service with two workers (alerting)
        shares one."""
        if supervisor.job_metrics is None:
            supervisor.job_metrics = cls(supervisor.registry)  # registry None: counted, exported nowhere
        return supervisor.job_metrics


class TaskRecorder:
    """Writes one queue's records (the keys in the module docstring). Every write is bounded in time and
    never raises: a failure is logged and the job goes on."""

    def __init__(self, settings: Settings, queue: str) -> None:
        self.keys = TaskKeys(settings)
        self.queue = queue

    async def _write(self, redis: Redis, what: str, job_id: str, build: Callable[[Pipeline], None]) -> None:
        try:
            async with asyncio.timeout(RECORD_TIMEOUT):
                async with redis.pipeline(transaction=False) as pipe:
                    build(pipe)
                    await pipe.execute()
        except Exception as exc:
            log.warning("task_record_failed", queue=self.queue, job_id=job_id, what=what,
                        error=truncate(f"{type(exc).__name__}: {exc}", ERROR_MAX_CHARS))  # fmt: skip

    async def started(self, redis: Redis, job_id: str, fields: Mapping[str, str | int | float], at: datetime) -> None:
        key, running = self.keys.job(job_id), self.keys.running(self.queue)

        def build(pipe: Pipeline) -> None:
            pipe.hdel(key, "finished_at", "duration_ms", "will_retry")
            pipe.hset(key, mapping={**fields, "queue": self.queue, "status": "running"})
            pipe.expire(key, TASK_RECORD_TTL)
            pipe.zadd(running, {job_id: _ms(at)})
            # A worker killed mid-job leaves its entry; the day's TTL bounds what such leftovers add up to.
            pipe.zremrangebyscore(running, "-inf", _ms(at - TASK_RECORD_TTL))

        await self._write(redis, "started", job_id, build)

    async def finished(
        self,
        redis: Redis,
        job_id: str,
        outcome: str,
        fields: Mapping[str, str | int | float],
        at: datetime,
        status: str | None = None,
    ) -> None:
        """``outcome``: completed, failed, or retried (the job waits in arq's queue for its next attempt), as
        counted; ``status``: the record's, when it is not the outcome's (a last try cut short by a stopping
        worker has failed, but arq keeps it queued until a worker takes it again and fails it)."""
        key = self.keys.job(job_id)
        status = status or ("queued" if outcome == "retried" else outcome)
        counts = self.keys.counts(self.queue, at)

        def build(pipe: Pipeline) -> None:
            pipe.hset(key, mapping={**fields, "status": status})
            pipe.expire(key, TASK_RECORD_TTL)
            pipe.zrem(self.keys.running(self.queue), job_id)
            for kind in ("completed", "failed"):
                listed = self.keys.finished(self.queue, kind)
                if kind == outcome:
                    pipe.zadd(listed, {job_id: _ms(at)})
                    pipe.zremrangebyscore(listed, "-inf", _ms(at - TASK_RECORD_TTL))
                    pipe.zremrangebyrank(listed, 0, -(RECENT_JOBS + 1))
                else:
                    pipe.zrem(listed, job_id)  # a job id run again (a sweep's re-enqueue) is listed once
            pipe.hincrby(counts, outcome, 1)
            pipe.expire(counts, timedelta(hours=COUNT_WINDOW_HOURS + 1))

        await self._write(redis, "finished", job_id, build)

    async def announce(self, redis: Redis, info: Mapping[str, Any], crons: Mapping[str, dict[str, Any]]) -> None:
        """The queue and its cron schedule, when the worker starts. Keeps each cron job's last run: another
        replica (or this worker before a restart) may have run it."""
        try:
            async with asyncio.timeout(RECORD_TIMEOUT):
                await redis.hset(self.keys.queues(), self.queue, json.dumps(dict(info)))
                if crons:
                    previous = await redis.hmget(self.keys.cron(self.queue), list(crons))
                    merged = {}
                    for (name, entry), old in zip(crons.items(), previous, strict=True):
                        last = json.loads(old) if old else {}
                        kept = {k: v for k, v in last.items() if isinstance(k, str) and k.startswith("last_")}
                        merged[name] = json.dumps({**entry, **kept})
                    await redis.hset(self.keys.cron(self.queue), mapping=merged)
        except Exception as exc:
            log.warning("task_record_failed", queue=self.queue, what="announce",
                        error=truncate(f"{type(exc).__name__}: {exc}", ERROR_MAX_CHARS))  # fmt: skip

    async def cron_ran(self, redis: Redis, name: str, entry: Mapping[str, Any]) -> None:
        key = self.keys.cron(self.queue)

        def build(pipe: Pipeline) -> None:
            pipe.hset(key, name, json.dumps(dict(entry)))

        await self._write(redis, "cron", name, build)


class _WorkerMonitor:
    """Wraps one worker's functions and cron jobs (a fresh set per worker run: arq keeps each cron job's next
    run on its object)."""

    def __init__(self, recorder: TaskRecorder, metrics: JobMetrics, job_timeout: float) -> None:
        self.recorder = recorder
        self.metrics = metrics
        self.job_timeout = job_timeout
        self.queue = recorder.queue
        self.crons: list[CronJob] = []
        self.timezone: tzinfo = UTC
        # The arq worker running the wrapped functions, once built: it tells an abort from a stop.
        self.worker: Worker | None = None

    def function(self, item: Any) -> Function:
        function = func(item)
        timeout = function.timeout_s if function.timeout_s is not None else self.job_timeout
        max_tries = function.max_tries if function.max_tries is not None else WORKER_MAX_TRIES
        return dataclasses.replace(
            function,
            coroutine=self._wrap(function.name, function.coroutine, timeout, max_tries, None),
            timeout_s=timeout + TIMEOUT_GRACE if timeout else None,
        )

    def cron(self, job: CronJob) -> CronJob:
        timeout = job.timeout_s if job.timeout_s is not None else self.job_timeout
        max_tries = job.max_tries if job.max_tries is not None else WORKER_MAX_TRIES
        copy = dataclasses.replace(job, next_run=None)
        copy.coroutine = self._wrap(job.name, job.coroutine, timeout, max_tries, copy)
        copy.timeout_s = timeout + TIMEOUT_GRACE if timeout else None
        self.crons.append(copy)
        return copy

    def cron_entry(self, job: CronJob, now: datetime) -> dict[str, Any]:
        upcoming = job.next_run
        if upcoming is None:
            # Not scheduled yet (before the worker's first heartbeat): arq's own rule for the first run.
            upcoming = now if job.run_at_startup else next_cron(
                now, month=job.month, day=job.day, weekday=job.weekday, hour=job.hour, minute=job.minute,
                second=job.second, microsecond=job.microsecond,
            )  # fmt: skip
        return {
            "name": job.name,
            "schedule": cron_schedule(job),
            "timezone": str(self.timezone),
            "run_at_startup": job.run_at_startup,
            "next_run": iso_z(upcoming),
        }

    async def announce(self, ctx: dict[str, Any], service: str, redis_key: str, functions: list[str]) -> None:
        now = datetime.now(self.timezone)
        info = {
            "queue": self.queue, "service": service, "redis_key": redis_key, "functions": functions,
            "timezone": str(self.timezone), "started_at": iso_z(now),
        }  # fmt: skip
        crons = {job.name: self.cron_entry(job, now) for job in self.crons}
        await self.recorder.announce(ctx["redis"], info, crons)

    def _wrap(
        self, task: str, coroutine: WorkerCoroutine, timeout: float | None, max_tries: int, cron: CronJob | None
    ) -> WorkerCoroutine:
        queue, recorder, metrics = self.queue, self.recorder, self.metrics

        async def monitored(ctx: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            job_id = str(ctx.get("job_id", ""))
            attempt = int(ctx.get("job_try") or 1)
            redis: Redis | None = ctx.get("redis")
            enqueued: datetime | None = ctx.get("enqueue_time")
            started_at = datetime.now(UTC)
            clock = time.perf_counter()
            log.info("task_started", task=task, job_id=job_id, queue=queue, attempt=attempt)
            if redis is not None:
                args_text, kwargs_text, as_json = encode_arguments(args, kwargs)
                fields: dict[str, str | int | float] = {
                    "task": task, "attempt": attempt, "max_tries": max_tries,
                    "enqueued_at": iso_z(enqueued) if isinstance(enqueued, datetime) else "",
                    "started_at": iso_z(started_at), "args": args_text, "kwargs": kwargs_text,
                    "args_json": int(as_json),
                }  # fmt: skip
                await recorder.started(redis, job_id, fields, started_at)
            outcome, error, status = "failed", "the job was interrupted", None
            deadline = asyncio.timeout(timeout or None)
            try:
                async with deadline:
                    result = await coroutine(ctx, *args, **kwargs)
                outcome, error = "completed", ""
                return result
            except asyncio.CancelledError:
                if self.worker is not None and job_id in self.worker.aborting_tasks:
                    # Job.abort(): arq finishes the job as failed, it never runs again.
                    outcome, error = "failed", "CancelledError: the job was aborted"
                else:
                    # The worker is stopping: arq keeps the job queued; the next worker to take it runs it
                    # while tries remain, else fails it without calling this wrapper (the monitor reads that
                    # from arq's result).
                    outcome, status = ("retried" if attempt < max_tries else "failed"), "queued"
                    error = "CancelledError: the worker stopped during the job"
                    if outcome == "failed":
                        error += " (its last try: arq fails it when a worker takes it again)"
                raise
            except Exception as exc:
                if isinstance(exc, Retry):
                    outcome = "retried" if attempt < max_tries else "failed"
                    delay = f" in {exc.defer_score / 1000:g} s" if exc.defer_score else ""
                    error = f"Retry: arq runs it again{delay}" if outcome == "retried" else "Retry: no tries left"
                else:
                    outcome = "failed"
                    if isinstance(exc, TimeoutError) and deadline.expired():
                        error = f"TimeoutError: the job ran past its {timeout:g} s timeout"
                    else:
                        error = f"{type(exc).__name__}: {exc}"
                raise
            finally:
                finished_at = datetime.now(UTC)
                duration_ms = round((time.perf_counter() - clock) * 1000, 3)
                error = truncate(error, ERROR_MAX_CHARS)
                if outcome == "completed":
                    log.info("task_completed", task=task, job_id=job_id, queue=queue, attempt=attempt,
                             duration_ms=duration_ms)  # fmt: skip
                else:
                    # A retry to come is routine (a webhook's backoff); a job given up on is an error.
                    emit = log.warning if outcome == "retried" else log.error
                    emit("task_failed", task=task, job_id=job_id, queue=queue, attempt=attempt,
                         duration_ms=duration_ms, error=error, will_retry=outcome == "retried")  # fmt: skip
                metrics.duration.labels(task, outcome).observe(duration_ms / 1000)
                metrics.total.labels(task, queue, outcome).inc()
                if redis is not None:
                    done: dict[str, str | int | float] = {
                        "finished_at": iso_z(finished_at), "duration_ms": duration_ms, "error": error,
                        "will_retry": int(outcome == "retried"),
                    }  # fmt: skip
                    await recorder.finished(redis, job_id, outcome, done, finished_at, status)
                    if cron is not None:
                        entry = self.cron_entry(cron, datetime.now(self.timezone))
                        entry.update(last_run=iso_z(started_at), last_status=outcome, last_job_id=job_id,
                                     last_duration_ms=duration_ms)  # fmt: skip
                        await recorder.cron_ran(redis, cron.name, entry)

        monitored.__name__ = monitored.__qualname__ = f"monitored_{task}"
        return monitored


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

    Jobs get ``ctx`` (the service's resources) and must be idempotent: arq retries on failure, a cron run may
    repeat after a restart, and an administrator may retry a failed job. Every run goes through the task
    monitor's wrapper (events, metrics in ``supervisor.registry``, records: see the module docstring); the queue
    is named ``service``."""
    if not functions and not cron_jobs:
        return  # arq refuses a worker with nothing to run
    recorder = TaskRecorder(settings, service)
    metrics = JobMetrics.of(supervisor)

    async def run(stop: asyncio.Event) -> None:
        monitor = _WorkerMonitor(recorder, metrics, job_timeout)
        wrapped = [monitor.function(f) for f in functions]
        crons = [monitor.cron(c) for c in cron_jobs]

        # Named ``ctx`` as arq's protocol for startup hooks has it.
        async def announce(ctx: dict[Any, Any]) -> None:
            names = [f.name for f in wrapped] + [c.name for c in crons]
            await monitor.announce(ctx, supervisor.service, queue_name(settings, service), names)

        worker = Worker(
            functions=wrapped,
            cron_jobs=crons or None,
            redis_settings=arq_redis_settings(settings),
            queue_name=queue_name(settings, service),
            ctx=dict(ctx or {}),
            handle_signals=False,
            max_jobs=max_jobs,
            max_tries=WORKER_MAX_TRIES,
            # A worker that dies mid-job leaves it "in progress" for in_progress_expiry(the longest timeout).
            job_timeout=job_timeout + TIMEOUT_GRACE,
            # Job(job_id, redis).abort() cancels a job: recorded as failed (arq never runs it again).
            allow_abort_jobs=True,
            keep_result=3600,
            health_check_key=queue_name(settings, service) + ":health",
            # arq polls its queue (no blocking pop): how long a queued job may wait for the worker to look.
            poll_delay=poll_delay,
            on_startup=announce,
        )
        monitor.timezone = worker.timezone or UTC
        monitor.worker = worker
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
        kwargs: Mapping[str, Any] | None = None,
    ) -> bool:
        """True when the job was queued, False when one with this id already exists. ``expires``: how long the
        job may wait in the queue, retries included (arq's default is a day); ``kwargs``: the job's keyword
        arguments."""
        await self.start()
        assert self.pool is not None
        job = await self.pool.enqueue_job(
            function,
            *args,
            _job_id=job_id,
            _queue_name=queue_name(self.settings, service),
            _defer_by=timedelta(seconds=defer_seconds) if defer_seconds else None,
            _expires=expires,
            **dict(kwargs or {}),
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
