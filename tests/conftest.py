"""Test infrastructure: real PostgreSQL and Redis, a database per test worker, a Redis namespace per
test, real HTTP servers on 127.0.0.1 for the services and for replayed exchange traffic."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import uvicorn
from redis.asyncio import Redis
from sqlalchemy.engine import make_url

from shared.service_app import SERVICE_KEEPALIVE_SECONDS
from shared.settings import Settings
from tests.replay import ReplayServer

ROOT = Path(__file__).resolve().parents[1]


def fixtures_dir() -> Path:
    configured = os.environ.get("COINLYTICS_FIXTURES_DIR")
    return Path(configured) if configured else (ROOT.parent / "shared" / "fixtures" / "exchanges")


@pytest.fixture(scope="session")
def exchange_fixtures() -> Path:
    path = fixtures_dir()
    if not path.is_dir():
        pytest.skip(
            f"recorded exchange payloads not found at {path}; set COINLYTICS_FIXTURES_DIR to the "
            "fixtures/exchanges folder to run the replay tests"
        )
    return path


def _worker() -> str:
    return os.environ.get("PYTEST_XDIST_WORKER", "main")


@pytest.fixture(scope="session")
def server_database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    configured = os.environ.get("COINLYTICS_TEST_DATABASE_URL")
    if configured:
        yield configured
        return
    from shared.embedded import EmbeddedPostgres

    server = EmbeddedPostgres(tmp_path_factory.mktemp("pg"), database="postgres")
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def server_redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    configured = os.environ.get("COINLYTICS_TEST_REDIS_URL")
    if configured:
        yield configured
        return
    from shared.embedded import EmbeddedRedis

    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    try:
        yield server.start(preferred_port=0 or free_port())
    finally:
        server.stop()


def _asyncpg_dsn(url: str) -> str:
    parsed = make_url(url).set(drivername="postgresql")
    return parsed.render_as_string(hide_password=False)


@pytest.fixture(scope="session")
async def database_url(server_database_url: str) -> AsyncIterator[str]:
    """A database of this test run and worker: created, migrated, and dropped at the end."""
    from shared.migrate import upgrade_async

    name = f"coinlytics_test_{_worker()}_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(_asyncpg_dsn(server_database_url))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = make_url(server_database_url).set(database=name).render_as_string(hide_password=False)
    await upgrade_async(url)
    yield url
    admin = await asyncpg.connect(_asyncpg_dsn(server_database_url))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def clean_db(database_url: str) -> str:
    conn = await asyncpg.connect(_asyncpg_dsn(database_url))
    try:
        tables = await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'alembic_version'"
        )
        if tables:
            names = ", ".join(f'"{t["tablename"]}"' for t in tables)
            await conn.execute(f"TRUNCATE {names} RESTART IDENTITY CASCADE")
    finally:
        await conn.close()
    return database_url


@pytest.fixture
async def db(clean_db: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain connection for assertions, independent of the code under test."""
    conn = await asyncpg.connect(_asyncpg_dsn(clean_db))
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def sessions(settings: Settings) -> AsyncIterator[Any]:
    """An async session factory on the test database, for building services the way their apps do."""
    from shared.db import create_engine, session_factory

    engine = create_engine(settings.require_database_url())
    try:
        yield session_factory(engine)
    finally:
        await engine.dispose()


@pytest.fixture
def namespace() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def redis(server_redis_url: str, namespace: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(server_redis_url)
    try:
        yield client
    finally:
        keys = [key async for key in client.scan_iter(match=f"{namespace}:*", count=500)]
        if keys:
            await client.delete(*keys)
        await client.aclose()


def make_settings(database_url: str, redis_url: str, namespace: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "env": "test",
        "database_url": database_url,
        "redis_url": redis_url,
        "redis_namespace": namespace,
        "jwt_secret": secrets.token_urlsafe(48),
        "hmac_key": secrets.token_urlsafe(48),
        # Recorded payloads carry old exchange timestamps.
        "max_clock_skew_seconds": 0,
        "source_max_age_ws_seconds": 10**9,
        "source_max_age_rest_seconds": 10**9,
        "poll_interval_seconds": 0.2,
        "stream_claim_idle_ms": 200,
        "log_format": "console",
        # Tests call services directly; tests/test_gateway_security.py turns this back on to prove it.
        "internal_auth_required": False,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def settings(clean_db: str, server_redis_url: str, namespace: str, redis: Redis) -> Settings:
    return make_settings(clean_db, server_redis_url, namespace)


@pytest.fixture
async def pricing(settings: Settings, redis: Redis) -> AsyncIterator[Any]:
    """Builds pricing services on this test's stores and secrets (``pricing(**setting_overrides)``), each with
    its own engine, disposed at the end: a service built here and one served from ``settings`` verify each
    other's cache entries."""
    from services.pricing.service import PriceCache, PricingService
    from shared.db import create_engine, session_factory
    from shared.streams import StreamPublisher

    engines: list[Any] = []

    def build(**overrides: Any) -> PricingService:
        s = Settings(**{**settings.model_dump(), **overrides})
        engine = create_engine(s.require_database_url())
        engines.append(engine)
        return PricingService(
            s,
            sessions=session_factory(engine),
            publisher=StreamPublisher(redis, namespace=s.redis_namespace, maxlen=10_000),
            cache=PriceCache(redis, s),
        )

    yield build
    for engine in engines:
        await engine.dispose()


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """An environment without any COINLYTICS_* variable and a working directory without a .env file:
    settings come only from the test."""
    for name in list(os.environ):
        if name.upper().startswith("COINLYTICS_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


def strong() -> str:
    """A secret that passes the strength checks."""
    return secrets.token_urlsafe(48)


@pytest.fixture
def smtp() -> Iterator[Any]:
    """A real SMTP server on 127.0.0.1 that keeps what it receives (``tests.accounts.SmtpSink``)."""
    # Imported here: tests.accounts itself imports this module.
    from tests.accounts import SmtpSink

    sink = SmtpSink()
    sink.start()
    try:
        yield sink
    finally:
        sink.stop()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def serve_app(app: Any, port: int | None = None) -> AsyncIterator[str]:
    """Runs an ASGI app on a real uvicorn server on 127.0.0.1; yields its base URL."""
    port = port or free_port()
    # Proxy headers off, as shared.service_app.serve runs them: the gateway decides whom to believe.
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", proxy_headers=False,
        timeout_keep_alive=SERVICE_KEEPALIVE_SECONDS,
    )  # fmt: skip
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        for _ in range(400):
            if server.started:
                break
            if task.done():
                task.result()
                raise RuntimeError("server stopped during startup")
            await asyncio.sleep(0.025)
        else:
            raise RuntimeError("server did not start within 10s")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=15)


@pytest.fixture
async def replay() -> AsyncIterator[ReplayServer]:
    server = ReplayServer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def eventually(check: Any, *, timeout: float = 15.0, interval: float = 0.1) -> Any:
    """Polls ``check`` (async, returning a truthy value when satisfied) until it holds or time runs out."""
    deadline = asyncio.get_running_loop().time() + timeout
    last: Any = None
    while True:
        last = await check()
        if last:
            return last
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last value: {last!r})")
        await asyncio.sleep(interval)


pytest_plugins = ["tests.browser"]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    # Each phase's report on the test item, so fixtures can tell at teardown whether the test failed (the
    # browser fixture then keeps a screenshot of every page).
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{report.when}", report)
