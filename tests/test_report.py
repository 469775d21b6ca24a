"""Log reports (services/gateway/reports, `coinlytics report`): built from the system log as the platform writes it.

End to end: the gateway on a real server writes its request lines through the real logging setup into the
system log, and its own GET /api/v1/admin/report counts them back. Unit level: files written with the real
writer (shared/system_log.py), rotated siblings, a torn last line and lines outside the window give exact
counts; uptime from connect/disconnect events; the command's three formats; the HTML page in chromium.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import re
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import structlog
from plotly.offline import get_plotlyjs

from coinlytics.cli import main
from services.gateway.app import create_app as gateway_app
from services.gateway.reports.latency import LatencySummary
from services.gateway.reports.service import ReportService, build_report, clamp_to_retention, window
from services.ingest.runner import SourceRunner
from services.ingest.sim import SimSource
from shared.errors import ServiceUnavailable, ValidationFailed
from shared.logging import configure_logging
from shared.settings import Settings
from shared.streams import StreamPublisher
from shared.system_log import SystemLog, rotated_name
from tests.accounts import bearer, register, tokens
from tests.browser import Browser, on_this_machine
from tests.conftest import ROOT, eventually, serve_app

REPORT = "/api/v1/admin/report"


def stamp(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


class LogWriter:
    """Lines in the catalogue's schema, appended by the platform's own writer."""

    def __init__(self, path: Path, **options: Any) -> None:
        self.writer = SystemLog(path, **options)

    def line(self, moment: datetime, event: str, service: str = "gateway", level: str = "info", **fields: Any) -> None:
        record = {"timestamp": stamp(moment), "level": level, "service": service, "event": event, **fields}
        assert self.writer.write(orjson.dumps(record))

    def request(self, moment: datetime, route: str, status: int, duration_ms: float, method: str = "GET") -> None:
        self.line(moment, "request_finished", method=method, path=route, route=route, status=status,
                  duration_ms=duration_ms, correlation_id=uuid.uuid4().hex)  # fmt: skip

    def close(self) -> None:
        self.writer.close()


# --- the percentile and the window ------------------------------------------------------------------------


def summary(values: list[float]) -> LatencySummary:
    latency = LatencySummary()
    for value in values:
        latency.add(value)
    return latency


def exact(values: list[float], q: float) -> float:
    """Nearest rank over the sorted values: what the summary estimates."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


def test_small_samples_of_distinct_buckets_are_exact() -> None:
    values = [float(v) for v in range(1, 101)]
    latency = summary(values)
    assert (latency.quantile(0.50), latency.quantile(0.95), latency.quantile(0.99)) == (50.0, 95.0, 99.0)
    assert latency.max_ms() == 100.0
    assert summary([7.0]).quantile(0.99) == 7.0
    assert summary([0.0, 0.0, 3.0]).quantile(0.5) == 0.0  # zero has its own bucket
    assert LatencySummary().quantile(0.5) is None and LatencySummary().max_ms() is None


def test_percentiles_stay_within_one_percent_of_the_exact_ones_in_bounded_memory() -> None:
    rng = random.Random(13)
    # Long-tailed, as latencies are: lognormal around 20 ms, plus a slow 2% from 0.5 s to 30 s.
    values = [rng.lognormvariate(math.log(20), 0.8) for _ in range(200_000)]
    values += [rng.uniform(500, 30_000) for _ in range(4_000)]
    rng.shuffle(values)
    latency = summary(values)
    for q in (0.01, 0.25, 0.50, 0.90, 0.95, 0.99, 0.999, 1.0):
        estimate, truth = latency.quantile(q), exact(values, q)
        assert estimate is not None
        assert abs(estimate - truth) <= 0.01 * truth, (q, estimate, truth)
    assert latency.max_ms() == round(max(values), 3)
    assert latency.count == len(values)
    # 204,000 durations in a few hundred buckets: log(30000 / 0.1) / log(1.01) is about 1,270 at most.
    assert len(latency.buckets) < 1_300


