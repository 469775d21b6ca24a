"""Builds the report from the system log: the current file and its rotated siblings, read line by line.

Only the aggregates stay in memory: durations go into a bounded latency summary per route, task and delivery
outcome (services/gateway/reports/latency.py: percentiles within 1% of the exact ones), so the memory a report
takes depends on how many routes and tasks there are, not on how many lines the window holds.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from services.gateway.reports.latency import LatencySummary
from services.gateway.reports.schemas import (
    AlertStats,
    DeliveryStats,
    ReportOut,
    RouteStats,
    SourceStats,
    StreamStats,
    TaskStats,
)
from shared.errors import ServiceUnavailable, ValidationFailed
from shared.system_log import log_files
from shared.timeparse import parse_since, parse_time


def _number(value: Any) -> float | None:
    # bool is an int to Python, never a duration or a count.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _text(value: Any, default: str = "unknown") -> str:
    return value[:200] if isinstance(value, str) and value else default


# Ingest starting means every link it had is gone, whether it said so (a stop logs source_disconnected with
# reason "stopped") or not (kill -9, a crash, an OOM kill): each source is down until its next source_connected.
INGEST = "ingest"
STOPPED = "stopped"
# Bytes a line about a source's state contains: rotated files older than the window are searched for these
# alone (no JSON parsing of the other lines) to learn each source's state when the window opens.
_STATE_MARKERS = (b'"source_', b"service_starting")
_CHUNK = 1 << 20


def _parse(raw: bytes) -> tuple[dict[str, Any], datetime] | None:
    """A line's object and moment, or None for a line that is not ours (or torn)."""
    try:
        line = orjson.loads(raw)
        moment = datetime.fromisoformat(line["timestamp"])
    except (orjson.JSONDecodeError, TypeError, KeyError, ValueError):
        return None
    if not isinstance(line, dict):
        return None
    return line, moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _state_lines(path: Path) -> Iterator[bytes]:
    """The lines of ``path`` holding one of the state markers, found by byte search over 1 MiB chunks."""
    with path.open("rb") as handle:
        rest = b""
        while True:
            chunk = handle.read(_CHUNK)
            block = rest + chunk
            end = len(block) if not chunk else block.rfind(b"\n") + 1
            block, rest = block[:end], block[end:]
            found: dict[int, int] = {}
            for marker in _STATE_MARKERS:
                at = block.find(marker)
                while at != -1:
                    start = block.rfind(b"\n", 0, at) + 1
                    stop = block.find(b"\n", at)
                    stop = len(block) if stop == -1 else stop
                    found[start] = stop
                    at = block.find(marker, stop)
            for start in sorted(found):
                yield block[start : found[start]]
            if not chunk:
                return


@dataclass
class _Route:
    count: int = 0
    status_4xx: int = 0
    status_5xx: int = 0
    durations: LatencySummary = field(default_factory=LatencySummary)


@dataclass
class _Task:
    started: int = 0
    completed: int = 0
    failed: int = 0
    retried: int = 0
    last_error: str | None = None
    durations: LatencySummary = field(default_factory=LatencySummary)


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
        self.deliveries: dict[tuple[str, str], LatencySummary] = {}
        self.delivery_counts: Counter[tuple[str, str]] = Counter()
        # Moments ingest started: in the window, and the last one before it.
        self.restarts: list[datetime] = []
        self.restart_before: datetime | None = None

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

    def feed_states(self, path: Path) -> bool:
        """Only the lines of ``path`` that tell a source's state before the window (a rotated file written
        before it, otherwise skipped); False if the file is gone."""
        try:
            for raw in _state_lines(path):
                parsed = _parse(raw)
                if parsed is not None and parsed[1] < self.since:
                    self._before_window(*parsed)
        except FileNotFoundError:
            return False
        return True

    def _before_window(self, line: dict[str, Any], moment: datetime) -> None:
        """A line before the window: kept only for the sources' states when the window opens."""
        event = line.get("event")
        if event in ("source_connected", "source_disconnected"):
            state = self._source(line)
            if state.before is None or state.before[0] <= moment:
                state.before = (moment, event == "source_connected")
        elif (
            event == "service_starting"
            and line.get("service") == INGEST
            and (self.restart_before is None or self.restart_before < moment)
        ):
            self.restart_before = moment

    def feed_line(self, raw: bytes) -> None:
        self.lines_read += 1
        parsed = _parse(raw)
        if parsed is None:
            # A torn last line (a writer killed mid-write, or the disk full), or not ours.
            self.lines_skipped += 1
            return
        line, moment = parsed
        event = line.get("event")
        if moment < self.since:
            self.outside += 1
            self._before_window(line, moment)
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
        if duration is not None and duration >= 0:
            route.durations.add(duration)

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
        if duration is not None and duration >= 0:
            task.durations.add(duration)

    def _source_event(self, line: dict[str, Any], moment: datetime) -> None:
        state = self._source(line)
        event = line["event"]
        if event == "source_connected":
            state.connects += 1
            state.transitions.append((moment, True))
            return
        if event == "source_disconnected":
            state.disconnects += 1
            state.transitions.append((moment, False))
            if line.get("reason") == STOPPED:
                return  # ingest closed the link on purpose: downtime, not an error
        state.errors += 1
        state.last_error = _text(line.get("reason"), "") or state.last_error

    def _service_start(self, line: dict[str, Any], moment: datetime) -> None:
        if line.get("service") == INGEST:
            self.restarts.append(moment)

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
        if duration is not None and duration >= 0:
            summary = self.deliveries.get(key)
            if summary is None:
                summary = self.deliveries[key] = LatencySummary()
            summary.add(duration)

    def _uptime(self, state: _Source) -> tuple[float, bool]:
        """Seconds connected in the window, and whether connected at its end."""
        own = sorted(state.transitions, key=lambda t: t[0])
        restart = self.restart_before
        # At the same moment, the connect came after the start (ingest logs its start before opening sources).
        if state.before is not None and (restart is None or restart <= state.before[0]):
            connected = state.before[1]
        elif restart is not None:
            connected = False  # ingest restarted before the window, and the source did not connect since
        elif own:
            # No earlier line: a disconnect as the first change means it was connected when the window opened.
            connected = not own[0][1]
        else:
            connected = False  # only errors: never seen connected
        # An ingest start takes every source down; at the same moment as a connect, the start goes first.
        transitions = sorted([(moment, False) for moment in self.restarts] + own, key=lambda t: t[0])
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
            latency = route.durations
            requests.append(
                RouteStats(
                    service=service, method=method, route=route_name, count=route.count,
                    status_4xx=route.status_4xx, status_5xx=route.status_5xx,
                    error_rate_4xx=round(route.status_4xx / route.count, 4),
                    error_rate_5xx=round(route.status_5xx / route.count, 4),
                    p50_ms=latency.quantile(0.50), p95_ms=latency.quantile(0.95),
                    p99_ms=latency.quantile(0.99), max_ms=latency.max_ms(),
                )
            )  # fmt: skip
        tasks = []
        for name, task in sorted(self.tasks.items()):
            finished = task.completed + task.failed
            tasks.append(
                TaskStats(
                    task=name, started=task.started, completed=task.completed, failed=task.failed,
                    retried=task.retried, failure_rate=round(task.failed / finished, 4) if finished else None,
                    p50_ms=task.durations.quantile(0.50), p95_ms=task.durations.quantile(0.95),
                    last_error=task.last_error,
                )
            )  # fmt: skip
        sources = []
        for name, state in sorted(self.sources.items()):
            # A source whose last word came before ingest's last start, and with nothing in the window, is no
            # longer run (removed from the configuration): left out, as one never seen.
            restart = self.restart_before
            known = state.before is not None and (restart is None or restart <= state.before[0])
            if not (state.transitions or state.errors or known):
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
                p95_ms=self.deliveries[(channel, outcome)].quantile(0.95)
                if (channel, outcome) in self.deliveries else None,
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
    "service_starting": ReportBuilder._service_start,
    "consumer_started": ReportBuilder._stream,
    "consumer_stopped": ReportBuilder._stream,
    "consumer_reclaimed": ReportBuilder._stream,
    "consumer_dead_lettered": ReportBuilder._stream,
    "alert_fired": ReportBuilder._alert,
    "alert_delivered": ReportBuilder._alert,
}


