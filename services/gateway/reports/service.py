"""Builds the report from the system log: the current file and its rotated siblings, read line by line.

Only the aggregates stay in memory. Durations are kept per route and task (8 bytes each, in arrays) so the
percentiles are exact rather than estimated: a million requests in a window cost about 8 MB.
"""

from __future__ import annotations

import asyncio
import math
from array import array
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from services.gateway.reports.schemas import (
    AlertStats,
    DeliveryStats,
    ReportOut,
    RouteStats,
    SourceStats,
    StreamStats,
    TaskStats,
)
from shared.errors import ValidationFailed
from shared.system_log import log_files
from shared.timeparse import parse_since, parse_time


def percentile(ordered: list[float], q: float) -> float | None:
    """Nearest rank: the smallest observed value with at least ``q`` of the values at or below it."""
    if not ordered:
        return None
    rank = max(1, math.ceil(q * len(ordered)))
    return round(ordered[rank - 1], 3)


def _number(value: Any) -> float | None:
    # bool is an int to Python, never a duration or a count.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _text(value: Any, default: str = "unknown") -> str:
    return value[:200] if isinstance(value, str) and value else default


@dataclass
class _Route:
    count: int = 0
    status_4xx: int = 0
    status_5xx: int = 0
    durations: array[float] = field(default_factory=lambda: array("d"))


@dataclass
class _Task:
    started: int = 0
    completed: int = 0
    failed: int = 0
    retried: int = 0
    last_error: str | None = None
    durations: array[float] = field(default_factory=lambda: array("d"))


@dataclass
class _Source:
    kind: str | None = None
    # (moment, connected?) in the window; sorted at the end: several processes append to one file, so lines
    # are in write order, which can differ from timestamp order by a little.
    transitions: list[tuple[datetime, bool]] = field(default_factory=list)
    before: tuple[datetime, bool] | None = None  # the last transition seen before the window
    connects: int = 0
    disconnects: int = 0
    errors: int = 0
    last_error: str | None = None


@dataclass
class _Stream:
    reclaimed: int = 0
    dead_lettered: int = 0
    started: int = 0
    stopped: int = 0


