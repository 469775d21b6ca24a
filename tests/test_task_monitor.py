"""The task monitor end to end: a real arq worker started by ``supervise_worker`` in this process (real Redis,
the tests' settings) runs the jobs defined here, and the gateway's ``/api/v1/admin/tasks*`` reports them: what
completed, what failed and why, what arq retried, what is queued, the cron schedule, and a failed job retried
by an administrator that then runs again."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import structlog
from arq.constants import in_progress_key_prefix, result_key_prefix
from arq.cron import cron
from arq.jobs import Job
from arq.worker import Retry, func
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from services.gateway.app import create_app as gateway_app
from shared.jobs import JobQueue, TaskKeys, in_progress_expiry, supervise_worker
from shared.settings import Settings
from shared.supervisor import Supervisor
from tests.accounts import bearer, register, tokens
from tests.conftest import ROOT, eventually, free_port, make_settings, serve_app

QUEUE = "monitor-tests"
TASKS = "/api/v1/admin/tasks"


# --- the jobs -------------------------------------------------------------------------------------------


async def double(ctx: dict[str, Any], value: int) -> int:
    return value * 2


async def breaks(ctx: dict[str, Any], reason: str) -> None:
    raise ValueError(f"broken on purpose: {reason}")


async def heals(ctx: dict[str, Any], flag: str) -> str:
    """Fails until the test sets ``flag`` in Redis: the second run (a manual retry) can succeed."""
    if not await ctx["redis"].get(flag):
        raise RuntimeError("not healed yet")
    return "healed"


async def flaky(ctx: dict[str, Any]) -> str:
    """Asks arq for a retry on its first attempt, succeeds on the second."""
    if ctx["job_try"] < 2:
        raise Retry(defer=0.05)
    return "second time lucky"


async def waits(ctx: dict[str, Any]) -> None:
    await asyncio.sleep(3600)


async def tick(ctx: dict[str, Any]) -> None:
    return None


# ``waits`` with one try: a run cut short is not run again.
WAITS_ONCE = "waits_once"
FUNCTIONS = [
    double, func(breaks, max_tries=1), func(heals, max_tries=1), func(flaky, max_tries=3), func(waits, max_tries=3),
    func(waits, name=WAITS_ONCE, max_tries=1),
]  # fmt: skip
# The worker killed in a test: a short timeout, so that arq's in-progress key of its job expires soon.
CRASH_TIMEOUT = 2.0


@contextlib.asynccontextmanager
async def worker(settings: Settings, queue: str = QUEUE) -> AsyncIterator[Supervisor]:
    supervisor = Supervisor("monitor-tests", CollectorRegistry())
    crons = [cron(tick, name=f"cron:tick_{uuid.uuid4().hex[:8]}", run_at_startup=True)]
    supervise_worker(
        supervisor, settings, queue, functions=FUNCTIONS, cron_jobs=crons, ctx={"settings": settings}, poll_delay=0.05
    )
    try:
        yield supervisor
    finally:
        await supervisor.stop()


@dataclass
class Monitor:
    settings: Settings
    client: httpx.AsyncClient
    admin: dict[str, str]
    user: dict[str, str]
    jobs: JobQueue
    supervisor: Supervisor

    async def enqueue(self, function: str, *args: Any, defer: float | None = None, queue: str = QUEUE) -> str:
        job_id = f"{function}-{uuid.uuid4().hex}"
        assert await self.jobs.enqueue(queue, function, *args, job_id=job_id, defer_seconds=defer)
        return job_id

    async def job(self, job_id: str) -> dict[str, Any]:
        response = await self.client.get(f"{TASKS}/{job_id}", headers=self.admin)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    async def settled(self, job_id: str, status: str) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            response = await self.client.get(f"{TASKS}/{job_id}", headers=self.admin)
            return response.json() if response.status_code == 200 and response.json()["status"] == status else None

        found: dict[str, Any] = await eventually(check, timeout=20)
        return found

    async def queue(self, name: str = QUEUE, **params: Any) -> dict[str, Any]:
        response = await self.client.get(TASKS, params={"queue": name, **params}, headers=self.admin)
        assert response.status_code == 200, response.text
        queues = response.json()["queues"]
        assert [q["name"] for q in queues] == [name]
        body: dict[str, Any] = queues[0]
        return body


@pytest.fixture
async def monitor(settings: Settings, db: Any) -> AsyncIterator[Monitor]:
    closed = f"http://127.0.0.1:{free_port()}"
    gw = settings.model_copy(
        update={f"{name}_url": closed for name in ("ingest", "pricing", "conversion", "analytics", "alerting")}
        | {"rate_limit_user": 100_000, "rate_limit_anonymous": 100_000, "login_max_attempts_per_ip": 100_000}
    )
    jobs = JobQueue(settings)
    async with serve_app(gateway_app(gw)) as url, httpx.AsyncClient(base_url=url, timeout=20) as client:
        await register(client, "admin@example.com")
        await register(client, "user@example.com")
        await db.execute("UPDATE users SET role = 'admin' WHERE email = 'admin@example.com'")
        admin = bearer((await tokens(client, "admin@example.com"))["access_token"])
        user = bearer((await tokens(client, "user@example.com"))["access_token"])
        async with worker(settings) as supervisor:
            try:
                yield Monitor(settings, client, admin, user, jobs, supervisor)
            finally:
                await jobs.close()


async def test_the_monitor_lists_completed_failed_and_retried_jobs_with_attempts_and_errors(monitor: Monitor) -> None:
    ok = await monitor.enqueue("double", 21)
    broken = await monitor.enqueue("breaks", "on a test's request")
    retried = await monitor.enqueue("flaky")

    done = await monitor.settled(ok, "completed")
    assert (done["task"], done["queue"], done["attempt"], done["args"], done["error"]) == (
        "double", QUEUE, 1, [21], None
    )  # fmt: skip
    assert done["duration_ms"] >= 0 and done["finished_at"] >= done["started_at"]

    failed = await monitor.settled(broken, "failed")
    assert failed["error"] == "ValueError: broken on purpose: on a test's request"
    assert (failed["attempt"], failed["max_tries"], failed["will_retry"]) == (1, 1, False)

    second = await monitor.settled(retried, "completed")
    assert (second["attempt"], second["max_tries"]) == (2, 3)

    queue = await monitor.queue()
    assert queue["redis_key"] == monitor.settings.key("arq", QUEUE)
    assert queue["service"] == "monitor-tests"
    assert {"double", "breaks", "heals", "flaky"} <= set(queue["functions"])
    assert [j["job_id"] for j in queue["failed"]] == [broken]
    assert {ok, retried} <= {j["job_id"] for j in queue["completed"]}
    counts = queue["counts"]
    assert (counts["failed"], counts["retried"]) == (1, 1)
    assert counts["completed"] >= 2  # and the cron job's runs
    # Only one state's list when asked for one; the counts stay.
    only_failed = await monitor.queue(status="failed")
    assert only_failed["completed"] == [] and [j["job_id"] for j in only_failed["failed"]] == [broken]
    assert only_failed["counts"] == counts

    # The same runs in the worker's Prometheus registry.
    registry = monitor.supervisor.registry
    assert registry is not None
    sample = registry.get_sample_value
    assert sample("jobs_total", {"task": "double", "queue": QUEUE, "outcome": "completed"}) == 1
    assert sample("jobs_total", {"task": "breaks", "queue": QUEUE, "outcome": "failed"}) == 1
    assert sample("jobs_total", {"task": "flaky", "queue": QUEUE, "outcome": "retried"}) == 1
    assert sample("job_duration_seconds_count", {"task": "flaky", "outcome": "completed"}) == 1


async def test_a_failed_job_is_retried_under_a_new_id_and_runs_again(monitor: Monitor, redis: Redis) -> None:
    flag = monitor.settings.key("tests", "healed", uuid.uuid4().hex)
    first = await monitor.enqueue("heals", flag)
    failed = await monitor.settled(first, "failed")
    assert failed["error"] == "RuntimeError: not healed yet"

    # Not failed, unknown: refused.
    ok = await monitor.enqueue("double", 1)
    await monitor.settled(ok, "completed")
    refused = await monitor.client.post(f"{TASKS}/{ok}/retry", headers=monitor.admin)
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "conflict"
    unknown = await monitor.client.post(f"{TASKS}/no-such-job/retry", headers=monitor.admin)
    assert unknown.status_code == 404
    assert (await monitor.client.get(f"{TASKS}/no-such-job", headers=monitor.admin)).status_code == 404

    await redis.set(flag, "1", ex=600)
    response = await monitor.client.post(f"{TASKS}/{first}/retry", headers=monitor.admin)
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["retry_of"] == first and body["job_id"] != first
    assert (body["task"], body["queue"], body["status"]) == ("heals", QUEUE, "queued")

    rerun = await monitor.settled(body["job_id"], "completed")
    assert (rerun["retry_of"], rerun["args"], rerun["attempt"]) == (first, [flag], 1)
    assert (await monitor.job(first))["retried_as"] == body["job_id"]
    assert (await monitor.job(first))["status"] == "failed"
    # A retry of a retry is named after the first job, not a growing chain.
    await redis.delete(flag)
    again = await monitor.enqueue("heals", flag)
    await monitor.settled(again, "failed")
    retry = (await monitor.client.post(f"{TASKS}/{again}/retry", headers=monitor.admin)).json()
    await monitor.settled(retry["job_id"], "failed")
    second = (await monitor.client.post(f"{TASKS}/{retry['job_id']}/retry", headers=monitor.admin)).json()
    assert second["job_id"].startswith(f"{again}:retry:") and second["job_id"].count(":retry:") == 1


async def test_queued_jobs_and_the_cron_schedule_are_listed(monitor: Monitor) -> None:
    later = await monitor.enqueue("double", 5, defer=3600)
    queued = await monitor.job(later)
    assert (queued["status"], queued["task"], queued["args"]) == ("queued", "double", [5])
    assert datetime.fromisoformat(queued["scheduled_for"]) > datetime.now(UTC)

    async def ran() -> dict[str, Any] | None:
        queue = await monitor.queue()
        entries = [c for c in queue["cron"] if c.get("last_status") == "completed"]
        return queue if entries else None

    queue = await eventually(ran, timeout=20)
    assert queue["counts"]["deferred"] >= 1
    assert later in [j["job_id"] for j in queue["queued"]]
    [entry] = queue["cron"]
    assert entry["name"].startswith("cron:tick_") and entry["schedule"] == "every minute"
    assert entry["run_at_startup"] is True
    # The next run is the minute after the last (it may have just passed by now: the run after it is due).
    last_run, next_run = datetime.fromisoformat(entry["last_run"]), datetime.fromisoformat(entry["next_run"])
    assert last_run <= datetime.now(UTC) and next_run.second == 0
    assert 0 < (next_run - last_run).total_seconds() <= 61
    assert entry["last_job_id"] and entry["last_duration_ms"] >= 0

    # The gateway's own worker announced its queue and cron jobs too.
    response = await monitor.client.get(TASKS, headers=monitor.admin)
    gateway = next(q for q in response.json()["queues"] if q["name"] == "gateway")
    assert "user_activity_retention" in [c["name"] for c in gateway["cron"]]
    retention = next(c for c in gateway["cron"] if c["name"] == "user_activity_retention")
    assert retention["schedule"] == "hour=3 minute=47"
    assert datetime.fromisoformat(retention["next_run"]) > datetime.now(UTC)


async def test_only_administrators_see_the_monitor(monitor: Monitor) -> None:
    for method, path in (("GET", TASKS), ("GET", f"{TASKS}/x"), ("POST", f"{TASKS}/x/retry")):
        anonymous = await monitor.client.request(method, path)
        assert anonymous.status_code == 401, (method, path)
        user = await monitor.client.request(method, path, headers=monitor.user)
        assert user.status_code == 403, (method, path)
    assert (await monitor.client.get(TASKS, params={"status": "lost"}, headers=monitor.admin)).status_code == 422
    unknown = await monitor.client.get(TASKS, params={"queue": "nope"}, headers=monitor.admin)
    assert unknown.status_code == 404 and QUEUE in unknown.json()["error"]["details"]["queues"]


async def test_the_job_events_are_logged_and_a_record_failure_does_not_fail_the_job(
    settings: Settings, redis: Redis
) -> None:
    jobs = JobQueue(settings)
    keys = TaskKeys(settings)
    blocked = f"double-{uuid.uuid4().hex}"
    # A real Redis error for this job's record: its key holds a string, so every HSET on it is refused.
    await redis.set(keys.job(blocked), "not a hash")
    try:
        with structlog.testing.capture_logs() as logs:
            async with worker(settings):
                assert await jobs.enqueue(QUEUE, "double", 4, job_id=blocked)
                retried = f"flaky-{uuid.uuid4().hex}"
                assert await jobs.enqueue(QUEUE, "flaky", job_id=retried)

                async def finished() -> bool:
                    done = {(e["event"], e.get("job_id")) for e in logs}
                    return {("task_completed", blocked), ("task_completed", retried)} <= done

                await eventually(finished, timeout=20)
                assert jobs.pool is not None
                result = await Job(blocked, jobs.pool).result_info()
                assert result is not None and (result.success, result.result) == (True, 8)
    finally:
        await jobs.close()
    events = [e for e in logs if e.get("job_id") in (blocked, retried)]
    started = [e for e in events if e["event"] == "task_started"]
    assert {(e["task"], e["queue"], e["attempt"]) for e in started} == {("double", QUEUE, 1), ("flaky", QUEUE, 1),
                                                                         ("flaky", QUEUE, 2)}  # fmt: skip
    [failed] = [e for e in events if e["event"] == "task_failed"]
    assert (failed["task"], failed["attempt"], failed["will_retry"]) == ("flaky", 1, True)
    assert failed["error"].startswith("Retry:") and failed["duration_ms"] >= 0
    completed = [e for e in events if e["event"] == "task_completed"]
    assert {(e["task"], e["attempt"]) for e in completed} == {("double", 1), ("flaky", 2)}
    assert all(isinstance(e["duration_ms"], float) for e in completed)
    assert any(e["event"] == "task_record_failed" and e.get("job_id") == blocked for e in logs)
    assert await redis.get(keys.job(blocked)) == b"not a hash"


async def test_a_worker_stopped_mid_job_leaves_it_queued_for_arq_to_run_again(settings: Settings, redis: Redis) -> None:
    """A cancellation (the service stopping) is not a failure: the record says the job will run again, and the
    next worker does run it, as its second attempt."""
    jobs = JobQueue(settings)
    record = TaskKeys(settings).job(slow := f"waits-{uuid.uuid4().hex}")

    async def status(expected: str, attempt: int) -> bool:
        fields = await redis.hgetall(record)
        return fields.get(b"status") == expected.encode() and fields.get(b"attempt") == str(attempt).encode()

    try:
        async with worker(settings):
            assert await jobs.enqueue(QUEUE, "waits", job_id=slow)
            await eventually(lambda: status("running", 1), timeout=20)
        fields = await redis.hgetall(record)
        assert (fields[b"status"], fields[b"will_retry"]) == (b"queued", b"1")
        assert fields[b"error"].startswith(b"CancelledError")
        assert await redis.zscore(TaskKeys(settings).running(QUEUE), slow) is None
        async with worker(settings):
            await eventually(lambda: status("running", 2), timeout=20)
    finally:
        await jobs.close()


async def test_a_last_try_cut_short_by_a_stopping_worker_is_failed_by_arq_and_shown_failed(monitor: Monitor) -> None:
    """A one-try job whose worker stops mid-job stays in arq's queue; the next worker to take it has no try
    left, so arq fails it without calling the job (nor the wrapper): the monitor shows it failed, from arq's
    result (or, that gone, as the worker's death), and it can be retried."""
    queue = f"monitor-stops-{uuid.uuid4().hex[:8]}"
    async with worker(monitor.settings, queue):
        job_id = await monitor.enqueue(WAITS_ONCE, queue=queue)
        running = await monitor.settled(job_id, "running")
    cut = await monitor.job(job_id)
    # arq keeps it queued: the next worker decides.
    assert (cut["status"], cut["attempt"], cut["will_retry"]) == ("queued", 1, False)
    assert cut["error"].startswith("CancelledError: the worker stopped during the job")
    refused = await monitor.client.post(f"{TASKS}/{job_id}/retry", headers=monitor.admin)
    assert refused.status_code == 409

    with structlog.testing.capture_logs() as logs:
        async with worker(monitor.settings, queue):
            failed = await monitor.settled(job_id, "failed")
            listed = await monitor.queue(queue, status="failed")
    assert failed["error"].startswith("arq gave up on the job: JobExecutionFailed: max 1 retries exceeded")
    assert "(last run: CancelledError: the worker stopped during the job" in failed["error"]
    assert (failed["attempt"], failed["will_retry"], failed["started_at"]) == (1, False, running["started_at"])
    assert failed["finished_at"] >= running["started_at"]
    assert [j["job_id"] for j in listed["failed"]] == [job_id] and listed["counts"]["failed"] == 1
    # Not run again: the wrapper saw no second start.
    assert not [e for e in logs if e["event"] == "task_started" and e.get("job_id") == job_id]

    # arq's result expires an hour later: the record alone still says the job is over.
    redis = Redis.from_url(monitor.settings.require_redis_url())
    try:
        assert await redis.delete(result_key_prefix + job_id) == 1
    finally:
        await redis.aclose()
    gone = await monitor.job(job_id)
    assert gone["status"] == "failed" and gone["error"].startswith("the worker stopped during the job and arq gave up")

    response = await monitor.client.post(f"{TASKS}/{job_id}/retry", headers=monitor.admin)
    assert response.status_code == 202, response.text
    assert (await monitor.job(response.json()["job_id"]))["retry_of"] == job_id


def crashing_worker(database_url: str, redis_url: str, namespace: str, queue: str) -> None:
    """A worker of ``queue`` in a child process (the test kills it with SIGKILL): ``waits_once`` only, with a
    short timeout."""

    async def main() -> None:
        settings = make_settings(database_url, redis_url, namespace)
        supervisor = Supervisor("monitor-crash", CollectorRegistry())
        supervise_worker(
            supervisor, settings, queue, functions=[func(waits, name=WAITS_ONCE, max_tries=1, timeout=CRASH_TIMEOUT)],
            job_timeout=CRASH_TIMEOUT, poll_delay=0.05,
        )  # fmt: skip
        await asyncio.Event().wait()

    asyncio.run(main())


async def test_a_job_whose_worker_was_killed_and_that_arq_then_fails_is_shown_failed(
    monitor: Monitor, redis: Redis
) -> None:
    """kill -9 of the worker mid-job: no wrapper writes the end, the record says running. Once arq's in-progress
    key expires the job is queued again; the next worker has no try left and arq fails it without the job."""
    queue = f"monitor-crash-{uuid.uuid4().hex[:8]}"
    settings = monitor.settings
    code = "import sys; from tests.test_task_monitor import crashing_worker; crashing_worker(*sys.argv[1:])"
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, settings.database_url, settings.require_redis_url(), settings.redis_namespace,
        queue, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        job_id = await monitor.enqueue(WAITS_ONCE, queue=queue)
        running = await monitor.settled(job_id, "running")
    finally:
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signal.SIGKILL)
        await child.wait()
    # The dead worker's job: still in progress for arq, so still running here.
    ttl = await redis.pttl(in_progress_key_prefix + job_id)
    assert 0 < ttl <= in_progress_expiry(CRASH_TIMEOUT) * 1000
    assert (await monitor.job(job_id))["status"] == "running"

    # Past the expiry it waits in arq's queue again, then a worker takes it and arq fails it.
    async def expired() -> bool:
        return not await redis.exists(in_progress_key_prefix + job_id)

    await eventually(expired, timeout=in_progress_expiry(CRASH_TIMEOUT) + 10, interval=0.2)
    assert (await monitor.job(job_id))["status"] == "queued"
    async with worker(settings, queue):
        failed = await monitor.settled(job_id, "failed")
        listed = await monitor.queue(queue)
    assert failed["error"] == "arq gave up on the job: JobExecutionFailed: max 1 retries exceeded"
    assert (failed["attempt"], failed["max_tries"], failed["started_at"]) == (1, 1, running["started_at"])
    assert [j["job_id"] for j in listed["failed"]] == [job_id]
    assert listed["running"] == [] and listed["counts"]["failed"] == 1 and listed["counts"]["running"] == 0
    response = await monitor.client.post(f"{TASKS}/{job_id}/retry", headers=monitor.admin)
    assert response.status_code == 202, response.text


