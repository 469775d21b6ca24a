"""The task monitor: what every arq queue of the platform holds, runs and ran, read from arq's own keys (the
queue's sorted set and its jobs, through arq's ``Job`` API) and from the records the job wrapper writes
(shared/jobs.py documents those keys), and the retry of a failed job."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from arq.constants import in_progress_key_prefix
from arq.jobs import DeserializationError, Job, JobDef, JobResult
from redis.asyncio import Redis

from shared.errors import Conflict, NotFound
from shared.jobs import (
    COUNT_WINDOW_HOURS,
    ERROR_MAX_CHARS,
    TASK_RECORD_TTL,
    JobQueue,
    TaskKeys,
    encode_arguments,
    queue_name,
    truncate,
)
from shared.settings import Settings
from shared.streams import decode_text
from shared.timeparse import iso_z

STATUSES = ("queued", "running", "completed", "failed")
COUNTED = ("completed", "failed", "retried")
# A record left running by a worker that died, whose job arq then failed (no try left) and whose result is gone.
WORKER_DIED = "the worker stopped during the job and arq gave up"
# Read from arq's result, but it does not unpickle here (an exception class only the worker's service has).
UNREADABLE = object()


# Deletes ``retried_as`` only while it names the given retry (a compare-and-delete, atomic in Redis).
_RELEASE = """
if redis.call('HGET', KEYS[1], 'retried_as') == ARGV[1] then
    return redis.call('HDEL', KEYS[1], 'retried_as')