class ReportBuilder:
    """Folds log lines of one window into the report's aggregates."""

    def __init__(self, since: datetime, until: datetime) -> None:
        self.since = since
        self.until = until
        self.lines_read = 0
        self.lines_skipped = 0
        self.outside = 0
        self.levels: Counter[str] = Counter()
        self.routes: dict[tuple[str, str, str], _Route] = {}
        self.tasks: dict[str, _Task] = {}
        self.sources: dict[str, _Source] = {}
        self.streams: dict[str, _Stream] = {}
        self.fired = 0
        self.deliveries: dict[tuple[str, str], array[float]] = {}
        self.delivery_counts: Counter[tuple[str, str]] = Counter()

    def feed_file(self, path: Path) -> bool:
        """Reads one file; False if it is gone (a rotated file removed by the cleanup job meanwhile)."""
        try:
            handle = path.open("rb")
        except FileNotFoundError:
            return False
        with handle:
            for raw in handle:
                if raw.strip():
                    self.feed_line(raw)
        return True

    def feed_line(self, raw: bytes) -> None:
        self.lines_read += 1
        try:
            line = orjson.loads(raw)
            moment = datetime.fromisoformat(line["timestamp"])
        except (orjson.JSONDecodeError, TypeError, KeyError, ValueError):
            # A torn last line (a writer killed mid-write, or the disk full), or not ours.
            self.lines_skipped += 1
            return
        if not isinstance(line, dict):
            self.lines_skipped += 1
            return
        moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment
        event = line.get("event")
        if moment < self.since:
            self.outside += 1
            if event in ("source_connected", "source_disconnected"):
                # The source's state when the window opens.
                state = self._source(line)
                if state.before is None or state.before[0] <= moment:
                    state.before = (moment, event == "source_connected")
            return
        if moment > self.until:
            self.outside += 1
            return
        self.levels[_text(line.get("level"))] += 1
        handler = _HANDLERS.get(event) if isinstance(event, str) else None
        if handler is not None:
            handler(self, line, moment)

    def _source(self, line: dict[str, Any]) -> _Source:
        name = _text(line.get("source"))
        state = self.sources.get(name)
        if state is None:
            state = self.sources[name] = _Source()
        if isinstance(line.get("kind"), str):
            state.kind = line["kind"]
        return state

    def _request(self, line: dict[str, Any], moment: datetime) -> None:
        key = (_text(line.get("service")), _text(line.get("method")), _text(line.get("route"), "unmatched"))
        route = self.routes.get(key)
        if route is None:
            route = self.routes[key] = _Route()
        route.count += 1
        status = _number(line.get("status"))
        if status is not None and 400 <= status < 500:
            route.status_4xx += 1
        elif status is not None and status >= 500:
            route.status_5xx += 1
        duration = _number(line.get("duration_ms"))
        if duration is not None:
            route.durations.append(duration)

    def _task(self, line: dict[str, Any], moment: datetime) -> None:
        name = _text(line.get("task"))
        task = self.tasks.get(name)
        if task is None:
            task = self.tasks[name] = _Task()
        event = line["event"]
        if event == "task_started":
            task.started += 1
            return
        if event == "task_completed":
            task.completed += 1
        else:
            task.failed += 1
            task.retried += line.get("will_retry") is True
            task.last_error = _text(line.get("error"), "") or task.last_error
        duration = _number(line.get("duration_ms"))
        if duration is not None:
            task.durations.append(duration)

    def _source_event(self, line: dict[str, Any], moment: datetime) -> None:
        state = self._source(line)
        event = line["event"]
        if event == "source_connected":
            state.connects += 1
            state.transitions.append((moment, True))
            return
        state.errors += 1
        state.last_error = _text(line.get("reason"), "") or state.last_error
        if event == "source_disconnected":
            state.disconnects += 1
            state.transitions.append((moment, False))

    def _stream(self, line: dict[str, Any], moment: datetime) -> None:
        name = _text(line.get("stream"))
        stream = self.streams.get(name)
        if stream is None:
            stream = self.streams[name] = _Stream()
        event = line["event"]
        if event == "consumer_reclaimed":
            count = _number(line.get("count"))
            stream.reclaimed += int(count) if count is not None and count > 0 else 0
        elif event == "consumer_dead_lettered":
            stream.dead_lettered += 1
        elif event == "consumer_started":
            stream.started += 1
        else:
            stream.stopped += 1

    def _alert(self, line: dict[str, Any], moment: datetime) -> None:
        if line["event"] == "alert_fired":
            self.fired += 1
            return
        key = (_text(line.get("channel")), _text(line.get("outcome")))
        self.delivery_counts[key] += 1
        duration = _number(line.get("duration_ms"))
        if duration is not None:
            self.deliveries.setdefault(key, array("d")).append(duration)

    def _uptime(self, state: _Source) -> tuple[float, bool]:
        """Seconds connected in the window, and whether connected at its end."""
        transitions = sorted(state.transitions, key=lambda t: t[0])
        if state.before is not None:
            connected = state.before[1]
        elif transitions:
            # No earlier line: a disconnect as the first change means it was connected when the window opened.
            connected = not transitions[0][1]
        else:
            connected = False  # only errors: never seen connected
        seconds = 0.0
        mark = self.since
        for moment, now_connected in transitions:
            if connected:
                seconds += (moment - mark).total_seconds()
            mark, connected = moment, now_connected
        if connected:
            seconds += (self.until - mark).total_seconds()
        return seconds, connected

    def result(self, log_path: Path, files: list[Path], skipped_files: int) -> ReportOut:
        window = max((self.until - self.since).total_seconds(), 1e-9)
        requests = []
        for (service, method, route_name), route in sorted(self.routes.items()):
            ordered = sorted(route.durations)
            requests.append(
                RouteStats(
                    service=service, method=method, route=route_name, count=route.count,
                    status_4xx=route.status_4xx, status_5xx=route.status_5xx,
                    error_rate_4xx=round(route.status_4xx / route.count, 4),
                    error_rate_5xx=round(route.status_5xx / route.count, 4),
                    p50_ms=percentile(ordered, 0.50), p95_ms=percentile(ordered, 0.95),
                    p99_ms=percentile(ordered, 0.99), max_ms=round(ordered[-1], 3) if ordered else None,
                )
            )  # fmt: skip
        tasks = []
        for name, task in sorted(self.tasks.items()):
            ordered = sorted(task.durations)
            finished = task.completed + task.failed
            tasks.append(
                TaskStats(
                    task=name, started=task.started, completed=task.completed, failed=task.failed,
                    retried=task.retried, failure_rate=round(task.failed / finished, 4) if finished else None,
                    p50_ms=percentile(ordered, 0.50), p95_ms=percentile(ordered, 0.95), last_error=task.last_error,
                )
            )  # fmt: skip
        sources = []
        for name, state in sorted(self.sources.items()):
            if not (state.transitions or state.errors or state.before):
                continue
            seconds, at_end = self._uptime(state)
            sources.append(
                SourceStats(
                    source=name, kind=state.kind, uptime=round(min(seconds / window, 1.0), 4),
                    connected_seconds=round(seconds, 3), connected_at_end=at_end, connects=state.connects,
                    disconnects=state.disconnects, errors=state.errors, last_error=state.last_error,
                )
            )  # fmt: skip
        deliveries = [
            DeliveryStats(
                channel=channel, outcome=outcome, count=count,
                p95_ms=percentile(sorted(self.deliveries.get((channel, outcome), ())), 0.95),
            )
            for (channel, outcome), count in sorted(self.delivery_counts.items())
        ]  # fmt: skip
        by_outcome: Counter[str] = Counter()
        for (_channel, outcome), count in self.delivery_counts.items():
            by_outcome[outcome] += count
        return ReportOut(
            since=self.since, until=self.until, log_path=str(log_path), files=[p.name for p in files],
            files_read=len(files), files_skipped=skipped_files, lines_read=self.lines_read,
            lines_skipped=self.lines_skipped, lines_outside_window=self.outside,
            levels=dict(sorted(self.levels.items())), requests=requests, tasks=tasks, sources=sources,
            alerts=AlertStats(fired=self.fired, by_outcome=dict(sorted(by_outcome.items())), deliveries=deliveries),
            streams=[
                StreamStats(stream=name, reclaimed=s.reclaimed, dead_lettered=s.dead_lettered,
                            consumers_started=s.started, consumers_stopped=s.stopped)
                for name, s in sorted(self.streams.items())
            ],
        )  # fmt: skip