async def test_an_aborted_job_is_recorded_failed_not_queued_again(monitor: Monitor, redis: Redis) -> None:
    job_id = await monitor.enqueue("waits")  # three tries: a stop would run it again, an abort does not
    await monitor.settled(job_id, "running")
    assert monitor.jobs.pool is not None
    aborted = Job(job_id, monitor.jobs.pool, _queue_name=monitor.settings.key("arq", QUEUE))
    assert await aborted.abort(timeout=20, poll_delay=0.1) is True
    failed = await monitor.settled(job_id, "failed")
    assert (failed["error"], failed["will_retry"], failed["attempt"]) == (
        "CancelledError: the job was aborted", False, 1
    )  # fmt: skip
    assert await redis.zscore(monitor.settings.key("arq", QUEUE), job_id) is None
    assert job_id in [j["job_id"] for j in (await monitor.queue(status="failed"))["failed"]]
    registry = monitor.supervisor.registry
    assert registry is not None
    assert registry.get_sample_value("jobs_total", {"task": "waits", "queue": QUEUE, "outcome": "failed"}) == 1
    assert registry.get_sample_value("jobs_total", {"task": "waits", "queue": QUEUE, "outcome": "retried"}) is None


async def test_two_retries_of_one_failed_job_at_once_make_one_new_job(monitor: Monitor, redis: Redis) -> None:
    flag = monitor.settings.key("tests", "healed", uuid.uuid4().hex)
    first = await monitor.enqueue("heals", flag)
    await monitor.settled(first, "failed")
    await redis.set(flag, "1", ex=600)

    url = f"{TASKS}/{first}/retry"
    one, two = await asyncio.gather(
        monitor.client.post(url, headers=monitor.admin), monitor.client.post(url, headers=monitor.admin)
    )
    assert sorted([one.status_code, two.status_code]) == [200, 202], (one.text, two.text)
    assert one.json()["job_id"] == two.json()["job_id"]
    new_id = one.json()["job_id"]
    await monitor.settled(new_id, "completed")
    # One record and one arq result for the retries of ``first``: one job was enqueued.
    records = [k async for k in redis.scan_iter(match=TaskKeys(monitor.settings).job(f"{first}:retry:*"))]
    results = [k async for k in redis.scan_iter(match=f"{result_key_prefix}{first}:retry:*")]
    assert (len(records), len(results)) == (1, 1)
    assert (await monitor.job(first))["retried_as"] == new_id

    # Asked again later: the same retry, as it is now.
    again = await monitor.client.post(url, headers=monitor.admin)
    assert again.status_code == 200
    assert (again.json()["job_id"], again.json()["status"], again.json()["retry_of"]) == (new_id, "completed", first)