end
return 0
"""


def _decoded(raw: dict[Any, Any]) -> dict[str, str]:
    return {decode_text(k): decode_text(v) for k, v in raw.items()}


def _number(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None


def _ms_time(score: float | None) -> str | None:
    return None if score is None else iso_z(datetime.fromtimestamp(score / 1000, UTC))


def _arguments(record: dict[str, str]) -> tuple[Any, Any]:
    args: Any = record.get("args") or None
    kwargs: Any = record.get("kwargs") or None
    if record.get("args_json") == "1":
        with contextlib.suppress(KeyError, ValueError):  # else shown as stored
            args, kwargs = json.loads(record["args"]), json.loads(record["kwargs"])
    return args, kwargs


def job_view(job_id: str, record: dict[str, str]) -> dict[str, Any]:
    """A job record (the wrapper's hash) as ``TaskJobOut``."""
    args, kwargs = _arguments(record)
    attempt = _number(record.get("attempt"))
    max_tries = _number(record.get("max_tries"))
    return {
        "job_id": job_id,
        "task": record.get("task", "?"),
        "queue": record.get("queue", "?"),
        "status": record.get("status") if record.get("status") in STATUSES else "queued",
        "attempt": int(attempt) if attempt is not None else None,
        "max_tries": int(max_tries) if max_tries is not None else None,
        "enqueued_at": record.get("enqueued_at") or None,
        "started_at": record.get("started_at") or None,
        "finished_at": record.get("finished_at") or None,
        "duration_ms": _number(record.get("duration_ms")),
        "error": record.get("error") or None,
        "will_retry": record["will_retry"] == "1" if record.get("will_retry") else None,
        "args": args,
        "keyword_args": kwargs,
        "retry_of": record.get("retry_of") or None,
        "retried_as": record.get("retried_as") or None,
    }


def settled_view(view: dict[str, Any], result: JobResult | object | None) -> dict[str, Any]:
    """A job arq finished without the wrapper's last word (its record says running or queued), from arq's
    result when it still keeps it (``UNREADABLE``: kept but not readable here)."""
    if isinstance(result, JobResult) and result.success:
        # The job ran to its end; only the record's last write was lost (a Redis error at that moment).
        return view | {"status": "completed", "finished_at": iso_z(result.finish_time), "error": None,
                       "will_retry": False}  # fmt: skip
    if isinstance(result, JobResult):
        reason = f"{type(result.result).__name__}: {result.result}".rstrip(": ")
        error = f"arq gave up on the job: {reason}"
    elif result is UNREADABLE:
        error = "arq gave up on the job (its result cannot be read here)"
    else:
        error = WORKER_DIED
    if view.get("error"):
        error += f" (last run: {view['error']})"
    finished = iso_z(result.finish_time) if isinstance(result, JobResult) else view.get("finished_at")
    return view | {
        "status": "failed",
        "error": truncate(error, ERROR_MAX_CHARS),
        "will_retry": False,
        "finished_at": finished,
    }


def _queued_view(job_id: str, queue: str, definition: JobDef, record: dict[str, str] | None) -> dict[str, Any]:
    """A job in arq's queue: arq's definition, with what the record knows of earlier attempts."""
    view: dict[str, Any] = job_view(job_id, record) if record else {"job_id": job_id}
    args_text, kwargs_text, as_json = encode_arguments(definition.args, definition.kwargs)
    view.update(
        task=definition.function,
        queue=queue,
        status="queued",
        # The last attempt's number (from the record), none before the first run.
        attempt=view.get("attempt"),
        enqueued_at=iso_z(definition.enqueue_time),
        scheduled_for=_ms_time(definition.score),
        args=json.loads(args_text) if as_json else args_text,
        keyword_args=json.loads(kwargs_text) if as_json else kwargs_text,
    )
    return view


class TaskMonitor:
    def __init__(self, settings: Settings, redis: Redis, jobs: JobQueue) -> None:
        self.settings = settings
        self.redis = redis
        self.jobs = jobs
        self.keys = TaskKeys(settings)

    async def _pool(self) -> Any:
        await self.jobs.start()
        return self.jobs.pool

    async def queues(self) -> dict[str, dict[str, Any]]:
        """The queues a worker announced, by name."""
        raw = _decoded(await self.redis.hgetall(self.keys.queues()))
        found: dict[str, dict[str, Any]] = {}
        for name, text in sorted(raw.items()):
            try:
                info = json.loads(text)
            except ValueError:
                info = {}
            found[name] = info if isinstance(info, dict) else {}
        return found

    async def _records(self, job_ids: Iterable[str]) -> dict[str, dict[str, str]]:
        ids = list(job_ids)
        if not ids:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hgetall(self.keys.job(job_id))
            rows = await pipe.execute()
        return {job_id: _decoded(row) for job_id, row in zip(ids, rows, strict=True) if row}

    async def _in_progress(self, job_ids: list[str]) -> set[str]:
        if not job_ids:
            return set()
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.exists(in_progress_key_prefix + job_id)
            flags = await pipe.execute()
        return {job_id for job_id, flag in zip(job_ids, flags, strict=True) if flag}

    async def _arq_result(self, job_id: str) -> JobResult | object | None:
        try:
            return await Job(job_id, await self._pool()).result_info()
        except DeserializationError:
            return UNREADABLE

    async def _views(self, records: dict[str, dict[str, str]]) -> dict[str, dict[str, Any]]:
        """The records as ``TaskJobOut``, each unfinished one (running, queued) checked against arq: one that
        arq settled without the wrapper (shared/jobs.py says when) is failed, or completed, by arq's result; a
        running one whose worker died and that waits in arq's queue again is queued."""
        views = {job_id: job_view(job_id, record) for job_id, record in records.items()}
        unfinished = [job_id for job_id, view in views.items() if view["status"] in ("running", "queued")]
        if not unfinished:
            return views
        # One transaction: arq takes and finishes a job in transactions of its own, so the two reads agree.
        async with self.redis.pipeline(transaction=True) as pipe:
            for job_id in unfinished:
                pipe.exists(in_progress_key_prefix + job_id)
                pipe.zscore(queue_name(self.settings, records[job_id].get("queue", "")), job_id)
            flags = await pipe.execute()
        for index, job_id in enumerate(unfinished):
            live, waiting = flags[2 * index], flags[2 * index + 1]
            if live:
                continue
            if waiting is not None:
                views[job_id]["status"] = "queued"
                continue
            result = await self._arq_result(job_id)
            # Without a result (an hour after arq's end), a job that ran is over; one that never ran may be a
            # manual retry's, its record written just before the enqueue.
            if result is not None or views[job_id]["attempt"] is not None:
                views[job_id] = settled_view(views[job_id], result)
        return views

    async def overview(self, *, queue: str | None, status: str | None, limit: int) -> dict[str, Any]:
        known = await self.queues()
        if queue is not None and queue not in known:
            raise NotFound(f"no worker has announced a queue named {queue!r}", details={"queues": sorted(known)})
        names = [queue] if queue is not None else list(known)
        return {
            "generated_at": iso_z(datetime.now(UTC)),
            "window_hours": COUNT_WINDOW_HOURS,
            "queues": [await self._queue(name, known[name], status, limit) for name in names],
        }

    async def _queue(self, name: str, info: dict[str, Any], status: str | None, limit: int) -> dict[str, Any]:
        arq_queue = queue_name(self.settings, name)
        now = datetime.now(UTC)
        now_ms = int(now.timestamp() * 1000)
        # Running: the wrapper's set, less leftovers of a worker that died (arq's in-progress key is gone).
        started = [decode_text(j) for j in await self.redis.zrevrange(self.keys.running(name), 0, -1)]
        live = await self._in_progress(started)
        running = [j for j in started if j in live]
        # The others: a worker died during them; arq has run them again, or failed them without the wrapper.
        leftovers = await self._views(await self._records([j for j in started if j not in live]))
        ended = [view for view in leftovers.values() if view["status"] in ("completed", "failed")]
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zcount(arq_queue, "-inf", now_ms)
            pipe.zcount(arq_queue, f"({now_ms}", "+inf")
            for key in self.keys.count_window(name, now):
                pipe.hgetall(key)
            due, later, *hours = await pipe.execute()
        counts = {kind: 0 for kind in COUNTED}
        for hour in hours:
            for kind, value in _decoded(hour).items():
                if kind in counts and value.lstrip("-").isdigit():
                    counts[kind] += int(value)
        for view in ended:  # the wrapper never counted these
            counts[view["status"]] += 1
        out: dict[str, Any] = {
            "name": name,
            "service": info.get("service"),
            "redis_key": arq_queue,
            "functions": [str(f) for f in info.get("functions", []) if isinstance(f, str)],
            "worker_started_at": info.get("started_at"),
            "counts": {
                # arq keeps a running job in its queue's set until it finishes.
                "queued": max(0, int(due) - len(running)),
                "deferred": int(later),
                "running": len(running),
                **counts,
            },
            "queued": [],
            "running": [],
            "completed": [],
            "failed": [],
            "cron": await self._cron(name),
        }
        wanted = STATUSES if status is None else (status,)
        if "queued" in wanted:
            out["queued"] = await self._queued(name, arq_queue, limit)
        if "running" in wanted:
            records = await self._records(running[:limit])
            out["running"] = [job_view(j, r) | {"status": "running"} for j, r in records.items()]
        for kind in ("completed", "failed"):
            if kind in wanted:
                ids = [decode_text(j) for j in await self.redis.zrevrange(self.keys.finished(name, kind), 0, limit - 1)]
                views = await self._views(await self._records(ids))
                # A job run again since (its id re-enqueued) shows under its current status only.
                listed = [v for v in views.values() if v["status"] == kind]
                listed += [v for v in ended if v["status"] == kind and v["job_id"] not in views]
                listed.sort(key=lambda v: str(v.get("finished_at") or v.get("started_at") or ""), reverse=True)
                out[kind] = listed[:limit]
        return out

    async def _queued(self, name: str, arq_queue: str, limit: int) -> list[dict[str, Any]]:
        pool = await self._pool()
        # Read past running jobs (still in arq's set) to fill the page with waiting ones.
        entries = [decode_text(j) for j in await self.redis.zrange(arq_queue, 0, limit * 2 + 50)]
        busy = await self._in_progress(entries)
        waiting = [j for j in entries if j not in busy][:limit]
        records = await self._records(waiting)
        found = []
        for job_id in waiting:
            definition = await Job(job_id, pool, _queue_name=arq_queue).info()
            if definition is None:
                continue  # finished between the two reads
            found.append(_queued_view(job_id, name, definition, records.get(job_id)))
        return found

    async def _cron(self, name: str) -> list[dict[str, Any]]:
        entries = []
        for text in _decoded(await self.redis.hgetall(self.keys.cron(name))).values():
            try:
                entry = json.loads(text)
            except ValueError:
                continue
            if isinstance(entry, dict) and "name" in entry:
                entries.append(entry)
        return sorted(entries, key=lambda e: str(e["name"]))

    async def job(self, job_id: str) -> dict[str, Any]:
        """One job: its record, else (never run yet) arq's definition in whichever queue holds it."""
        record = (await self._records([job_id])).get(job_id)
        view = (await self._views({job_id: record}))[job_id] if record is not None else None
        if (view is None or view["status"] == "queued") and not await self._in_progress([job_id]):
            for name in await self.queues():
                arq_queue = queue_name(self.settings, name)
                if await self.redis.zscore(arq_queue, job_id) is None:
                    continue
                definition = await Job(job_id, await self._pool(), _queue_name=arq_queue).info()
                if definition is not None:
                    return _queued_view(job_id, name, definition, record)
        if view is None:
            raise NotFound(f"no job {job_id!r} in the last {COUNT_WINDOW_HOURS} hours")
        return view

    async def retry(self, job_id: str) -> tuple[dict[str, Any], bool]:
        """Enqueues a failed job again, same function, arguments and queue, under a new id (arq refuses an id
        whose result it still keeps). Jobs are idempotent, so running one again is safe. Once per failed job:
        asked again (a second click, a second administrator), it answers the retry already made. The second
        value: whether this call made it."""
        record = (await self._records([job_id])).get(job_id)
        if record is None:
            raise NotFound(f"no job {job_id!r} in the last {COUNT_WINDOW_HOURS} hours")
        if record.get("retried_as"):
            existing = await self._made_retry(job_id, record, record["retried_as"])
            if existing is not None:
                return existing, False
        status = (await self._views({job_id: record}))[job_id]["status"]
        if status != "failed":
            raise Conflict(f"job {job_id!r} is {status}: only a failed job can be retried", details={"status": status})
        args, kwargs = await self._retry_arguments(job_id, record)
        task, queue = record.get("task", ""), record.get("queue", "")
        # Named after the first job of the chain, so that retrying a retry does not grow the id.
        root = job_id.split(":retry:")[0]
        new_id = f"{root}:retry:{uuid.uuid4().hex[:12]}"
        args_text, kwargs_text, as_json = encode_arguments(args, kwargs)
        key, failed = self.keys.job(new_id), self.keys.job(job_id)
        # The record first: the worker may start the job at once, and its own write must come after this one.
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={
                "task": task, "queue": queue, "status": "queued", "enqueued_at": iso_z(datetime.now(UTC)),
                "args": args_text, "kwargs": kwargs_text, "args_json": int(as_json), "retry_of": job_id,
            })  # fmt: skip
            pipe.expire(key, TASK_RECORD_TTL)
            await pipe.execute()
        # Then the claim, before the enqueue: of two concurrent retries only the one that sets it enqueues.
        # A change to the failed record, so its day starts again (and a record just expired gets one).
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hsetnx(failed, "retried_as", new_id)
            pipe.expire(failed, TASK_RECORD_TTL)
            claimed, _ = await pipe.execute()
        if not claimed:
            await self.redis.delete(key)  # never enqueued
            other = decode_text(await self.redis.hget(failed, "retried_as") or b"")
            existing = await self._made_retry(job_id, record, other)
            if existing is None:
                raise Conflict(f"job {job_id!r} is being retried: ask again")
            return existing, False
        try:
            queued = await self.jobs.enqueue(queue, task, *args, job_id=new_id, kwargs=kwargs)
        except BaseException:
            with contextlib.suppress(Exception):  # the enqueue's own error is the one to report
                await self._release(job_id, new_id)
            raise
        if not queued:  # a fresh random id: only if arq already holds it
            await self._release(job_id, new_id)
            raise Conflict(f"job {new_id!r} already exists")
        return {"job_id": new_id, "retry_of": job_id, "task": task, "queue": queue, "status": "queued"}, True

    async def _made_retry(self, job_id: str, record: dict[str, str], new_id: str) -> dict[str, Any] | None:
        """The retry ``new_id`` of ``job_id`` as ``retry`` answers it, now; None when it was never enqueued
        (its record is gone: an enqueue that failed and could not take its claim back), the claim then
        released."""
        current = (await self._records([new_id])).get(new_id)
        if current is None:
            await self._release(job_id, new_id)
            return None
        view = (await self._views({new_id: current}))[new_id]
        return {"job_id": new_id, "retry_of": job_id, "task": record.get("task", view["task"]),
                "queue": record.get("queue", view["queue"]), "status": view["status"]}  # fmt: skip

    async def _release(self, job_id: str, new_id: str) -> None:
        """Takes back a claim (``retried_as``) whose job was not enqueued, unless another retry holds it now."""
        await self.redis.delete(self.keys.job(new_id))
        await self.redis.eval(_RELEASE, 1, self.keys.job(job_id), new_id)

    async def _retry_arguments(self, job_id: str, record: dict[str, str]) -> tuple[list[Any], dict[str, Any]]:
        if record.get("args_json") == "1":
            try:
                args, kwargs = json.loads(record["args"]), json.loads(record["kwargs"])
            except (KeyError, ValueError):
                args, kwargs = None, None
            if isinstance(args, list) and isinstance(kwargs, dict):
                return args, kwargs
        # Not JSON: arq's own result keeps the real values for an hour after the failure.
        result = await Job(job_id, await self._pool()).result_info()
        if result is None:
            raise Conflict(
                f"job {job_id!r} cannot be retried from here: its arguments are not JSON and arq no longer keeps "
                "its result"
            )
        return list(result.args), dict(result.kwargs)
