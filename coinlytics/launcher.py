"""The process supervisor behind ``coinlytics run``: one process per service, their output prefixed and
coloured, a crashed service restarted with capped backoff (what ``restart: unless-stopped`` or Kubernetes
give), and everything stopped on Ctrl-C or when a service keeps crashing right at startup."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import IO

from shared.backoff import jittered_backoff

COLOURS = ("\033[36m", "\033[33m", "\033[32m", "\033[35m", "\033[34m", "\033[31m")
RESET = "\033[0m"


@dataclass
class ServiceProcess:
    name: str
    command: list[str]
    colour: str = ""
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    # Crashes in a row that each came within ``startup_seconds`` of a start.
    startup_crashes: int = 0
    # Crashes in a row, whatever the uptime; reset once the service stays up ``stable_seconds``.
    crashes: int = 0
    next_start_at: float | None = None
    reader: threading.Thread | None = field(default=None, repr=False)


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


class Launcher:
    def __init__(
        self,
        commands: Mapping[str, list[str]],
        *,
        env: Mapping[str, str],
        say: Callable[[str], None],
        out: IO[str] | None = None,
        initial_backoff: float = 1.0,
        max_backoff: float = 30.0,
        startup_seconds: float = 15.0,
        max_startup_crashes: int = 5,
        stable_seconds: float = 300.0,
        colour: bool | None = None,
    ) -> None:
        use_colour = sys.stdout.isatty() if colour is None else colour
        self.services = [
            ServiceProcess(name, list(cmd), COLOURS[i % len(COLOURS)] if use_colour else "")
            for i, (name, cmd) in enumerate(commands.items())
        ]
        self.env = dict(env)
        self.say = say
        self.out = out or sys.stdout
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self.startup_seconds = startup_seconds
        self.max_startup_crashes = max_startup_crashes
        self.stable_seconds = stable_seconds
        self.width = max(len(s.name) for s in self.services)
        self._stopping = threading.Event()
        self._write_lock = threading.Lock()
        self.returncode = 0

    # -- output ----------------------------------------------------------------------------------------------

    def _pump(self, service: ServiceProcess, stream: IO[bytes]) -> None:
        prefix = f"{service.colour}{service.name:<{self.width}} |{RESET if service.colour else ''} "
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self._write_lock:
                self.out.write(prefix + line + "\n")
                self.out.flush()
        stream.close()

    # -- processes -------------------------------------------------------------------------------------------

    def _start(self, service: ServiceProcess) -> None:
        service.process = subprocess.Popen(  # noqa: S603 - our own interpreter and module names
            service.command,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches the launcher only; it stops the services in order
        )
        service.started_at = time.monotonic()
        service.next_start_at = None
        assert service.process.stdout is not None
        service.reader = threading.Thread(
            target=self._pump, args=(service, service.process.stdout), name=f"out:{service.name}", daemon=True
        )
        service.reader.start()
        self.say(f"{service.name} started (pid {service.process.pid})")

    def _on_exit(self, service: ServiceProcess, code: int) -> bool:
        """Schedules a restart; False when the service keeps crashing at startup and the launcher gives up."""
        uptime = time.monotonic() - service.started_at
        service.process = None
        if uptime < self.startup_seconds:
            service.startup_crashes += 1
        else:
            service.startup_crashes = 0
        service.crashes = 1 if uptime >= self.stable_seconds else service.crashes + 1
        if service.startup_crashes >= self.max_startup_crashes:
            self.say(
                f"{service.name} {describe_exit(code)} {service.startup_crashes} times in a row within "
                f"{self.startup_seconds:.0f}s of starting; stopping everything (see its log lines above)"
            )
            return False
        service.restarts += 1
        # No jitter: one launcher restarting one process has nobody to fall into lockstep with.
        delay = jittered_backoff(service.crashes, base=self.initial_backoff, cap=self.max_backoff, jitter="none")
        service.next_start_at = time.monotonic() + delay
        self.say(
            f"{service.name} {describe_exit(code)} after {uptime:.1f}s; restarting in {delay:.2g}s "
            f"(restart {service.restarts})"
        )
        return True

    def run(self) -> int:
        """Runs until Ctrl-C / SIGTERM, or until a service keeps crashing at startup. Returns the exit code."""
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

        def request_stop(signum: int, _frame: object) -> None:
            if not self._stopping.is_set():
                self.say(f"{signal.Signals(signum).name}: stopping every service")
            self._stopping.set()

        # Signal handlers can only be set from the main thread (tests drive the launcher from another one).
        handle_signals = threading.current_thread() is threading.main_thread()
        if handle_signals:
            for sig in previous:
                signal.signal(sig, request_stop)
        try:
            for service in self.services:
                self._start(service)
            while not self._stopping.wait(0.2):
                if not self._tick():
                    self.returncode = 1
                    break
        finally:
            self.stop_all()
            if handle_signals:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
        return self.returncode

    def _tick(self) -> bool:
        now = time.monotonic()
        for service in self.services:
            if service.process is not None:
                code = service.process.poll()
                if code is not None and not self._on_exit(service, code):
                    return False
            elif service.next_start_at is not None and now >= service.next_start_at:
                self._start(service)
        return True

    def request_stop(self) -> None:
        """What Ctrl-C does, for callers that are not the main thread."""
        self._stopping.set()

    def stop_all(self, grace_seconds: float = 10.0) -> None:
        self._stopping.set()
        running = [s for s in self.services if s.process is not None and s.process.poll() is None]
        for service in running:
            assert service.process is not None
            # SIGINT: uvicorn's graceful shutdown, so lifespans close connections and stop their tasks.
            with _suppress_lookup():
                os.killpg(service.process.pid, signal.SIGINT)
        deadline = time.monotonic() + grace_seconds
        for service in running:
            assert service.process is not None
            try:
                service.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.say(f"{service.name} did not stop in {grace_seconds:.0f}s; killing it")
                with _suppress_lookup():
                    os.killpg(service.process.pid, signal.SIGKILL)
                service.process.wait(timeout=5)
        for service in self.services:
            if service.reader is not None:
                service.reader.join(timeout=2)
        if running:
            self.say("all services stopped")


class _suppress_lookup:
    """A process group that is already gone is what we wanted."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> bool:
        return kind is not None and issubclass(kind, ProcessLookupError)
