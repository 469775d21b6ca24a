"""What every benchmark shares: figures, and real PostgreSQL/Redis to measure against."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncpg
from sqlalchemy.engine import make_url

from shared.settings import Settings


@dataclass
class Figure:
    name: str
    value: float
    unit: str
    baseline_name: str | None = None
    baseline_value: float | None = None
    target: str | None = None

    def ratio(self) -> float | None:
        if self.baseline_value in (None, 0):
            return None
        return self.value / self.baseline_value  # type: ignore[operator]


@contextlib.contextmanager
def servers(tmp: Path) -> Iterator[tuple[str, str]]:
    """PostgreSQL and Redis: those named by COINLYTICS_BENCH_DATABASE_URL / _REDIS_URL (or the test
    variables), else embedded ones in ``tmp``."""
    from shared.embedded import EmbeddedPostgres, EmbeddedRedis

    db = os.environ.get("COINLYTICS_BENCH_DATABASE_URL") or os.environ.get("COINLYTICS_TEST_DATABASE_URL")
    rd = os.environ.get("COINLYTICS_BENCH_REDIS_URL") or os.environ.get("COINLYTICS_TEST_REDIS_URL")
    pg = None if db else EmbeddedPostgres(tmp / "pg", database="postgres")
    rs = None if rd else EmbeddedRedis(tmp / "redis")
    try:
        db = db or pg.start()  # type: ignore[union-attr]
        rd = rd or rs.start(preferred_port=6391)  # type: ignore[union-attr]
        yield db, rd
    finally:
        if rs:
            rs.stop()
        if pg:
            pg.stop()


@contextlib.asynccontextmanager
async def scratch_database(server_url: str) -> AsyncIterator[str]:
    from shared.migrate import upgrade_async

    name = f"coinlytics_bench_{uuid.uuid4().hex[:8]}"
    admin_dsn = make_url(server_url).set(drivername="postgresql").render_as_string(hide_password=False)
    conn = await asyncpg.connect(admin_dsn)
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
    await upgrade_async(url)
    try:
        yield url
    finally:
        conn = await asyncpg.connect(admin_dsn)
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()


def bench_settings(database_url: str, redis_url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "env": "test",
        "database_url": database_url,
        "redis_url": redis_url,
        "redis_namespace": f"bench-{uuid.uuid4().hex[:8]}",
        "jwt_secret": secrets.token_urlsafe(48),
        "hmac_key": secrets.token_urlsafe(48),
        "max_clock_skew_seconds": 0,
        "log_level": "WARNING",
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def service_process(module: str, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m <module>`` (a service) in its own process, stopped at the end."""
    # A file, not a pipe: an unread pipe fills up and stalls the service on its next log line.
    log_file = tempfile.TemporaryFile()  # noqa: SIM115 - closed in finally
    process = subprocess.Popen(
        [sys.executable, "-m", module], env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log_file
    )
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log_file.close()


async def wait_ok(session: aiohttp.ClientSession, url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: the service exited during startup (exit code {process.returncode})")
        with contextlib.suppress(aiohttp.ClientError):
            async with session.get(url) as response:
                if response.status == 200:
                    return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} did not answer 200 within 60 s")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process (all its threads) has used so far, from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # Fields after the command name, which is in parentheses and may itself contain spaces.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")