def test_the_window_takes_spans_and_moments_and_refuses_the_rest() -> None:
    now = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    assert window("15m", None, now) == (now - timedelta(minutes=15), now)
    assert window("24h", None, now) == (now - timedelta(hours=24), now)
    assert window("7D", None, now) == (now - timedelta(days=7), now)
    assert window("2026-12-01T10:00:00Z", None, now) == (datetime(2026, 12, 1, 10, tzinfo=UTC), now)
    # A span counts back from the window's end.
    assert window("1h", "2026-11-30T00:00:00Z", now)[0] == datetime(2026, 11, 29, 23, tzinfo=UTC)
    for bad in ("banana", "0h", "-5m", "", "1.5h", "9" * 5000 + "d", "2026-12-01T13:00:00Z", "99999999999d"):
        with pytest.raises(ValidationFailed):
            window(bad, None, now)


# --- exact counts from known files --------------------------------------------------------------------------


def test_known_lines_in_rotated_and_current_files_give_exact_counts(tmp_path: Path) -> None:
    path = tmp_path / "coinlytics_system.log"
    now = datetime.now(UTC)
    since, until = now - timedelta(hours=1), now + timedelta(minutes=1)
    inside = now - timedelta(minutes=30)

    # A rotated file last written two days ago: its lines cannot be in the window, so it is not even read.
    old = rotated_name(path, now - timedelta(days=2))
    old.write_bytes(b"".join(
        orjson.dumps({"timestamp": stamp(now - timedelta(days=2)), "level": "info", "service": "gateway",
                      "event": "request_finished", "method": "GET", "route": "/api/v1/coins", "status": 200,
                      "duration_ms": 1.0}) + b"\n" for _ in range(5)
    ))  # fmt: skip
    old_time = (now - timedelta(days=2)).timestamp()
    os.utime(old, (old_time, old_time))

    # The first batch fills the file past its limit, so the writer itself rotates it aside.
    first = [
        ("/api/v1/coins", 200, 10.0),
        ("/api/v1/coins", 404, 20.0),
        ("/api/v1/coins/{symbol}", 200, 5.0),
    ]
    log = LogWriter(path, max_bytes=10**9)
    for route, status, duration in first:
        log.request(inside, route, status, duration)
    log.close()
    size = path.stat().st_size
    path.unlink()
    log = LogWriter(path, max_bytes=size)
    for route, status, duration in first:
        log.request(inside, route, status, duration)
    log.close()
    rotated = sorted(p.name for p in tmp_path.glob("coinlytics_system.2*.log") if p != old)
    assert len(rotated) == 1, "the writer rotated the full file aside"
    log = LogWriter(path, max_bytes=10**9)

    # The current file: more requests, tasks, sources, alerts, consumers, an old line, garbage, a torn line.
    log.request(inside, "/api/v1/coins", 503, 30.0)
    log.request(inside, "/api/v1/prices", 200, 2.0, method="GET")
    log.request(inside, "/api/v1/alerts", 422, 4.0, method="POST")
    log.request(now - timedelta(hours=2), "/api/v1/coins", 200, 999.0)  # before the window
    log.line(inside, "request_started", method="GET", path="/api/v1/coins", correlation_id="x")
    log.line(inside, "task_started", service="alerting", task="deliver_alert", job_id="1", queue="q", attempt=1)
    log.line(inside, "task_completed", service="alerting", task="deliver_alert", job_id="1", queue="q", attempt=1,
             duration_ms=100.0)  # fmt: skip
    log.line(inside, "task_started", service="alerting", task="deliver_alert", job_id="2", queue="q", attempt=1)
    log.line(inside, "task_failed", service="alerting", task="deliver_alert", job_id="2", queue="q", attempt=1,
             duration_ms=300.0, error="TimeoutError: slow", will_retry=True, level="warning")  # fmt: skip
    log.line(inside, "task_started", service="pricing", task="retention", job_id="3", queue="q", attempt=1)
    log.line(inside, "alert_fired", service="alerting", alert_id="a", event_id="e1", symbol="BTC", vs="USD",
             condition="price_above")  # fmt: skip
    log.line(inside, "alert_fired", service="alerting", alert_id="a", event_id="e2", symbol="BTC", vs="USD",
             condition="price_above")  # fmt: skip
    for channel, outcome in (("webhook", "delivered"), ("webhook", "retrying"), ("webhook", "delivered"),
                             ("email", "failed")):  # fmt: skip
        log.line(inside, "alert_delivered", service="alerting", alert_id="a", event_id="e1", channel=channel,
                 outcome=outcome, attempt=1, duration_ms=50.0)  # fmt: skip
    log.line(inside, "consumer_started", service="pricing", stream="ticks", group="pricing", consumer="c1")
    log.line(inside, "consumer_reclaimed", service="pricing", stream="ticks", group="pricing", consumer="c1",
             count=3)  # fmt: skip
    log.line(inside, "consumer_reclaimed", service="pricing", stream="ticks", group="pricing", consumer="c1",
             count=2)  # fmt: skip
    log.line(inside, "consumer_dead_lettered", service="pricing", stream="ticks", group="pricing", entry_id="1-0",
             reason="poison")  # fmt: skip
    log.line(inside, "something_else", level="error")
    log.close()
    with path.open("ab") as handle:
        handle.write(b"not json at all\n")
        handle.write(b'["a", "list"]\n')
        handle.write(b'{"level": "info", "event": "request_finished"}\n')  # no timestamp
        handle.write(b'{"timestamp": "' + stamp(inside).encode() + b'", "event": "request_fin')  # torn

    report = build_report(path, since, until)

    assert report.files == [*rotated, "coinlytics_system.log"]
    assert (report.files_read, report.files_skipped) == (2, 1)
    # Rotated: 3. Current: 3 + 1 old requests, 1 request_started, 5 task, 2 fired, 4 delivered, 4 consumer,
    # 1 other, 4 unparsable.
    assert report.lines_read == 3 + 25
    assert report.lines_skipped == 4
    assert report.lines_outside_window == 1
    assert report.levels == {"error": 1, "info": 21, "warning": 1}

    routes = {(r.method, r.route): r for r in report.requests}
    assert set(routes) == {("GET", "/api/v1/coins"), ("GET", "/api/v1/coins/{symbol}"), ("GET", "/api/v1/prices"),
                           ("POST", "/api/v1/alerts")}  # fmt: skip
    coins = routes[("GET", "/api/v1/coins")]
    # Two from the rotated file, one (503) from the current one; the old line and the skipped file are out.
    assert (coins.count, coins.status_4xx, coins.status_5xx) == (3, 1, 1)
    assert (coins.p50_ms, coins.p95_ms, coins.p99_ms, coins.max_ms) == (20.0, 30.0, 30.0, 30.0)
    assert (coins.error_rate_4xx, coins.error_rate_5xx) == (0.3333, 0.3333)
    assert routes[("GET", "/api/v1/coins/{symbol}")].count == 1
    assert routes[("POST", "/api/v1/alerts")].status_4xx == 1

    tasks = {t.task: t for t in report.tasks}
    deliver = tasks["deliver_alert"]
    assert (deliver.started, deliver.completed, deliver.failed, deliver.retried) == (2, 1, 1, 1)
    assert deliver.failure_rate == 0.5
    assert (deliver.p50_ms, deliver.p95_ms) == (100.0, 300.0)
    assert deliver.last_error == "TimeoutError: slow"
    assert tasks["retention"].failure_rate is None  # started, not finished

    assert report.alerts.fired == 2
    assert report.alerts.by_outcome == {"delivered": 2, "failed": 1, "retrying": 1}
    assert [(d.channel, d.outcome, d.count) for d in report.alerts.deliveries] == [
        ("email", "failed", 1), ("webhook", "delivered", 2), ("webhook", "retrying", 1),
    ]  # fmt: skip
    [ticks] = report.streams
    assert (ticks.stream, ticks.reclaimed, ticks.dead_lettered, ticks.consumers_started) == ("ticks", 5, 1, 1)


