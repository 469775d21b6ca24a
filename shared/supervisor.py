"""One supervisor for every long-running task of a service (source runners, stream consumers, refresh
loops, job workers).

A task is a coroutine function taking the shutdown event. When it raises (or returns while the service is
not stopping) the supervisor logs the traceback, counts the failure and starts it again after a capped,
jittered backoff; the backoff resets once the task has stayed up for a while. ``/readyz`` reads
``problems()``: a task that is down, or whose own health check reports a stall, makes the service unready.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge

from shared.backoff import jittered_backoff

if TYPE_CHECKING:
    from shared.jobs import JobMetrics

log = structlog.get_logger("supervisor")

TaskFactory = Callable[[asyncio.Event], Awaitable[None]]
# Returns a reason when the task is alive but not doing its job (a stalled consumer group), else None.
HealthCheck = Callable[[], Awaitable[str | None]]


@dataclass
class SupervisedTask:
    name: str
    factory: TaskFactory
    check: HealthCheck | None = None
    state: str = "starting"
    restarts: int = 0
    started_at: float = 0.0
    last_error: str | None = None
    last_error_at: datetime | None = None
    next_start_at: float | None = None
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": self.state,
            "restarts": self.restarts,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at.isoformat() if self.last_error_at else None,
        }


class Supervisor:
    def __init__(
        self,
        service: str,
        registry: CollectorRegistry | None = None,
        *,
        initial_backoff: float = 0.5,
        max_backoff: float = 30.0,
        healthy_after: float = 60.0,
    ) -> None:
        self.service = service
        # Also where the job workers it runs report their metrics (shared/jobs.py).
        self.registry = registry
        # Those workers' metrics, made by the first one (a registry refuses a metric name twice).
        self.job_metrics: JobMetrics | None = None
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        # A task that stayed up this long is considered recovered: its next failure starts a fresh backoff.
        self.healthy_after = healthy_after
        self.stop_event = asyncio.Event()
        self.tasks: dict[str, SupervisedTask] = {}
        self._restarts = Counter(
            "supervised_task_restarts_total",
            "Restarts of supervised tasks after a failure",
            ["task"],
            registry=registry,
        )
        self._up = Gauge("supervised_task_up", "1 while a supervised task runs", ["task"], registry=registry)

    def start(self, name: str, factory: TaskFactory, *, check: HealthCheck | None = None) -> SupervisedTask:
        if name in self.tasks:
            raise ValueError(f"a task named {name!r} is already supervised")
        supervised = SupervisedTask(name=name, factory=factory, check=check)
        supervised.task = asyncio.create_task(self._keep_running(supervised), name=f"supervised:{name}")
        self.tasks[name] = supervised
        return supervised

    async def _keep_running(self, supervised: SupervisedTask) -> None:
        failures = 0
        while not self.stop_event.is_set():
            supervised.state = "running"
            supervised.next_start_at = None
            supervised.started_at = time.monotonic()
            self._up.labels(supervised.name).set(1)
            try:
                await supervised.factory(self.stop_event)
            except asyncio.CancelledError as exc:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    self._up.labels(supervised.name).set(0)
                    supervised.state = "stopped"
                    raise
                # Raised inside the task by library code, not a cancellation of ours: a crash like any other.
                error = f"CancelledError: {exc}"
                log.error("task_crashed", service=self.service, task=supervised.name, error=error)
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                log.exception("task_crashed", service=self.service, task=supervised.name, error=error)
            else:
                if self.stop_event.is_set():
                    break
                error = "returned while the service was running"
                log.error("task_exited", service=self.service, task=supervised.name)
            self._up.labels(supervised.name).set(0)
            if time.monotonic() - supervised.started_at >= self.healthy_after:
                failures = 0
            failures += 1
            supervised.restarts += 1
            supervised.last_error = error
            supervised.last_error_at = datetime.now(UTC)
            self._restarts.labels(supervised.name).inc()
            # Jittered under a doubling cap: many tasks failing on one outage do not retry in lockstep.
            delay = jittered_backoff(failures, base=self.initial_backoff, cap=self.max_backoff, jitter="equal")
            supervised.state = "restarting"
            supervised.next_start_at = time.monotonic() + delay
            log.warning(
                "task_restarting", service=self.service, task=supervised.name, restarts=supervised.restarts,
                retry_in=round(delay, 2), error=error,
            )  # fmt: skip
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_event.wait(), timeout=delay)
        supervised.state = "stopped"
        self._up.labels(supervised.name).set(0)

    async def problems(self) -> dict[str, str]:
        """Each task that is not doing its job, with the reason; empty when all are well."""
        found: dict[str, str] = {}
        for supervised in self.tasks.values():
            if supervised.state != "running":
                if supervised.state == "stopped" and self.stop_event.is_set():
                    continue
                reason = supervised.state
                if supervised.last_error:
                    reason += f" after {supervised.restarts} failure(s), last: {supervised.last_error}"
                found[supervised.name] = reason
                continue
            if supervised.check is not None:
                try:
                    stalled = await supervised.check()
                except Exception as exc:
                    stalled = f"health check failed: {type(exc).__name__}: {exc}"
                if stalled:
                    found[supervised.name] = stalled
        return found

    def describe(self) -> list[dict[str, Any]]:
        return [t.describe() for t in self.tasks.values()]

    async def stop(self, grace_seconds: float = 5.0) -> None:
        """Signal every task to finish, wait up to ``grace_seconds``, then cancel what is left."""
        self.stop_event.set()
        running = [t.task for t in self.tasks.values() if t.task is not None and not t.task.done()]
        if not running:
            return
        _done, pending = await asyncio.wait(running, timeout=grace_seconds)
        for task in pending:
            task.cancel()
        for task in running:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if pending:
            log.warning("tasks_cancelled_at_shutdown", service=self.service, tasks=[t.get_name() for t in pending])
