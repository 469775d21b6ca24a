"""The system log (shared/system_log.py, shared/logging.py): one JSON-lines file several processes append to,
rotated by size without losing or tearing a line; the console's readable lines; a full disk that costs log
lines but never a request; the request and database events of a real service; retention."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import structlog
from prometheus_client import CollectorRegistry

import shared.logging
import shared.system_log as system_log_module
from services.conversion.app import create_app as conversion_app
from services.gateway.tasks import cron_jobs, system_log_cleanup
from shared.logging import configure_logging
from shared.settings import ConfigurationError, load_settings
from shared.system_log import (
    DroppedLinesCollector,
    SystemLog,
    delete_expired,
    log_files,
    rotated_files,
    rotated_name,
)
from tests.conftest import ROOT, make_settings, serve_app

FAILING = "system log: cannot write"
RECOVERED = "system log: writing to"


@pytest.fixture
def restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """configure_logging changes the process's structlog configuration: put the previous one back."""
    saved = structlog.get_config()
    monkeypatch.setattr(shared.logging, "_active_system_log", shared.logging.active_system_log())
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
    lines = capsys.readouterr().err.splitlines()
    stamp = r"\[\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\]"
    assert re.fullmatch(stamp + r" \[INFO\] Request started: GET /api/v1/coins", lines[0]), lines[0]
    assert re.fullmatch(stamp + r" \[INFO\] Source parked: source=binance changed_by=admin@example\.com", lines[1])
    assert re.fullmatch(
        stamp + r" \[WARNING\] Task failed: ecb_rates \(job j1, attempt 2\) after 12\.5 ms: HTTPError: 503; will retry",
        lines[2],
    ), lines[2]
    assert len(lines) == 3


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
    assert datetime.fromisoformat(str(first["timestamp"])).tzinfo is not None


def test_a_full_disk_drops_lines_says_so_once_and_recovers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], restore_logging: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "coinlytics_system.log"
    path.symlink_to("/dev/full")  # every write fails with ENOSPC
    # The path is looked at on every line, not once a second, so the recovery below is seen at once.
    monkeypatch.setattr(system_log_module, "REOPEN_CHECK_SECONDS", 0.0)
    writer = SystemLog(path, max_bytes=1024)
    configure_logging("conversion", "ERROR", "json", system_log=writer)
    registry = CollectorRegistry()
    registry.register(DroppedLinesCollector(lambda: writer))
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


def test_a_writer_follows_a_rotation_by_another_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "coinlytics_system.log"
    monkeypatch.setattr(system_log_module, "REOPEN_CHECK_SECONDS", 0.0)
    ours = SystemLog(path, max_bytes=10**9)
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


def test_a_rotation_also_deletes_expired_files(tmp_path: Path) -> None:
    path = tmp_path / "coinlytics_system.log"
    expired = _rotated(path, datetime.now(UTC) - timedelta(days=3))
    kept = _rotated(path, datetime.now(UTC) - timedelta(hours=1))
    writer = SystemLog(path, max_bytes=64, retention_days=2)
    assert writer.write(b'{"event":"x","pad":"' + b"y" * 80 + b'"}')  # past the size: rotated at once
    assert not expired.exists() and kept.exists()
    assert len(rotated_files(path)) == 2  # the kept one and the one just rotated