def _files_in_window(paths: list[Path], since: datetime) -> Iterator[tuple[Path, bool]]:
    """Each file, and False for one last written before ``since`` (none of its lines can be in the window)."""
    for path in paths:
        try:
            modified = path.stat().st_mtime
        except FileNotFoundError:
            continue
        yield path, modified >= since.timestamp()


def build_report(log_path: Path, since: datetime, until: datetime) -> ReportOut:
    """The report of ``[since, until]`` from the system log at ``log_path`` (blocking: file reads)."""
    builder = ReportBuilder(since, until)
    read: list[Path] = []
    older: list[Path] = []
    for path, in_window in _files_in_window(log_files(log_path), since):
        if not in_window:
            older.append(path)
        elif builder.feed_file(path):
            read.append(path)
    # The sources' states when the window opens, from the files before it, newest first: a stable source's
    # only source_connected can be days old. Once an ingest start is known, nothing older matters.
    for path in reversed(older):
        if builder.restart_before is not None:
            break
        builder.feed_states(path)
    return builder.result(log_path, read, len(older))


def window(since: str, until: str | None, now: datetime | None = None) -> tuple[datetime, datetime]:
    """The window from the caller's words: ``since`` a span ("24h") or a moment, ``until`` a moment or now."""
    now = now or datetime.now(UTC)
    end = parse_time(until, "until") if until else now
    start = parse_since(since, "since", end)
    if start >= end:
        raise ValidationFailed("since: the window must start before it ends", details={"parameter": "since"})
    return start, end


def clamp_to_retention(
    start: datetime, end: datetime, retention_days: float, now: datetime | None = None
) -> tuple[datetime, bool]:
    """The window's start moved up to the oldest moment the log keeps, and whether it had to be."""
    oldest = (now or datetime.now(UTC)) - timedelta(days=retention_days)
    if start >= oldest:
        return start, False
    if end <= oldest:
        raise ValidationFailed(
            f"until: the system log keeps {retention_days:g} days; the window ends before that",
            details={"parameter": "until"},
        )
    return oldest, True


class ReportService:
    """The gateway's reports: one built at a time (a build is a thread reading files, holding the GIL while it
    parses), over at most the log's retention."""

    def __init__(self, log_path: Path, retention_days: float = 7.0, wait_seconds: float = 5.0) -> None:
        self.log_path = log_path
        self.retention_days = retention_days
        # How long a second request waits for the one being built before it is told to come back.
        self.wait_seconds = wait_seconds
        self.building = asyncio.Semaphore(1)

    async def report(self, since: str, until: str | None = None) -> ReportOut:
        start, end = window(since, until)
        start, clamped = clamp_to_retention(start, end, self.retention_days)
        try:
            async with asyncio.timeout(self.wait_seconds):
                await self.building.acquire()
        except TimeoutError:
            raise ServiceUnavailable("another report is being built; retry shortly", retry_after=5) from None
        try:
            # A day of log is many megabytes: parsed off the event loop.
            report = await asyncio.to_thread(build_report, self.log_path, start, end)
        finally:
            self.building.release()
        report.window_clamped = clamped
        return report
