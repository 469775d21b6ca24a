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
from arq.jobs import Job, JobDef
from redis.asyncio import Redis

from shared.errors import Conflict, NotFound
from shared.jobs import COUNT_WINDOW_HOURS, TASK_RECORD_TTL, JobQueue, TaskKeys, encode_arguments, queue_name
from shared.settings import Settings
from shared.timeparse import iso_z

STATUSES = ("queued", "running", "completed", "failed")
COUNTED = ("completed", "failed", "retried")


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _decoded(raw: dict[Any, Any]) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in raw.items()}


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
        started = [_text(j) for j in await self.redis.zrevrange(self.keys.running(name), 0, -1)]
        live = await self._in_progress(started)
        running = [j for j in started if j in live]
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
                ids = [_text(j) for j in await self.redis.zrevrange(self.keys.finished(name, kind), 0, limit - 1)]
                records = await self._records(ids)
                # A job run again since (its id re-enqueued) shows under its current status only.
                out[kind] = [job_view(j, r) for j, r in records.items() if r.get("status") == kind]
        return out

    async def _queued(self, name: str, arq_queue: str, limit: int) -> list[dict[str, Any]]:
        pool = await self._pool()
        # Read past running jobs (still in arq's set) to fill the page with waiting ones.
        entries = [_text(j) for j in await self.redis.zrange(arq_queue, 0, limit * 2 + 50)]
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
        if (record is None or record.get("status") == "queued") and not await self._in_progress([job_id]):
            for name in await self.queues():
                arq_queue = queue_name(self.settings, name)
                if await self.redis.zscore(arq_queue, job_id) is None:
                    continue
                definition = await Job(job_id, await self._pool(), _queue_name=arq_queue).info()
                if definition is not None:
                    return _queued_view(job_id, name, definition, record)
        if record is None:
            raise NotFound(f"no job {job_id!r} in the last {COUNT_WINDOW_HOURS} hours")
        return job_view(job_id, record)

    async def retry(self, job_id: str) -> dict[str, Any]:
        """Enqueues a failed job again, same function, arguments and queue, under a new id (arq refuses an id
        whose result it still keeps). Jobs are idempotent, so running one again is safe."""
        record = (await self._records([job_id])).get(job_id)
        if record is None:
            raise NotFound(f"no job {job_id!r} in the last {COUNT_WINDOW_HOURS} hours")
        if record.get("status") != "failed":
            raise Conflict(
                f"job {job_id!r} is {record.get('status', 'unknown')}: only a failed job can be retried",
                details={"status": record.get("status")},
            )
        args, kwargs = await self._retry_arguments(job_id, record)
        task, queue = record.get("task", ""), record.get("queue", "")
        # Named after the first job of the chain, so that retrying a retry does not grow the id.
        root = job_id.split(":retry:")[0]
        new_id = f"{root}:retry:{uuid.uuid4().hex[:12]}"
        args_text, kwargs_text, as_json = encode_arguments(args, kwargs)
        key = self.keys.job(new_id)
        # The record first: the worker may start the job at once, and its own write must come after this one.
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={
                "task": task, "queue": queue, "status": "queued", "enqueued_at": iso_z(datetime.now(UTC)),
                "args": args_text, "kwargs": kwargs_text, "args_json": int(as_json), "retry_of": job_id,
            })  # fmt: skip
            pipe.expire(key, TASK_RECORD_TTL)
            await pipe.execute()
        queued = await self.jobs.enqueue(queue, task, *args, job_id=new_id, kwargs=kwargs)
        if not queued:  # a fresh random id: only if arq already holds it
            raise Conflict(f"job {new_id!r} already exists")
        await self.redis.hset(self.keys.job(job_id), "retried_as", new_id)
        return {"job_id": new_id, "retry_of": job_id, "task": task, "queue": queue, "status": "queued"}

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
