"""`coinlytics run`'s process supervision, with real child processes."""

from __future__ import annotations

import io
import os
import signal
import sys
import threading
import time

from coinlytics.launcher import Launcher

SLEEPER = [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(120)"]


def wait_for(check, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"condition not met within {timeout}s")


def start(launcher: Launcher) -> tuple[threading.Thread, list[int]]:
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(launcher.run()), daemon=True)
    thread.start()
    return thread, result


def test_a_service_killed_with_sigkill_is_restarted_and_the_others_keep_running():
    said: list[str] = []
    out = io.StringIO()
    launcher = Launcher(
        {"pricing": SLEEPER, "gateway": SLEEPER}, env=dict(os.environ), say=said.append, out=out,
        initial_backoff=0.05, startup_seconds=0.5,
    )  # fmt: skip
    thread, result = start(launcher)
    pricing, gateway = launcher.services
    first = wait_for(lambda: pricing.process and pricing.process.pid)
    gateway_pid = wait_for(lambda: gateway.process and gateway.process.pid)
    time.sleep(0.6)  # past the startup window: this is a crash of a running service
    os.kill(first, signal.SIGKILL)
    second = wait_for(lambda: pricing.process and pricing.process.pid != first and pricing.process.pid)
    assert pricing.restarts == 1
    assert gateway.process is not None and gateway.process.pid == gateway_pid and gateway.process.poll() is None
    assert any("pricing killed by SIGKILL" in line and "restarting" in line for line in said)
    launcher.request_stop()
    thread.join(timeout=20)
    assert result == [0]
    for pid in (second, gateway_pid):
        wait_for(lambda pid=pid: not _alive(pid), timeout=5)
    assert "pricing | up" in out.getvalue().replace("  ", " ")


def test_a_service_that_keeps_crashing_at_startup_stops_the_platform():
    said: list[str] = []
    crasher = [sys.executable, "-c", "import sys; print('cannot start: bad setting', flush=True); sys.exit(2)"]
    launcher = Launcher(
        {"ingest": crasher, "gateway": SLEEPER}, env=dict(os.environ), say=said.append, out=io.StringIO(),
        initial_backoff=0.05, startup_seconds=5, max_startup_crashes=3,
    )  # fmt: skip
    thread, result = start(launcher)
    thread.join(timeout=30)
    assert result == [1]
    assert launcher.services[0].startup_crashes == 3
    assert any("ingest exited with code 2 3 times in a row" in line for line in said)
    gateway = launcher.services[1]
    assert gateway.process is None or gateway.process.poll() is not None


def test_a_service_that_keeps_crashing_after_starting_backs_off_more_each_time():
    said: list[str] = []
    late_crasher = [sys.executable, "-c", "import time, sys; time.sleep(0.3); sys.exit(1)"]
    launcher = Launcher(
        {"pricing": late_crasher}, env=dict(os.environ), say=said.append, out=io.StringIO(),
        initial_backoff=0.05, max_backoff=0.4, startup_seconds=0.1, stable_seconds=60,
    )  # fmt: skip
    thread, result = start(launcher)
    pricing = launcher.services[0]
    wait_for(lambda: pricing.restarts >= 4, timeout=20)
    launcher.request_stop()
    thread.join(timeout=20)
    assert result == [0]  # crashing after startup is never a reason to give up
    assert pricing.startup_crashes == 0 and pricing.crashes >= 4
    delays = [float(line.split("restarting in ")[1].split("s")[0]) for line in said if "restarting in" in line]
    assert delays[:4] == sorted(delays[:4]) and delays[3] > delays[0]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers signal 0; it is gone for our purposes once reaped or marked dead.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_generated_secrets_are_never_readable_by_others_not_even_before_chmod(tmp_path, monkeypatch):
    from pathlib import Path

    from coinlytics.cli import ensure_secrets

    modes_seen: list[int] = []
    real_chmod = Path.chmod

    def watching_chmod(self: Path, mode: int, **kwargs):
        modes_seen.append(self.stat().st_mode & 0o777)  # the mode the file had until this call
        return real_chmod(self, mode, **kwargs)

    monkeypatch.setattr(Path, "chmod", watching_chmod)
    previous = os.umask(0)  # the most permissive umask a user could have
    try:
        values = ensure_secrets(tmp_path)
    finally:
        os.umask(previous)
    path = tmp_path / "secrets.env"
    assert path.stat().st_mode & 0o777 == 0o600
    assert all(mode == 0o600 for mode in modes_seen)
    assert set(values) == {"COINLYTICS_JWT_SECRET", "COINLYTICS_HMAC_KEY"}
    assert ensure_secrets(tmp_path) == values  # kept, not regenerated