def test_uptime_is_the_fraction_of_the_window_a_source_was_connected(tmp_path: Path) -> None:
    path = tmp_path / "coinlytics_system.log"
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)
    until = start + timedelta(minutes=60)

    def at(minutes: float) -> datetime:
        return start + timedelta(minutes=minutes)

    log = LogWriter(path)
    # Connected for minutes 10 to 40 of the 60.
    log.line(at(10), "source_connected", service="ingest", source="kraken", kind="ws")
    log.line(at(40), "source_disconnected", service="ingest", source="kraken", kind="ws", reason="closed")
    # Connected before the window (an earlier line in the file), disconnected at 30: up for the first half.
    log.line(at(-90), "source_connected", service="ingest", source="coinbase", kind="ws")
    log.line(at(30), "source_disconnected", service="ingest", source="coinbase", kind="ws", reason="timeout")
    log.line(at(31), "source_error", service="ingest", source="coinbase", kind="ws", reason="refused")
    # No earlier line, but its first change is a disconnect: it was up from the start, and again from 45 on.
    log.line(at(15), "source_disconnected", service="ingest", source="okx", kind="rest", reason="HTTP 503")
    log.line(at(45), "source_connected", service="ingest", source="okx", kind="rest")
    # Lines are in write order, which several processes can make differ a little from time order.
    log.line(at(50), "source_disconnected", service="ingest", source="bitstamp", kind="rest", reason="x")
    log.line(at(20), "source_connected", service="ingest", source="bitstamp", kind="rest")
    # Only errors: never connected.
    for minute in (5, 25, 55):
        log.line(at(minute), "source_error", service="ingest", source="gemini", kind="rest", reason="HTTP 500")
    log.close()

    sources = {s.source: s for s in build_report(path, start, until).sources}
    assert set(sources) == {"kraken", "coinbase", "okx", "bitstamp", "gemini"}
    kraken = sources["kraken"]
    assert (kraken.uptime, kraken.connected_seconds, kraken.connected_at_end) == (0.5, 1800.0, False)
    assert (kraken.connects, kraken.disconnects, kraken.errors, kraken.last_error) == (1, 1, 1, "closed")
    assert (sources["coinbase"].uptime, sources["coinbase"].errors) == (0.5, 2)
    assert sources["coinbase"].last_error == "refused"
    assert (sources["okx"].uptime, sources["okx"].connected_at_end, sources["okx"].kind) == (0.5, True, "rest")
    assert sources["bitstamp"].uptime == 0.5
    gemini = sources["gemini"]
    assert (gemini.uptime, gemini.errors, gemini.connects, gemini.connected_at_end) == (0.0, 3, 0, False)