_HANDLERS = {
    "request_finished": ReportBuilder._request,
    "task_started": ReportBuilder._task,
    "task_completed": ReportBuilder._task,
    "task_failed": ReportBuilder._task,
    "source_connected": ReportBuilder._source_event,
    "source_disconnected": ReportBuilder._source_event,
    "source_error": ReportBuilder._source_event,
    "consumer_started": ReportBuilder._stream,
    "consumer_stopped": ReportBuilder._stream,
    "consumer_reclaimed": ReportBuilder._stream,
    "consumer_dead_lettered": ReportBuilder._stream,
    "alert_fired": ReportBuilder._alert,
    "alert_delivered": ReportBuilder._alert,
}


def _files_in_window(paths: list[Path], since: datetime) -> Iterator[Path | None]:
    """Each file, or None for one last written before ``since`` (none of its lines can be in the window)."""
    for path in paths:
        try:
            modified = path.stat().st_mtime
        except FileNotFoundError:
            continue
        yield None if modified < since.timestamp() else path


def build_report(log_path: Path, since: datetime, until: datetime) -> ReportOut:
    """The report of ``[since, until]`` from the system log at ``log_path`` (blocking: file reads)."""
    builder = ReportBuilder(since, until)
    read: list[Path] = []
    skipped = 0
    for path in _files_in_window(log_files(log_path), since):
        if path is None:
            skipped += 1
        elif builder.feed_file(path):
            read.append(path)
    return builder.result(log_path, read, skipped)


def window(since: str, until: str | None, now: datetime | None = None) -> tuple[datetime, datetime]:
    """The window from the caller's words: ``since`` a span ("24h") or a moment, ``until`` a moment or now."""
    now = now or datetime.now(UTC)
    end = parse_time(until, "until") if until else now
    start = parse_since(since, "since", end)
    if start >= end:
        raise ValidationFailed("since: the window must start before it ends", details={"parameter": "since"})
    return start, end


class ReportService:
    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path

    async def report(self, since: str, until: str | None = None) -> ReportOut:
        start, end = window(since, until)
        # A day of log is many megabytes: parsed off the event loop.
        return await asyncio.to_thread(build_report, self.log_path, start, end)
