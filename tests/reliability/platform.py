"""The reliability harness: the real platform as OS processes, on PostgreSQL and Redis servers of its own.

Usage (scenarios are marked ``@pytest.mark.reliability``; the fixtures live in ``tests/reliability/conftest.py``)::

    @pytest.mark.reliability
    async def test_something(platform_factory, reliability_row):
        plat = platform_factory(services=("pricing", "ingest"), sources="sim", extra_env={...})
        await plat.start()                        # private PostgreSQL + Redis, migrations, services, all ready
        plat.kill_service("pricing")              # kill -9; also stop_service (SIGINT), restart_service
        plat.start_service("pricing"); await plat.wait_ready("pricing")
        plat.stop_redis(); plat.start_redis()     # same port; the data goes unless keep_data=True
        plat.stop_postgres(); plat.start_postgres()
        await plat.readyz("gateway")              # (status code, body)
        seconds = await plat.wait_ready("ingest", timeout=10)
        text = plat.log("pricing")                # everything the service wrote on stderr, every incarnation
        value = await plat.metric("pricing", "supervised_task_restarts_total", task="tick-consumer")
        info = await plat.group_info("ticks", "pricing")      # {"pending": .., "lag": .., ...} or None
        await plat.wait_drained("ticks", "pricing", timeout=60)
        redis = plat.redis_client(); conn = await plat.db()   # direct clients (close them)
        reliability_row.update(checked="...", sent=n, stored=m, lost=0, duplicated=0, recover_seconds=1.2)

``scale()`` is ``COINLYTICS_RELIABILITY_SCALE`` ("full", the default, or "ci"); ``by_scale(full, ci)`` picks a
size. Every service gets free ports and the machine's own servers are never touched, so scenarios may stop and
start theirs at will. A port taken by another process before a service or Redis binds it is handled here: new
ports at the first start, the same port retried for REBIND_SECONDS on a restart. ``Platform.settings`` is a
``Settings`` built from the same environment the services run with (namespace, stream names, secrets) for
publishing or signing from the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import asyncpg
import httpx
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from shared.embedded import EmbeddedPostgres, EmbeddedRedis, EmbeddedServerError, free_port
from shared.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("pricing", "conversion", "analytics", "alerting", "ingest", "gateway")
SCALE_ENV = "COINLYTICS_RELIABILITY_SCALE"
# How long a server coming back on its old port waits for another process to let go of it.
REBIND_SECONDS = 10.0
# What uvicorn logs when its port is taken (an asyncio bind error, errno EADDRINUSE).
BIND_CLASH = "address already in use"


class PortClash(AssertionError):
    """A service could not bind its port: another process took it between free_port() and the bind."""


def scale() -> str:
    value = os.environ.get(SCALE_ENV, "full").strip().lower()
    return value if value in ("full", "ci") else "full"


def by_scale(full: Any, ci: Any) -> Any:
    return ci if scale() == "ci" else full


@dataclass
class ServiceRun:
    name: str
    port: int
    process: subprocess.Popen[bytes] | None = None
    incarnation: int = 0
    log_paths: list[Path] = field(default_factory=list)
    log_file: IO[bytes] | None = None
    # (pid, exit code) of every incarnation that ended without the harness stopping or killing it.
    unexpected_exits: list[tuple[int, int]] = field(default_factory=list)


class Platform:
    """One platform run under ``root``. Start with ``await start()``; ``close()`` stops everything it started."""

    def __init__(
        self,
        root: Path,
        *,
        services: Sequence[str] = SERVICES,
        sources: str = "sim",
        coins: str = "BTC,ETH",
        vs_currencies: str = "USD,EUR",
        extra_env: dict[str, str] | None = None,
    ) -> None:
        unknown = [s for s in services if s not in SERVICES]
        if unknown:
            raise ValueError(f"unknown services {unknown}; choose from {SERVICES}")
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.data_dir = root / "data"
        self.logs_dir = root / "logs"
        self.data_dir.mkdir(exist_ok=True)
        self.logs_dir.mkdir(exist_ok=True)
        self.postgres = EmbeddedPostgres(root / "pg", database="coinlytics")
        self.redis_server = EmbeddedRedis(root / "redis")
        self.redis_port: int | None = None
        self.database_url = ""
        self.redis_url = ""
        self.namespace = f"rel-{uuid.uuid4().hex[:8]}"
        self.services = {name: ServiceRun(name, free_port()) for name in services}
        self.sources = sources
        self.coins = coins
        self.vs_currencies = vs_currencies
        self.extra_env = dict(extra_env or {})
        self.jwt_secret = secrets.token_urlsafe(48)
        self.hmac_key = secrets.token_urlsafe(48)
        self.env: dict[str, str] = {}
        self._settings: Settings | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def start(self, *, ready_timeout: float = 120.0) -> None:
        """Servers, migrations, then every service; returns once each answers /readyz with "ready"."""
        await asyncio.to_thread(self._start_servers)
        for attempt in (1, 2):
            self.env = self._environment()
            self._settings = None
            for name in self.services:
                self.start_service(name)
            results = await asyncio.gather(
                *(self.wait_ready(name, timeout=ready_timeout) for name in self.services), return_exceptions=True
            )
            clashed = [
                name for name, result in zip(self.services, results, strict=True) if isinstance(result, PortClash)
            ]
            failures = [result for result in results if isinstance(result, BaseException)]
            if not failures:
                return
            if attempt == 2 or len(clashed) < len(failures):
                raise failures[0]
            # free_port() only found the ports free: another process bound one before its service did. The
            # services know each other's ports from their environment, so every one starts again, once, and
            # the first try is forgotten (its log files stay on disk).
            for name, run in self.services.items():
                self.stop_service(name)
                run.incarnation, run.log_paths, run.unexpected_exits = 0, [], []
                if name in clashed:
                    run.port = free_port()

    def _start_servers(self) -> None:
        from shared.migrate import upgrade

        self.database_url = self.postgres.start()
        for attempt in (1, 2, 3):
            # The port may be taken between free_port() and Redis' bind (Redis then exits at start).
            try:
                self.redis_url = self.redis_server.start(preferred_port=free_port())
                break
            except EmbeddedServerError:
                self.redis_server.stop()
                if attempt == 3:
                    raise
        self.redis_port = self.redis_server.port
        upgrade(self.database_url)

    def _environment(self) -> dict[str, str]:
        # Nothing of the machine's own configuration leaks in: only COINLYTICS_* variables set here count.
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("COINLYTICS_")}
        env.update(
            {
                "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": str(ROOT),
                "COINLYTICS_ENV": "production",
                "COINLYTICS_DATABASE_URL": self.database_url,
                "COINLYTICS_REDIS_URL": self.redis_url,
                "COINLYTICS_REDIS_NAMESPACE": self.namespace,
                "COINLYTICS_DATA_DIR": str(self.data_dir),
                "COINLYTICS_JWT_SECRET": self.jwt_secret,
                "COINLYTICS_HMAC_KEY": self.hmac_key,
                "COINLYTICS_SOURCES": self.sources,
                "COINLYTICS_COINS": self.coins,
                "COINLYTICS_VS_CURRENCIES": self.vs_currencies,
                "COINLYTICS_LOG_FORMAT": "json",
                "COINLYTICS_LOG_LEVEL": "INFO",
                # A dead consumer's entries are claimed after 5 s instead of 30 s: the same path, sooner.
                "COINLYTICS_STREAM_CLAIM_IDLE_MS": "5000",
                "COINLYTICS_SIM_SEED": "13",
            }
        )
        for name in SERVICES:
            # Services not started still get a free port: nothing answers there, as when one is down.
            port = self.services[name].port if name in self.services else free_port()
            if name == "gateway":
                env["COINLYTICS_GATEWAY_PORT"] = str(port)
                env["COINLYTICS_PUBLIC_URL"] = f"http://127.0.0.1:{port}"
            else:
                env[f"COINLYTICS_{name.upper()}_URL"] = f"http://127.0.0.1:{port}"
        env.update(self.extra_env)
        return env

    @property
    def settings(self) -> Settings:
        """The services' settings, as the test sees them (same namespace, secrets, stream limits)."""
        if self._settings is None:
            values = {
                k.removeprefix("COINLYTICS_").lower(): v
                for k, v in self.env.items()
                if k.startswith("COINLYTICS_") and not k.startswith("COINLYTICS_SOURCE_")
            }
            self._settings = Settings(_env_file=None, **values)  # type: ignore[call-arg]
        return self._settings

    def close(self) -> None:
        # Every service is asked to stop first, then waited for: their graceful shutdowns overlap.
        for run in self.services.values():
            if run.process is not None and run.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(run.process.pid, signal.SIGINT)
        for name in list(self.services):
            with contextlib.suppress(Exception):
                self.stop_service(name)
        with contextlib.suppress(Exception):
            self.redis_server.stop()
        with contextlib.suppress(Exception):
            self.postgres.stop()

    # -- services --------------------------------------------------------------------------------------------

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.services[name].port}"

    def start_service(self, name: str) -> int:
        """Starts ``python -m services.<name>``; returns its pid (it is not ready yet: see ``wait_ready``)."""
        run = self.services[name]
        if run.process is not None and run.process.poll() is None:
            raise RuntimeError(f"{name} is already running (pid {run.process.pid})")
        self._note_exit(run)
        run.incarnation += 1
        path = self.logs_dir / f"{name}.{run.incarnation}.log"
        run.log_paths.append(path)
        # A file, not a pipe: an unread pipe fills up and stalls the service on its next log line.
        run.log_file = path.open("wb")
        run.process = subprocess.Popen(
            [sys.executable, "-m", f"services.{name}"],
            env=self.env,
            cwd=self.root,  # no .env file of the checkout is read
            stdout=subprocess.DEVNULL,
            stderr=run.log_file,
            start_new_session=True,
        )
        return run.process.pid

    def _bind_clashed(self, run: ServiceRun) -> bool:
        """Whether the current incarnation exited because its port was taken."""
        if run.process is None or run.process.poll() is None or not run.log_paths:
            return False
        with contextlib.suppress(FileNotFoundError):
            return BIND_CLASH in run.log_paths[-1].read_text(errors="replace").lower()
        return False

    @staticmethod
    def _forget_clash(run: ServiceRun) -> None:
        """A start lost to a port clash is the harness's doing, not the service's: not an unexpected exit, and
        not part of the service's log (its file stays on disk)."""
        if run.unexpected_exits:
            run.unexpected_exits.pop()
        if run.log_paths:
            run.log_paths.pop()

    def _note_exit(self, run: ServiceRun) -> None:
        if run.process is not None and run.process.poll() is not None:
            run.unexpected_exits.append((run.process.pid, run.process.returncode))
        self._close_log(run)
        run.process = None

    @staticmethod
    def _close_log(run: ServiceRun) -> None:
        if run.log_file is not None:
            run.log_file.close()
            run.log_file = None

    def pid(self, name: str) -> int | None:
        process = self.services[name].process
        return process.pid if process is not None and process.poll() is None else None

    def returncode(self, name: str) -> int | None:
        """None while the current incarnation runs; its exit code once it ended."""
        process = self.services[name].process
        return None if process is None else process.poll()

    def unexpected_exits(self, name: str | None = None) -> list[tuple[str, int, int]]:
        """(service, pid, exit code) of every process that ended without the harness ending it."""
        found: list[tuple[str, int, int]] = []
        for run in self.services.values():
            if name is not None and run.name != name:
                continue
            found.extend((run.name, pid, code) for pid, code in run.unexpected_exits)
            if run.process is not None and run.process.poll() is not None:
                found.append((run.name, run.process.pid, run.process.returncode))
        return found

    def stop_service(self, name: str, grace_seconds: float = 15.0) -> int | None:
        """Graceful stop (SIGINT, as Ctrl-C under ``coinlytics run``); SIGKILL past the grace period."""
        run = self.services[name]
        process = run.process
        if process is None:
            return None
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=grace_seconds)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        else:
            run.unexpected_exits.append((process.pid, process.returncode))
        code = process.returncode
        self._close_log(run)
        run.process = None
        return code

    def kill_service(self, name: str) -> int:
        """kill -9: no shutdown code runs, open transactions and unacknowledged entries are left as they are."""
        run = self.services[name]
        process = run.process
        if process is None or process.poll() is not None:
            raise RuntimeError(f"{name} is not running")
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        self._close_log(run)
        run.process = None
        return process.pid

    def restart_service(self, name: str) -> int:
        self.stop_service(name)
        return self.start_service(name)

    def log(self, name: str) -> str:
        """Everything the service wrote on stderr, every incarnation in order."""
        parts = []
        for path in self.services[name].log_paths:
            with contextlib.suppress(FileNotFoundError):
                parts.append(path.read_text(errors="replace"))
        return "".join(parts)

    def log_tail(self, name: str, lines: int = 40) -> str:
        return "\n".join(self.log(name).splitlines()[-lines:])

    # -- HTTP ------------------------------------------------------------------------------------------------

    async def readyz(self, name: str, timeout: float = 5.0) -> tuple[int, dict[str, Any]]:
        """(status code, body) of the service's /readyz; (0, {"error": ...}) when nothing answers."""
        try:
            async with httpx.AsyncClient(timeout=timeout) as client:
                response = await client.get(f"{self.url(name)}/readyz")
        except httpx.HTTPError as exc:
            return 0, {"error": f"{type(exc).__name__}: {exc}"}
        try:
            body = response.json()
        except ValueError:
            body = {"text": response.text[:500]}
        return response.status_code, body if isinstance(body, dict) else {"body": body}

    async def wait_ready(self, name: str, timeout: float = 60.0, interval: float = 0.2) -> float:
        """Seconds until /readyz answered 200 "ready"; raises (with the log tail) when it does not in time or the
        process exits. A restarted service whose port another process holds is started again on that port (its
        URL is in the others' environment) for up to REBIND_SECONDS; at the platform's first start a clash
        raises ``PortClash`` and ``start()`` picks new ports."""
        started = time.monotonic()
        last: tuple[int, dict[str, Any]] = (0, {})
        rebind_until: float | None = None
        while True:
            code = self.returncode(name)
            if code is not None and self._bind_clashed(self.services[name]):
                run = self.services[name]
                if run.incarnation == 1:
                    raise PortClash(f"{name}: port {run.port} was taken before it could bind it")
                now = time.monotonic()
                rebind_until = rebind_until or now + REBIND_SECONDS
                if now < rebind_until:
                    self._note_exit(run)
                    self._forget_clash(run)
                    await asyncio.sleep(0.5)
                    self.start_service(name)
                    continue
                raise AssertionError(
                    f"{name} cannot bind its port {run.port} again: another process has held it for "
                    f"{REBIND_SECONDS:.0f}s, and the other services reach {name} there"
                )
            if code is not None:
                raise AssertionError(f"{name} exited with code {code}:\n{self.log_tail(name)}")
            last = await self.readyz(name, timeout=min(5.0, max(timeout, 0.5)))
            if last[0] == 200 and last[1].get("status") == "ready":
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise AssertionError(
                    f"{name} not ready within {timeout:.0f}s (last /readyz: {last}):\n{self.log_tail(name)}"
                )
            await asyncio.sleep(interval)

    async def metrics_text(self, name: str) -> str:
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.get(f"{self.url(name)}/metrics")
            response.raise_for_status()
            return response.text

    async def metric(self, name: str, metric: str, **labels: str) -> float:
        """Sum of the samples named ``metric`` (a counter's ``_total`` name included) whose labels match."""
        return sum_samples(await self.metrics_text(name), metric, **labels)

    # -- servers ---------------------------------------------------------------------------------------------

    def stop_redis(self, *, keep_data: bool = False) -> None:
        """Stops the private Redis. Without ``keep_data`` its dump is deleted, so it comes back empty, as the
        machine's Redis (run without persistence) would."""
        self.redis_server.stop()
        if not keep_data:
            with contextlib.suppress(FileNotFoundError):
                (self.redis_server.data_dir / "dump.rdb").unlink()

    def start_redis(self) -> None:
        """Starts Redis again on the same port (the services keep their URL). Another process may have taken the
        port while Redis was down: the bind is retried for up to REBIND_SECONDS, then this fails saying so."""
        port = self.redis_port
        assert port is not None
        deadline = time.monotonic() + REBIND_SECONDS
        problem = ""
        while True:
            if free_port(port) == port:
                try:
                    self.redis_server.start(preferred_port=port)
                except EmbeddedServerError as exc:  # taken again between the check and Redis' own bind
                    self.redis_server.stop()
                    problem = str(exc)
                else:
                    if self.redis_server.port == port:
                        return
                    problem = f"Redis came back on port {self.redis_server.port}"
                    self.redis_server.stop()  # started elsewhere: taken between the two checks
            else:
                problem = "the port is in use"
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"Redis cannot listen on port {port} again: another process has held it for "
                    f"{REBIND_SECONDS:.0f}s ({problem}); the services' URL names that port"
                )
            time.sleep(0.25)

    def stop_postgres(self) -> None:
        self.postgres.stop()

    def start_postgres(self) -> None:
        # Same data directory, so the same unix socket: the services' URL stays valid.
        self.postgres.start()

    # -- direct clients --------------------------------------------------------------------------------------

    def redis_client(self) -> Redis:
        return Redis.from_url(self.redis_url, socket_timeout=10, socket_connect_timeout=5)

    async def db(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.database_url)

    def stream_key(self, stream: str) -> str:
        return self.settings.key("stream", stream)

    async def group_info(self, stream: str, group: str) -> dict[str, Any] | None:
        """XINFO GROUPS of the stream, for ``group`` (pending, lag, entries-read...), or None without it."""
        redis = self.redis_client()
        try:
            groups = await redis.xinfo_groups(self.stream_key(stream))
        except Exception:
            return None
        finally:
            await redis.aclose()
        for entry in groups:
            info = {_text(k): _text(v) for k, v in entry.items()}
            if info.get("name") == group:
                return info
        return None

    async def wait_drained(self, stream: str, group: str, timeout: float = 120.0) -> float:
        """Seconds until ``group`` has read everything (lag 0) and acknowledged it (pending 0)."""
        started = time.monotonic()
        last: dict[str, Any] | None = None
        while True:
            last = await self.group_info(stream, group)
            if last is not None and int(last.get("pending") or 0) == 0 and last.get("lag") in (0, "0"):
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise AssertionError(f"{stream}/{group} not drained within {timeout:.0f}s: {last}")
            await asyncio.sleep(0.25)


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


def sum_samples(exposition: str, metric: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == metric and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def samples(exposition: str, metric: str) -> Iterable[tuple[dict[str, str], float]]:
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == metric:
                yield dict(sample.labels), sample.value


@dataclass
class ResultRow:
    """One line of the suite's table: filled in by a scenario, its verdict set from the test's outcome."""

    scenario: str
    checked: str = ""
    sent: int | None = None
    stored: int | None = None
    lost: int | None = None
    duplicated: int | None = None
    recover_seconds: float | None = None
    scale: str = field(default_factory=scale)
    verdict: str = ""
    notes: str = ""

    def update(self, **values: Any) -> None:
        for key, value in values.items():
            if not hasattr(self, key):
                raise AttributeError(f"ResultRow has no field {key!r}")
            setattr(self, key, value)