def test_an_ingest_start_without_a_disconnect_is_downtime(tmp_path: Path) -> None:
    """kill -9 of ingest logs nothing; its next start (service_starting) says every link was gone."""
    path = tmp_path / "coinlytics_system.log"
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)

    def at(minutes: float) -> datetime:
        return start + timedelta(minutes=minutes)

    log = LogWriter(path)
    log.line(at(-30), "source_connected", service="ingest", source="kraken", kind="ws")
    log.line(at(-30), "source_connected", service="ingest", source="okx", kind="rest")
    # Killed at some point; started again at 20. kraken is back at 30, okx never.
    log.line(at(20), "service_starting", service="ingest")
    log.line(at(30), "source_connected", service="ingest", source="kraken", kind="ws")
    # Other services starting say nothing about sources.
    log.line(at(40), "service_starting", service="pricing")
    log.close()

    sources = {s.source: s for s in build_report(path, start, at(60)).sources}
    assert (sources["kraken"].connected_seconds, sources["kraken"].connected_at_end) == (50 * 60, True)
    assert (sources["okx"].connected_seconds, sources["okx"].connected_at_end) == (20 * 60, False)
    assert sources["okx"].disconnects == sources["okx"].errors == 0

    # A restart before the window: down at its start until the next connect. okx, not heard of since that
    # start, is no longer run (removed from the configuration): not listed.
    later = {s.source: s for s in build_report(path, at(25), at(60)).sources}
    assert set(later) == {"kraken"}
    assert (later["kraken"].connected_seconds, later["kraken"].connected_at_end) == (30 * 60, True)


