"""The system log (shared/system_log.py, shared/logging.py): one JSON-lines file several processes append to,
rotated by size without losing or tearing a line, and without waiting for another process's rotation; the
console's readable lines, one per event whatever a value holds; a full disk (steadily or by turns) that
costs log lines but never a request and is said on stderr rarely; the request and database events of a real
service; each app's own dropped-lines count; retention."""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import structlog
from prometheus_client import CollectorRegistry

from services.conversion.app import create_app as conversion_app
from services.gateway.tasks import cron_jobs, system_log_cleanup
from shared.logging import active_system_log, configure_logging
from shared.settings import ConfigurationError, load_settings
from shared.system_log import (
    DroppedLinesCollector,
    SystemLog,
    delete_expired,
    log_files,
    rotated_files,
    rotated_name,
)
from shared.timeparse import iso_z
from tests.conftest import ROOT, make_settings, serve_app

FAILING = "system log: cannot write"
RECOVERED = "system log: writing to"
STAMP = r"\[\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\]"


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """configure_logging changes the process's structlog configuration (its writer included): put the
    previous one back."""
    saved = structlog.get_config()
    try:
        yield
    finally:
        structlog.configure(**saved)
        structlog.contextvars.unbind_contextvars("service")


def read_lines(path: Path) -> list[dict[str, object]]:
    lines: list[dict[str, object]] = []
    for file in log_files(path):
        for raw in file.read_bytes().splitlines():
            lines.append(json.loads(raw))  # a torn or interleaved line would fail here
    return lines


WRITER = """
import json, sys
from shared.system_log import SystemLog
writer, count, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
log = SystemLog(path, max_bytes=16384)
for n in range(count):
    # Lines of varying length, some longer than a pipe's atomic size, so a split write would show.
    line = {"writer": writer, "n": n, "pad": "x" * ((n * 37) % 5000)}
    assert log.write(json.dumps(line).encode()), "a write failed"
"""


def test_concurrent_processes_rotating_keep_every_line_exactly_once(tmp_path: Path) -> None:
    path = tmp_path / "coinlytics_system.log"
    writers, count = 4, 1500
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, f"w{i}", str(count), str(path)],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stderr=subprocess.PIPE,
        )
        for i in range(writers)
    ]
    for process in processes:
        _, err = process.communicate(timeout=120)
        assert process.returncode == 0, err.decode()
    rotated = rotated_files(path)
    assert len(rotated) >= 10, "the tiny size limit should have forced many rotations"
    lines = read_lines(path)
    seen = [(line["writer"], line["n"]) for line in lines]
    expected = {(f"w{i}", n) for i in range(writers) for n in range(count)}
    assert len(seen) == len(set(seen)), "a line was written twice"
    assert set(seen) == expected, f"{len(expected - set(seen))} lines are missing"
    # Oldest first: the current file comes last, rotated ones by their time (and counter within a second).
    files = log_files(path)
    assert files[-1] == path
    assert files[:-1] == [f.path for f in rotated]


def test_rotated_names_are_unique_and_listed_in_order(tmp_path: Path) -> None:
    path = tmp_path / "coinlytics_system.log"
    when = datetime(2026, 12, 1, 13, 55, tzinfo=UTC)
    names = []
    for _ in range(3):
        target = rotated_name(path, when)
        target.write_text("{}\n")
        names.append(target.name)
    assert names == [
        "coinlytics_system.20261201T135500.log",
        "coinlytics_system.20261201T135500-1.log",
        "coinlytics_system.20261201T135500-2.log",
    ]
    earlier = rotated_name(path, when - timedelta(seconds=1))
    earlier.write_text("{}\n")
    (tmp_path / "unrelated.log").write_text("x\n")
    assert [f.path.name for f in rotated_files(path)] == [earlier.name, *names]
    assert log_files(path) == [earlier, *(tmp_path / n for n in names)]  # no current file yet