def test_a_stable_source_connected_in_an_old_rotated_file_is_up_all_window(tmp_path: Path) -> None:
    path = tmp_path / "coinlytics_system.log"
    now = datetime.now(UTC).replace(microsecond=0)
    since, until = now - timedelta(hours=1), now

    def rotated(moment: datetime, lines: list[dict[str, Any]], filler: int = 2_000) -> Path:
        """A rotated file last written at ``moment``: many request lines around a few state lines."""
        target = rotated_name(path, moment)
        request = {"timestamp": stamp(moment), "level": "info", "service": "gateway", "event": "request_finished",
                   "method": "GET", "route": "/api/v1/prices", "status": 200, "duration_ms": 1.0}  # fmt: skip
        body = [orjson.dumps(request)] * filler + [orjson.dumps(line) for line in lines] + [orjson.dumps(request)]
        target.write_bytes(b"\n".join(body) + b"\n")
        os.utime(target, (moment.timestamp(), moment.timestamp()))
        return target

    def state(moment: datetime, event: str, **fields: Any) -> dict[str, Any]:
        return {"timestamp": stamp(moment), "level": "info", "service": "ingest", "event": event, **fields}

    day = timedelta(days=1)
    # Three days ago ingest started and both connected; two days ago okx was stopped (not an error).
    rotated(now - 3 * day, [state(now - 3 * day, "service_starting"),
                            state(now - 3 * day, "source_connected", source="binance", kind="ws"),
                            state(now - 3 * day, "source_connected", source="okx", kind="rest")])  # fmt: skip
    rotated(now - 2 * day, [state(now - 2 * day, "source_disconnected", source="okx", kind="rest",
                                  reason="stopped")])  # fmt: skip
    # An ingest start before those would reset them, but the newer start is what counts.
    rotated(now - 4 * day, [state(now - 4 * day, "service_starting")])
    log = LogWriter(path)
    log.request(now - timedelta(minutes=10), "/api/v1/prices", 200, 3.0)
    log.close()

    report = build_report(path, since, until)
    assert (report.files, report.files_skipped) == (["coinlytics_system.log"], 3)
    assert report.lines_read == 1, "the old files' lines are not counted: only searched for source states"
    sources = {s.source: s for s in report.sources}
    binance = sources["binance"]
    assert (binance.uptime, binance.connected_at_end, binance.connects, binance.errors) == (1.0, True, 0, 0)
    assert (sources["okx"].uptime, sources["okx"].connected_at_end) == (0.0, False)

    # An ingest start after the connects (in a newer old file) takes them down; one that connected after it
    # is up, and the ones not heard of since are no longer run (not listed).
    rotated(now - day, [state(now - day, "service_starting"),
                        state(now - day, "source_connected", source="kraken", kind="ws")])  # fmt: skip
    sources = {s.source: s for s in build_report(path, since, until).sources}
    assert set(sources) == {"kraken"}
    assert (sources["kraken"].uptime, sources["kraken"].connected_at_end) == (1.0, True)


def test_a_stopped_disconnect_ends_uptime_but_is_not_an_error(tmp_path: Path) -> None:
    path = tmp_path / "coinlytics_system.log"
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)
    log = LogWriter(path)
    log.line(start + timedelta(minutes=10), "source_connected", service="ingest", source="kraken", kind="ws")
    log.line(start + timedelta(minutes=40), "source_disconnected", service="ingest", source="kraken", kind="ws",
             reason="stopped")  # fmt: skip
    log.close()
    [kraken] = build_report(path, start, start + timedelta(minutes=60)).sources
    assert (kraken.uptime, kraken.connected_at_end, kraken.disconnects) == (0.5, False, 1)
    assert (kraken.errors, kraken.last_error) == (0, None)


async def test_ingest_logs_a_stopped_disconnect_when_it_closes_a_link_that_was_up(
    settings: Settings, redis: Any, sessions: Any
) -> None:
    runner = SourceRunner(
        SimSource("sim", seed=1, interval_seconds=0.05),
        settings=settings.model_copy(update={"sim_interval_seconds": 0.05}),
        redis=redis,
        publisher=StreamPublisher(redis, namespace=settings.redis_namespace, maxlen=settings.stream_maxlen),
        sessions=sessions,
    )
    stop = asyncio.Event()
    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(runner.run(stop))

        async def connected() -> bool:
            return runner.link_up

        await eventually(connected)
        stop.set()
        await task
        # A link that is already down closes without a word.
        runner._link_closed()
    link = [e for e in logs if e["event"] in ("source_connected", "source_disconnected", "source_error")]
    assert [(e["event"], e.get("reason")) for e in link] == [
        ("source_connected", None),
        ("source_disconnected", "stopped"),
    ]
    assert link[1]["source"] == "sim" and link[1]["kind"] == link[0]["kind"] == "sim"


# --- one report at a time, over at most the retention ---------------------------------------------------------


def test_a_window_older_than_the_retention_starts_at_the_retention() -> None:
    now = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    week = now - timedelta(days=7)
    assert clamp_to_retention(now - timedelta(days=30), now, 7, now) == (week, True)
    assert clamp_to_retention(now - timedelta(days=2), now, 7, now) == (now - timedelta(days=2), False)
    with pytest.raises(ValidationFailed):
        clamp_to_retention(now - timedelta(days=30), now - timedelta(days=8), 7, now)


async def test_a_second_report_while_one_is_built_is_a_503_with_retry_after(tmp_path: Path) -> None:
    path = tmp_path / "coinlytics_system.log"
    log = LogWriter(path)
    log.request(datetime.now(UTC) - timedelta(minutes=1), "/api/v1/prices", 200, 3.0)
    log.close()
    reports = ReportService(path, retention_days=7, wait_seconds=0.05)
    report = await reports.report("30d")
    assert report.window_clamped and report.requests[0].count == 1
    assert not (await reports.report("1h")).window_clamped
    async with reports.building:  # a report being built
        with pytest.raises(ServiceUnavailable) as refused:
            await reports.report("1h")
    assert refused.value.status == 503 and refused.value.headers == {"Retry-After": "5"}
    assert (await reports.report("1h")).requests[0].count == 1, "free again once the other is done"


# --- end to end: the gateway logs its requests, and reports them back ---------------------------------------


@pytest.fixture
def system_log(tmp_path: Path) -> Iterator[Path]:
    """The process's logging as a service's: every event into a system log file in a tmp data dir."""
    path = tmp_path / "data" / "coinlytics_system.log"
    writer = configure_logging("gateway", "WARNING", "console", system_log=path)
    try:
        yield path
    finally:
        # Back to structlog's defaults for the tests that follow in this process.
        configure_logging("gateway", "WARNING", "console", system_log=None)
        structlog.reset_defaults()
        structlog.contextvars.clear_contextvars()
        if writer is not None:
            writer.close()