def test_console_lines_are_the_seed_format(capsys: pytest.CaptureFixture[str], restore_logging: None) -> None:
    configure_logging("gateway", "INFO", "console")
    log = structlog.get_logger("test")
    log.info("request_started", method="GET", path="/api/v1/coins", correlation_id="abc123")
    log.info("source_parked", source="binance", changed_by="admin@example.com")
    log.debug("not_shown")
    log.warning("task_failed", task="ecb_rates", job_id="j1", queue="q", attempt=2, duration_ms=12.5,
                error="HTTPError: 503", will_retry=True)  # fmt: skip
    try:
        raise ValueError("bad input\n[2026-12-01 00:00:00] [INFO] forged in a traceback")
    except ValueError:
        log.exception("handler_failed", value="a\rb\x1b[2Jc\u2028d\x85e\tf\x00")
    lines = capsys.readouterr().err.splitlines()
    assert re.fullmatch(STAMP + r" \[INFO\] Request started: GET /api/v1/coins", lines[0]), lines[0]
    assert re.fullmatch(STAMP + r" \[INFO\] Source parked: source=binance changed_by=admin@example\.com", lines[1])
    assert re.fullmatch(
        STAMP + r" \[WARNING\] Task failed: ecb_rates \(job j1, attempt 2\) after 12\.5 ms: HTTPError: 503; will retry",
        lines[2],
    ), lines[2]
    # Control characters in a value are written escaped, on the event's one line.
    assert re.fullmatch(STAMP + r" \[ERROR\] Handler failed: value=.*", lines[3]), lines[3]
    assert lines[3].endswith(r"value=a\rb\x1b[2Jc\u2028d\x85e\tf\x00"), lines[3]
    # The traceback follows on indented lines: none of them reads as a line of its own.
    traceback = lines[4:]
    assert len(traceback) > 2 and all(line.startswith("    ") for line in traceback), traceback
    assert "    ValueError: bad input" in traceback
    assert "    [2026-12-01 00:00:00] [INFO] forged in a traceback" in traceback


def test_the_file_gets_info_even_when_stderr_shows_only_warnings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    path = tmp_path / "coinlytics_system.log"
    configure_logging("pricing", "WARNING", "json", system_log=path)
    log = structlog.get_logger("test")
    log.info("consumer_started", stream="s", group="g", consumer="c")
    log.debug("too_detailed")
    log.error("source_error", source="kraken", kind="ws", reason="closed")
    err = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [e["event"] for e in err] == ["source_error"]
    lines = read_lines(path)
    assert [line["event"] for line in lines] == ["consumer_started", "source_error"]
    first = lines[0]
    assert list(first)[:4] == ["timestamp", "level", "service", "event"]
    assert first["service"] == "pricing" and first["level"] == "info"
    assert str(first["timestamp"]).endswith("Z")
    when = datetime.fromisoformat(str(first["timestamp"]))
    assert when.tzinfo is not None
    assert first["timestamp"] == iso_z(when), "the contract's one way of writing a moment"


def test_a_full_disk_drops_lines_says_so_once_and_recovers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    path = tmp_path / "coinlytics_system.log"
    path.symlink_to("/dev/full")  # every write fails with ENOSPC
    writer = SystemLog(path, max_bytes=1024)
    # The path is looked at on every line, not once a second, and one good write is enough here, so the
    # recovery below is seen at once (the flapping test keeps the wait for clean writes).
    writer.reopen_check_seconds = 0.0
    writer.recovery_seconds = 0.0
    configure_logging("conversion", "ERROR", "json", system_log=writer)
    registry = CollectorRegistry()
    registry.register(DroppedLinesCollector(writer))
    log = structlog.get_logger("test")
    for n in range(1000):
        log.info("request_finished", method="GET", path="/x", route="/x", status=200, duration_ms=1.0, n=n)
    err = capsys.readouterr().err
    assert err.count(FAILING) == 1, err
    assert "No space left on device" in err
    assert writer.dropped == 1000
    assert registry.get_sample_value("system_log_dropped_lines_total") == 1000
    # The disk has room again: the path becomes a regular file.
    path.unlink()
    for n in range(3):
        log.info("request_finished", method="GET", path="/y", route="/y", status=200, duration_ms=1.0, n=n)
    err = capsys.readouterr().err
    assert err.count(RECOVERED) == 1, err
    assert "1000 lines were dropped" in err
    assert FAILING not in err
    lines = read_lines(path)
    # The gap is in the file too, right after the first line that got through.
    assert [line["event"] for line in lines] == [
        "request_finished",
        "system_log_lines_dropped",
        *["request_finished"] * 2,
    ]
    assert lines[1]["count"] == 1000
    assert [line["n"] for line in lines if "n" in line] == [0, 1, 2]
    assert registry.get_sample_value("system_log_dropped_lines_total") == 1000