async def test_the_gateway_reports_the_requests_it_served(settings: Settings, system_log: Path, db: Any) -> None:
    gw = settings.model_copy(
        update={"system_log_path": system_log, "rate_limit_anonymous": 100_000, "rate_limit_user": 100_000,
                "login_max_attempts_per_ip": 100_000}
    )  # fmt: skip
    sent: Counter[tuple[str, str, int]] = Counter()
    app = gateway_app(gw)
    async with serve_app(app) as base, httpx.AsyncClient(base_url=base, timeout=20) as client:

        async def call(method: str, url: str, route: str, expect: int, **kwargs: Any) -> httpx.Response:
            response = await client.request(method, url, **kwargs)
            assert response.status_code == expect, response.text
            sent[(method, route, expect)] += 1
            return response

        for email in ("root@example.com", "someone@example.com"):
            await register(client, email)
            sent[("POST", "/api/v1/auth/register", 201)] += 1
        await db.execute("UPDATE users SET role = 'admin' WHERE email = 'root@example.com'")
        admin = bearer((await tokens(client, "root@example.com"))["access_token"])
        user = bearer((await tokens(client, "someone@example.com"))["access_token"])
        sent[("POST", "/api/v1/auth/login", 200)] += 2
        for _ in range(7):
            await call("GET", "/api/v1/users/me", "/api/v1/users/me", 200, headers=user)
        for _ in range(3):
            await call("GET", "/api/v1/admin/users?limit=0", "/api/v1/admin/users", 422, headers=admin)
        await call("GET", "/api/v1/admin/users", "/api/v1/admin/users", 200, headers=admin)
        for _ in range(4):
            await call("PATCH", f"/api/v1/admin/users/{uuid.uuid4()}", "/api/v1/admin/users/{user_id}", 404,
                       headers=admin, json={"role": "user"})  # fmt: skip
        # The report itself: administrators only.
        await call("GET", REPORT, REPORT, 401)
        await call("GET", REPORT, REPORT, 403, headers=user)
        bad = await client.get(REPORT, params={"since": "yesterday-ish"}, headers=admin)
        assert bad.status_code == 422, bad.text
        assert bad.json()["error"]["code"] == "validation_error"
        sent[("GET", REPORT, 422)] += 1

        expected: dict[tuple[str, str], Counter[int]] = {}
        for (method, route, status), count in sent.items():
            expected.setdefault((method, route), Counter())[status] += count

        async def report() -> dict[str, Any] | None:
            response = await client.get(REPORT, params={"since": "15m"}, headers=admin)
            assert response.status_code == 200, response.text
            body: dict[str, Any] = response.json()
            seen = sum(r["count"] for r in body["requests"] if r["route"] != REPORT)
            # The last answers' lines are written as their responses finish: wait until all are in.
            return body if seen >= sum(n for (_m, route, _s), n in sent.items() if route != REPORT) else None

        body = await eventually(report, timeout=15)

        # While another report is being built, a request waits, then is told when to come back.
        reports: ReportService = app.state.reports
        reports.wait_seconds = 0.05
        async with reports.building:
            busy = await client.get(REPORT, params={"since": "15m"}, headers=admin)
        assert busy.status_code == 503, busy.text
        assert busy.headers["retry-after"] == "5"
        assert busy.json()["error"]["code"] == "service_unavailable"
        assert body["window_clamped"] is False

    assert body["files"] == ["coinlytics_system.log"]
    assert body["lines_skipped"] == 0
    assert all(r["service"] == "gateway" for r in body["requests"])
    got = {(r["method"], r["route"]): r for r in body["requests"]}
    for key, statuses in expected.items():
        entry = got.pop(key)
        count = sum(statuses.values())
        status_4xx = sum(n for s, n in statuses.items() if 400 <= s < 500)
        if key == ("GET", REPORT):
            # Plus the successful polls before the one that saw everything (their lines came after).
            assert entry["count"] >= count and entry["status_4xx"] == status_4xx, (key, entry)
        else:
            assert (entry["count"], entry["status_4xx"], entry["status_5xx"]) == (count, status_4xx, 0), (key, entry)
            assert entry["error_rate_4xx"] == round(status_4xx / count, 4)
        assert 0 < entry["p50_ms"] <= entry["p95_ms"] <= entry["p99_ms"] <= entry["max_ms"], (key, entry)
    assert got == {}, f"routes the test never called: {sorted(got)}"


# --- the command ---------------------------------------------------------------------------------------------


@pytest.fixture
def data_dir(env: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A data dir with a system log of a few requests and a source, as COINLYTICS_DATA_DIR."""
    folder = tmp_path / "data"
    now = datetime.now(UTC)
    log = LogWriter(folder / "coinlytics_system.log")
    for status, duration in ((200, 4.0), (200, 6.0), (404, 1.0), (500, 90.0)):
        log.request(now - timedelta(minutes=10), "/api/v1/prices", status, duration)
    log.request(now - timedelta(days=3), "/api/v1/prices", 200, 1.0)
    log.line(now - timedelta(minutes=20), "source_connected", service="ingest", source="binance", kind="ws")
    log.line(now - timedelta(minutes=5), "task_completed", service="pricing", task="retention", job_id="1",
             queue="q", attempt=1, duration_ms=12.0)  # fmt: skip
    log.line(now - timedelta(minutes=5), "alert_delivered", service="alerting", alert_id="a", event_id="e",
             channel="webhook", outcome="delivered", attempt=1, duration_ms=8.0)  # fmt: skip
    log.close()
    env.setenv("COINLYTICS_DATA_DIR", str(folder))
    return folder


def test_report_text_prints_a_table(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["report", "--since", "1h"])
    out = capsys.readouterr().out
    assert out.startswith("Coinlytics report ")
    assert str(data_dir / "coinlytics_system.log") in out
    row = next(line for line in out.splitlines() if "/api/v1/prices" in line)
    # service, method, route, count, 4xx, 4xx rate, 5xx, 5xx rate, p50, p95, p99
    assert row.split() == ["gateway", "GET", "/api/v1/prices", "4", "1", "25.00%", "1", "25.00%", "4.0", "90.0", "90.0"]
    assert re.search(r"^\s+binance\s+ws\s+\d", out, re.MULTILINE)
    assert re.search(r"^\s+webhook\s+delivered\s+1\s", out, re.MULTILINE)
    # Wider: the line from three days ago is in.
    main(["report", "--since", "7d"])
    row = next(line for line in capsys.readouterr().out.splitlines() if "/api/v1/prices" in line)
    assert row.split()[3] == "5"


def test_report_json_is_the_apis_body(data_dir: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    main(["report", "--since", "1h", "--format", "json"])
    body = json.loads(capsys.readouterr().out)
    [prices] = body["requests"]
    assert (prices["route"], prices["count"], prices["status_5xx"], prices["p50_ms"]) == ("/api/v1/prices", 4, 1, 4.0)
    assert body["lines_read"] == 8 and body["lines_outside_window"] == 1
    assert body["since"].endswith("Z") and body["until"].endswith("Z")
    assert body["tasks"][0]["task"] == "retention"
    target = tmp_path / "out" / "report.json"
    target.parent.mkdir()
    main(["report", "--since", "1h", "--format", "json", "--output", str(target)])
    assert str(target) in capsys.readouterr().out
    assert json.loads(target.read_text())["requests"][0]["count"] == 4


def test_report_html_is_one_page_with_plotly_inlined(
    data_dir: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    main(["report", "--since", "1h", "--format", "html"])
    target = tmp_path / "coinlytics-report.html"  # the working directory (the env fixture's)
    assert str(target) in capsys.readouterr().out
    page = target.read_text()
    assert get_plotlyjs()[:2000] in page
    assert page.count(get_plotlyjs()[:2000]) == 1, "plotly.js is in the page once"
    assert not re.search(r"<script[^>]*\bsrc=", page, re.IGNORECASE), "nothing is loaded from elsewhere"
    assert not re.search(r"<link[^>]*\bhref=", page, re.IGNORECASE)
    for chart in ("chart-latency", "chart-0", "chart-1", "chart-2", "chart-3"):
        assert f'id="{chart}"' in page
    assert "/api/v1/prices" in page


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["report", "--since", "banana"], "--since: expected a span such as 15m, 24h or 7d"),
        (["report", "--since", "1h", "--until", "noon"], "--until: expected ISO 8601"),
        (["report"], "no system log at"),
    ],
)
def test_report_errors_are_one_line_and_exit_2(
    env: pytest.MonkeyPatch, tmp_path: Path, args: list[str], message: str
) -> None:
    env.setenv("COINLYTICS_DATA_DIR", str(tmp_path / "empty"))
    process = subprocess.run(
        [sys.executable, "-m", "coinlytics", *args], capture_output=True, text=True, timeout=60,
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert process.returncode == 2, process
    assert process.stdout == ""
    assert message in process.stderr
    assert len(process.stderr.strip().splitlines()) == 1, process.stderr
    assert "Traceback" not in process.stderr


# --- the page in a browser ------------------------------------------------------------------------------------


async def test_the_report_page_draws_its_charts_offline(
    data_dir: Path, browser: Browser, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "page.html"
    main(["report", "--since", "1h", "--format", "html", "--output", str(target)])
    page = await browser.page()
    await page.goto(target.as_uri())
    charts = page.locator(".js-plotly-plot")
    await charts.first.wait_for()
    # Latency, requests, task failures, uptime, deliveries: each drawn as SVG by plotly.
    assert await charts.count() == 5
    assert await page.locator(".js-plotly-plot svg.main-svg").count() >= 5
    assert await page.locator("[data-chart=chart-latency] .barlayer .trace").count() == 3  # p50, p95, p99
    assert await page.get_by_role("heading", name="Requests").count() == 1
    # A table per section with rows; the stream section, empty in this log, says so.
    assert await page.locator("table").count() == 4
    assert await page.locator("section", has_text="Stream consumers").locator(".empty").count() == 1
    assert browser.console_errors == []
    outside = [url for url in browser.requested if not (url.startswith("file:") or on_this_machine(url))]
    assert outside == []