def test_a_write_error_never_reaches_the_caller(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The directory cannot be created (a file is in the way): every line is dropped, once said.
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    writer = SystemLog(blocker / "coinlytics_system.log")
    results = [writer.write(b'{"event":"x"}') for _ in range(50)]
    assert results == [False] * 50
    assert writer.dropped == 50
    assert capsys.readouterr().err.count(FAILING) == 1


async def test_a_service_request_writes_started_finished_and_db_connection(
    tmp_path: Path, clean_db: str, server_redis_url: str, namespace: str, restore_logging: None
) -> None:
    settings = make_settings(clean_db, server_redis_url, namespace, sources=["binance"], data_dir=tmp_path)
    path = settings.system_log_file()
    assert path == tmp_path / "coinlytics_system.log"
    configure_logging("conversion", "WARNING", "json", system_log=SystemLog.for_settings(settings, "conversion"))
    cid = uuid.uuid4().hex
    async with serve_app(conversion_app(settings)) as url, httpx.AsyncClient(base_url=url) as client:
        rates = await client.get("/api/v1/rates", params={"base": "USD"}, headers={"X-Correlation-ID": cid})
        missing = await client.get("/no/such/page")
        assert (await client.get("/healthz")).status_code == 200
    lines = read_lines(path)
    requests = [line for line in lines if str(line["event"]).startswith("request_")]
    assert [(r["event"], r["path"]) for r in requests] == [
        ("request_started", "/api/v1/rates"),
        ("request_finished", "/api/v1/rates"),
        ("request_started", "/no/such/page"),
        ("request_finished", "/no/such/page"),
    ], "probes (/healthz) are not logged"
    started, finished = requests[0], requests[1]
    assert started["method"] == "GET" and started["correlation_id"] == cid
    assert finished["route"] == "/api/v1/rates"
    assert finished["status"] == rates.status_code
    assert finished["correlation_id"] == cid
    assert isinstance(finished["duration_ms"], float) and finished["duration_ms"] >= 0
    assert requests[3]["route"] == "unmatched" and requests[3]["status"] == missing.status_code == 404
    assert all(line["service"] == "conversion" for line in lines)
    connections = [line for line in lines if line["event"] == "db_connection_created"]
    assert connections, "the pool's first connection is logged"
    password = settings.database_url and httpx.URL(settings.database_url).password
    for line in connections:
        assert line["database"] == clean_db.rsplit("/", 1)[-1].split("?")[0]
        assert line["host"]
        assert not password or password not in json.dumps(line)


def _rotated(path: Path, when: datetime) -> Path:
    target = rotated_name(path, when)
    target.write_text('{"event":"old"}\n')
    return target


def test_cleanup_deletes_only_rotated_files_past_the_retention(tmp_path: Path) -> None:
    path = tmp_path / "coinlytics_system.log"
    path.write_text('{"event":"current"}\n')
    now = datetime(2026, 12, 1, 14, 0, tzinfo=UTC)
    old = _rotated(path, now - timedelta(days=7, hours=1))
    older = _rotated(path, now - timedelta(days=30))
    recent = _rotated(path, now - timedelta(days=6, hours=23))
    fresh = _rotated(path, now - timedelta(minutes=5))
    other = tmp_path / "coinlytics_system.backup.log"
    other.write_text("keep\n")
    deleted = delete_expired(path, 7, now=now)
    assert sorted(deleted) == sorted([old, older])
    assert {p.name for p in tmp_path.iterdir()} == {path.name, recent.name, fresh.name, other.name}
    assert delete_expired(path, 7, now=now) == []  # idempotent


async def test_the_gateway_cleanup_job_uses_the_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    log_path = tmp_path / "logs" / "system.log"
    log_path.parent.mkdir()
    settings = load_settings(env="development", system_log_path=log_path, system_log_retention_days=0.5)
    now = datetime.now(UTC)
    expired = _rotated(log_path, now - timedelta(days=1))
    kept = _rotated(log_path, now - timedelta(hours=1))
    configure_logging("gateway", "INFO", "json")
    assert await system_log_cleanup({"settings": settings}) == {"deleted": 1}
    assert not expired.exists() and kept.exists()
    events = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert {"event": "system_log_cleaned", "deleted": 1, "files": [expired.name]}.items() <= events[-1].items()
    (job,) = [job for job in cron_jobs() if job.name == "system_log_cleanup"]
    assert job.minute == {17} and job.hour is None  # every hour


def test_a_writer_follows_a_rotation_by_another_process(tmp_path: Path) -> None:
    path = tmp_path / "coinlytics_system.log"
    ours = SystemLog(path, max_bytes=10**9)
    ours.reopen_check_seconds = 0.0
    assert ours.write(b'{"n":1}')
    aside = tmp_path / "coinlytics_system.20261201T000000.log"
    path.rename(aside)  # what another process's rotation does
    assert ours.write(b'{"n":2}')
    assert aside.read_text() == '{"n":1}\n'
    assert path.read_text() == '{"n":2}\n'


def test_bad_system_log_settings_are_refused_readably(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as too_small:
        load_settings(env="development", system_log_max_mb=0, system_log_retention_days=-1)
    assert "COINLYTICS_SYSTEM_LOG_MAX_MB" in str(too_small.value)
    assert "COINLYTICS_SYSTEM_LOG_RETENTION_DAYS" in str(too_small.value)
    with pytest.raises(ConfigurationError, match=r"COINLYTICS_SYSTEM_LOG_PATH: .* is a directory"):
        load_settings(env="development", system_log_path=tmp_path)
    settings = load_settings(env="development", system_log_path="", data_dir=tmp_path)
    assert settings.system_log_file() == tmp_path / "coinlytics_system.log"
    assert settings.system_log_max_mb == 50 and settings.system_log_retention_days == 7


def test_a_writer_deletes_expired_files_in_a_thread_at_most_once_an_interval(tmp_path: Path) -> None:
    path = tmp_path / "coinlytics_system.log"
    expired = _rotated(path, datetime.now(UTC) - timedelta(days=3))
    kept = _rotated(path, datetime.now(UTC) - timedelta(hours=1))
    writer = SystemLog(path, max_bytes=64, retention_days=2)
    assert writer.write(b'{"event":"x","pad":"' + b"y" * 80 + b'"}')  # past the size: rotated at once
    first = writer.cleanup_thread
    assert first is not None and first is not threading.current_thread()
    first.join(timeout=60)
    assert not first.is_alive()
    assert not expired.exists() and kept.exists()
    assert len(rotated_files(path)) == 2  # the kept one and the one just rotated
    # Within the hour: no second pass, however many lines and rotations follow.
    later = _rotated(path, datetime.now(UTC) - timedelta(days=4))
    for _ in range(5):
        assert writer.write(b'{"event":"x","pad":"' + b"y" * 80 + b'"}')
    assert writer.cleanup_thread is first
    assert later.exists()
    writer.cleanup_interval_seconds = 0.0
    assert writer.write(b'{"event":"x"}')
    second = writer.cleanup_thread
    assert second is not None and second is not first
    second.join(timeout=60)
    assert not later.exists() and kept.exists()
    # Without a retention (the settings always give one) a writer leaves the files alone.
    plain = SystemLog(tmp_path / "other.log")
    assert plain.write(b'{"event":"x"}')
    assert plain.cleanup_thread is None


def test_a_rotation_does_not_wait_for_another_process_holding_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "coinlytics_system.log"
    writer = SystemLog(path, max_bytes=64)
    writer.rotate_retry_seconds = 0.0  # retry at the very next write
    line = b'{"event":"x","pad":"' + b"y" * 80 + b'"}'
    lock_fd = os.open(writer.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        # Another open file description holding the lock: what a rotating process does.
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        results: list[bool] = []
        # In a thread: a writer that waited for the lock would never return, and the test would hang.
        worker = threading.Thread(target=lambda: results.extend(writer.write(line) for _ in range(3)))
        worker.start()
        worker.join(timeout=60)
        assert not worker.is_alive(), "the write waited for the rotation lock"
        assert results == [True, True, True]
        assert rotated_files(path) == [], "no rotation without the lock"
    finally:
        os.close(lock_fd)  # releases the lock
    assert writer.write(line)
    assert len(rotated_files(path)) == 1, "retried at a later write once the lock was free"
    assert [file.read_bytes().count(b"\n") for file in log_files(path)] == [4, 0]


def _point(path: Path, target: Path | str) -> None:
    """Makes ``path`` a symlink to ``target`` in one step (rename over it), as a flipping disk would look."""
    link = path.with_name(path.name + ".new")
    link.unlink(missing_ok=True)
    link.symlink_to(target)
    link.replace(path)


def test_a_flapping_disk_is_said_rarely_and_recovers_only_after_clean_writes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A nearly full disk: writes fail and succeed by turns. The path flips between /dev/full (ENOSPC) and a
    real file; the writer reopens it on every line (reopen check shortened). Only its durations are changed."""
    if not Path("/dev/full").exists():
        pytest.skip("this system has no /dev/full to stand in for a full disk")
    path = tmp_path / "coinlytics_system.log"
    disk = tmp_path / "disk.log"
    _point(path, disk)
    writer = SystemLog(path, service="pricing")
    writer.reopen_check_seconds = 0.0
    registry = CollectorRegistry()
    registry.register(DroppedLinesCollector(writer))
    dropped, written = 0, []
    for flip in range(20):
        _point(path, "/dev/full")
        for n in range(3):
            assert not writer.write(tick_line(flip, n))
            dropped += 1
        _point(path, disk)
        for n in range(3, 5):
            assert writer.write(tick_line(flip, n))
            written.append((flip, n))
    err = capsys.readouterr().err
    assert err.count(FAILING) == 1, err  # twenty outages, one warning (at most one per 10 minutes)
    assert RECOVERED not in err, "a minute of clean writes has not passed"
    assert writer.failing
    assert writer.dropped == dropped == 60
    assert registry.get_sample_value("system_log_dropped_lines_total") == 60
    assert [(line["flip"], line["n"]) for line in read_lines(disk)] == written

    # A failed write starts the wait for clean writes again.
    writer.recovery_seconds = 0.2
    time.sleep(0.3)  # clean for longer than that since the last round's first good write...
    _point(path, "/dev/full")
    assert not writer.write(tick_line(99, 0))
    _point(path, disk)
    assert writer.write(tick_line(99, 1))  # ...but only just clean again
    assert writer.failing
    time.sleep(0.3)
    assert writer.write(tick_line(99, 2))
    assert not writer.failing
    err = capsys.readouterr().err
    assert err.count(RECOVERED) == 1 and FAILING not in err, err
    assert "61 lines were dropped while it failed" in err
    gap = [line for line in read_lines(disk) if line.get("event") == "system_log_lines_dropped"]
    assert [(g["count"], g["service"]) for g in gap] == [(61, "pricing")]

    # Failing again within ten minutes of the warning: counted, in the file at its end, not on stderr.
    writer.recovery_seconds = 0.0
    _point(path, "/dev/full")
    for n in range(5):
        assert not writer.write(tick_line(100, n))
    _point(path, disk)
    assert writer.write(tick_line(100, 5))
    assert capsys.readouterr().err == ""
    gap = [line for line in read_lines(disk) if line.get("event") == "system_log_lines_dropped"]
    assert [g["count"] for g in gap] == [61, 5]
    assert registry.get_sample_value("system_log_dropped_lines_total") == 66
    # Once the interval has passed, the next outage is said again, with the running total.
    writer.warn_interval_seconds = 0.0
    _point(path, "/dev/full")
    assert not writer.write(tick_line(101, 0))
    err = capsys.readouterr().err
    assert err.count(FAILING) == 1 and "(67 so far" in err, err


def tick_line(flip: int, n: int) -> bytes:
    return json.dumps({"event": "tick", "flip": flip, "n": n}).encode()


async def test_a_request_path_with_control_characters_is_one_console_line(
    tmp_path: Path, clean_db: str, server_redis_url: str, namespace: str, restore_logging: None,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    settings = make_settings(clean_db, server_redis_url, namespace, sources=["binance"], data_dir=tmp_path)
    configure_logging("conversion", "INFO", "console", system_log=SystemLog.for_settings(settings, "conversion"))
    forged = "[2026-12-01 00:00:00] [ERROR] forged"
    raw_path = "/no/such%0A" + forged.replace(" ", "%20") + "%1B[2J%E2%80%A8end"
    async with serve_app(conversion_app(settings)) as url, httpx.AsyncClient(base_url=url) as client:
        capsys.readouterr()
        response = await client.get(raw_path)
        assert response.status_code == 404
    err = capsys.readouterr().err
    lines = err.splitlines()
    mentioning = [line for line in lines if "forged" in line]
    escaped = "/no/such\\n" + forged + "\\x1b[2J\\u2028end"
    assert len(mentioning) == 2, err  # request_started and request_finished, one line each
    assert re.fullmatch(STAMP + r" \[INFO\] Request started: GET " + re.escape(escaped), mentioning[0]), err
    assert re.fullmatch(
        STAMP + r" \[INFO\] Request finished: GET " + re.escape(escaped) + r" 404 in .* ms", mentioning[1]
    )
    assert not any(line.startswith(forged) for line in lines)
    assert "\x1b" not in err and "\u2028" not in err
    # The file keeps the path as it was asked for (JSON escapes it).
    requests = [line for line in read_lines(settings.system_log_file()) if line["event"] == "request_started"]
    assert [r["path"] for r in requests] == ["/no/such\n" + forged + "\x1b[2J\u2028end"]


async def test_each_app_counts_the_drops_of_the_writer_it_was_built_with(
    tmp_path: Path, clean_db: str, server_redis_url: str, namespace: str, restore_logging: None
) -> None:
    settings = make_settings(clean_db, server_redis_url, namespace, sources=["binance"], data_dir=tmp_path)
    good = SystemLog(tmp_path / "good.log")
    configure_logging("conversion", "ERROR", "json", system_log=good)
    first = conversion_app(settings)
    full = tmp_path / "full.log"
    full.symlink_to("/dev/full")
    bad = SystemLog(full)
    configure_logging("conversion", "ERROR", "json", system_log=bad)  # a second app in the process
    assert active_system_log() is bad
    second = conversion_app(settings)
    log = structlog.get_logger("test")
    for n in range(5):
        log.info("tick", n=n)  # structlog is the process's: into the last writer, dropped
    async with serve_app(first) as url_1, serve_app(second) as url_2, httpx.AsyncClient() as client:
        metrics_1 = (await client.get(f"{url_1}/metrics")).text
        metrics_2 = (await client.get(f"{url_2}/metrics")).text
    assert bad.dropped >= 5 and good.dropped == 0
    assert re.search(r"^system_log_dropped_lines_total 0\.0$", metrics_1, re.M), metrics_1
    counted = re.search(r"^system_log_dropped_lines_total (\S+)$", metrics_2, re.M)
    assert counted and float(counted.group(1)) >= 5, metrics_2
