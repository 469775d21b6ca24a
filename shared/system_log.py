"""The system log: one JSON-lines file that every service process of a data dir appends to.

Why one file and no interleaving: each process opens it with ``O_APPEND`` and hands every complete line to a
single ``os.write``. On Linux an appending write to a regular file moves to the end and writes under the
inode's lock, so concurrent appends land whole, one after another, whatever their size. Nothing is
buffered in the process, so a crash loses no line that was already logged.

Rotation is by size: the process that sees the file pass the limit tries to take an ``flock`` on
``<path>.lock`` without waiting (the write runs inside a logging call, often on the event loop: if another
process holds the lock, it is rotating, and this process tries again at a write a second later), checks
that the file is still the one it wrote to (another process may have rotated it already) and renames it to
``<stem>.<UTC yyyymmddTHHMMSS>.log`` beside it. Other processes keep appending to the renamed file until
they notice that the path names a new inode (checked at most once a second), then reopen: their lines are in
the rotated file, none is lost.

Retention: a writer given ``retention_days`` deletes the expired rotated files at most once an hour, in a
short-lived thread, never inside the logging call. The gateway's hourly job does it too; the writer's own
pass covers processes whose data dir the gateway does not see (another pod's volume).

A write that fails (a full disk, a removed directory, any ``OSError``) never reaches the caller: the line is
dropped and counted (``system_log_dropped_lines_total``). A nearly full disk fails and succeeds by turns,
so stderr is told at most once every ten minutes that writing fails, and the log counts as working again
only after a minute without a failed write; then stderr (if it was told of this outage) and the file get the
number of lines lost.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import stat
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from shared.settings import Settings

DEFAULT_NAME = "coinlytics_system.log"
ROTATED_TIME_FORMAT = "%Y%m%dT%H%M%S"
# The defaults of each writer's timings (attributes of the writer, so a test can shorten them).
# How often a writer looks whether the path still names the file it has open (another process rotated it).
REOPEN_CHECK_SECONDS = 1.0
# After a failed open (directory gone, permission), how long before trying again: not once per line.
RETRY_OPEN_SECONDS = 1.0
# After a rotation that could not run (the lock held by another process's rotation, a failed rename).
ROTATE_RETRY_SECONDS = 1.0
# At most one "cannot write" on stderr this often, however often a nearly full disk flips.
WARN_INTERVAL_SECONDS = 600.0
# Writing counts as working again after this long without a failed write.
RECOVERY_SECONDS = 60.0
# How often a writer with a retention deletes the expired rotated files.
CLEANUP_INTERVAL_SECONDS = 3600.0

_ORJSON_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_UTC_Z


def _as_text(value: object) -> str:
    return str(value)  # Decimal, Path, exceptions...: their text


def encode_line(record: dict[str, Any]) -> bytes:
    """One record as a line of the system log (without the newline). Datetimes, the ``timestamp`` included,
    are written by orjson as ISO 8601 in UTC with a "Z", the same text as ``shared.timeparse.iso_z``, in C:
    this is on every logging call."""
    try:
        return orjson.dumps(record, default=_as_text, option=_ORJSON_OPTIONS)
    except Exception:  # an int past 64 bits, a recursive structure: every value as text, the line still goes out
        return orjson.dumps(
            {str(k): v if isinstance(v, (str, datetime)) else repr(v) for k, v in record.items()},
            option=orjson.OPT_UTC_Z,
        )


class SystemLog:
    """Appends lines to the system log from one process (thread-safe). ``write`` never raises."""

    def __init__(
        self,
        path: Path | str,
        *,
        max_bytes: int = 50 * 1024 * 1024,
        retention_days: float | None = None,
        service: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.max_bytes = max(1, int(max_bytes))
        # When set, the process that rotates also deletes rotated files past it (the scheduled job does it too).
        self.retention_days = retention_days
        self.service = service
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.reopen_check_seconds = REOPEN_CHECK_SECONDS
        self.retry_open_seconds = RETRY_OPEN_SECONDS
        self.rotate_retry_seconds = ROTATE_RETRY_SECONDS
        self.warn_interval_seconds = WARN_INTERVAL_SECONDS
        self.recovery_seconds = RECOVERY_SECONDS
        self.cleanup_interval_seconds = CLEANUP_INTERVAL_SECONDS
        self.dropped = 0  # lines lost since the process started
        self._dropped_in_outage = 0
        # An outage: from the first dropped line until writing has worked for recovery_seconds.
        self._failing = False
        self._clean_since: float | None = None  # the first good write since the last dropped line
        self._last_warning: float | None = None  # when stderr was last told that writing fails
        self._outage_said = False  # stderr was told of the current outage (so it is told of its end)
        self._last_cleanup: float | None = None  # when this writer last started a clean-up pass
        self.cleanup_thread: threading.Thread | None = None  # the last clean-up pass started
        self._fd: int | None = None
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the open file
        self._rotatable = False  # a regular file (not /dev/full, a pipe, ...)
        self._next_check = 0.0
        self._rotate_after = 0.0
        self._open_error: BaseException | None = None
        self._lock = threading.Lock()

    @classmethod
    def for_settings(cls, settings: Settings, service: str | None = None) -> SystemLog:
        return cls(
            settings.system_log_file(),
            max_bytes=int(settings.system_log_max_mb * 1024 * 1024),
            retention_days=settings.system_log_retention_days,
            service=service,
        )

    # Writing

    def write(self, line: bytes) -> bool:
        """Appends one line (a trailing newline is added if missing). False when it was dropped."""
        if not line.endswith(b"\n"):
            line += b"\n"
        try:
            with self._lock:
                return self._write_locked(line)
        except Exception as exc:  # never into the caller: a log line is not worth a failed request
            self._dropped(exc)
            return False

    def _write_locked(self, line: bytes) -> bool:
        now = time.monotonic()
        if self.retention_days is not None and (
            self._last_cleanup is None or now - self._last_cleanup >= self.cleanup_interval_seconds
        ):
            # Before the write, so that a full disk gets the room back too.
            self._last_cleanup = now
            self._start_cleanup()
        if self._fd is None or now >= self._next_check:
            self._refresh(now)
        fd = self._fd
        if fd is None:
            self._dropped(self._open_error)
            return False
        try:
            written = os.write(fd, line)
        except OSError as exc:
            self._dropped(exc)
            return False
        if written != len(line):
            # A short write (the disk filled mid-line): end the fragment so the next line starts clean; the
            # torn line is unreadable, so it counts as dropped.
            with contextlib.suppress(OSError):
                os.write(fd, b"\n")
            self._dropped(OSError(errno.ENOSPC, "short write"))
            return False
        if self._failing:
            if self._clean_since is None:
                self._clean_since = now
            if now - self._clean_since >= self.recovery_seconds:
                self._recovered()
        # With O_APPEND the offset after a write is the file's end at that moment: the size, every process's
        # lines included, without another stat.
        too_big = self._rotatable and os.lseek(fd, 0, os.SEEK_CUR) >= self.max_bytes
        if too_big and now >= self._rotate_after and not self._rotate():
            self._rotate_after = now + self.rotate_retry_seconds  # not a lock and a rename attempt per line
        return True

    def _refresh(self, now: float) -> None:
        """(Re)opens the file when none is open or the path now names another file."""
        self._next_check = now + self.reopen_check_seconds
        if self._fd is not None:
            try:
                st = self.path.stat()
                if (st.st_dev, st.st_ino) == self._identity:
                    return
            except OSError:
                pass  # removed or unreachable: open again (which creates it, or fails and is retried)
        self._reopen()

    def _reopen(self) -> None:
        self._close_fd()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            self._open_error = exc
            self._next_check = time.monotonic() + self.retry_open_seconds
            return
        st = os.fstat(fd)
        self._fd = fd
        self._identity = (st.st_dev, st.st_ino)
        self._rotatable = stat.S_ISREG(st.st_mode)
        self._open_error = None

    def _close_fd(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd = None
        self._identity = None

    def _rotate(self) -> bool:
        """Renames the file aside if this process's file is still the current one and too big; reopens.
        False when that failed (the file keeps growing until a later attempt works)."""
        try:
            lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError:
            return False  # cannot coordinate: keep appending
        try:
            # Never wait: the lock is held only by another process's rotation, after which this one's file is
            # no longer the current one (seen at the next reopen check) or, rarely, still too big (retried).
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(lock_fd)
            return False
        try:
            try:
                st = self.path.stat()
            except FileNotFoundError:
                st = None
            # Only the file this process wrote to, and only while it is still over the limit: another
            # process may have rotated it between our write and the lock.
            if st is not None and (st.st_dev, st.st_ino) == self._identity and st.st_size >= self.max_bytes:
                self.path.rename(rotated_name(self.path, datetime.now(UTC)))
            self._reopen()
            self._next_check = time.monotonic() + self.reopen_check_seconds
        except OSError:
            return False
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(lock_fd, fcntl.LOCK_UN)
            os.close(lock_fd)
        return True

    # Retention

    def _start_cleanup(self) -> None:
        thread = threading.Thread(target=self._cleanup, name="system-log-cleanup", daemon=True)
        self.cleanup_thread = thread
        with contextlib.suppress(RuntimeError):  # no new threads at interpreter shutdown: next time
            thread.start()

    def _cleanup(self) -> None:
        if self.retention_days is not None:
            with contextlib.suppress(Exception):  # an unreadable directory: the next pass, or the cron job
                delete_expired(self.path, self.retention_days)

    # Failure reporting

    def _dropped(self, exc: BaseException | None) -> None:
        # Every line counts, whatever stderr is told.
        self.dropped += 1
        self._dropped_in_outage += 1
        self._failing = True
        self._clean_since = None
        now = time.monotonic()
        if self._last_warning is not None and now - self._last_warning < self.warn_interval_seconds:
            return
        self._last_warning = now
        self._outage_said = True
        why = f"{type(exc).__name__}: {exc}" if exc is not None else "unknown error"
        _say(
            f"system log: cannot write to {self.path} ({why}); dropping log lines until it works again "
            f"({self.dropped} so far, counted in system_log_dropped_lines_total; said at most every "
            f"{self.warn_interval_seconds:g} s); the service keeps running"
        )

    def _recovered(self) -> None:
        count = self._dropped_in_outage
        self._failing = False
        self._dropped_in_outage = 0
        self._clean_since = None
        if self._outage_said:
            # Only the end of an outage stderr was told of: the rate limit holds for both messages.
            self._outage_said = False
            _say(
                f"system log: writing to {self.path} again; {count} lines were dropped while it failed "
                f"({self.dropped} since the start)"
            )
        # Always in the file, so the report can tell a gap from a quiet spell.
        record = {
            "timestamp": datetime.now(UTC),
            "level": "warning",
            "service": self.service,
            "event": "system_log_lines_dropped",
            "count": count,
        }
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.write(self._fd, encode_line(record) + b"\n")

    @property
    def failing(self) -> bool:
        return self._failing

    def close(self) -> None:
        with self._lock:
            self._close_fd()


def _say(message: str) -> None:
    # stderr may be on the same full disk, or closed: never let that reach the caller either.
    with contextlib.suppress(Exception):
        sys.stderr.write(message + "\n")
        sys.stderr.flush()


class DroppedLinesCollector(Collector):
    """``system_log_dropped_lines_total`` for a service's registry, read from the app's writer when scraped
    (no work per line); 0 without one."""

    def __init__(self, writer: SystemLog | None) -> None:
        self.writer = writer

    def collect(self) -> Iterator[CounterMetricFamily]:
        writer = self.writer
        yield CounterMetricFamily(
            "system_log_dropped_lines",
            "System log lines lost because the file could not be written (full disk, ...)",
            value=writer.dropped if writer is not None else 0,
        )


# Files


@dataclass(frozen=True)
class LogFile:
    path: Path
    # When it was rotated (None: the current file).
    rotated_at: datetime | None
    sequence: int = 0


def rotated_name(path: Path, when: datetime) -> Path:
    """``<stem>.<yyyymmddTHHMMSS>.log`` beside ``path``, with ``-1``, ``-2``, ... when taken (callers hold the
    rotation lock, so the check cannot race another rotation)."""
    base = f"{path.stem}.{when.astimezone(UTC).strftime(ROTATED_TIME_FORMAT)}"
    candidate = path.with_name(f"{base}{path.suffix}")
    counter = 0
    while candidate.exists():
        counter += 1
        candidate = path.with_name(f"{base}-{counter}{path.suffix}")
    return candidate


def _rotated_pattern(path: Path) -> re.Pattern[str]:
    return re.compile(rf"^{re.escape(path.stem)}\.(\d{{8}}T\d{{6}})(?:-(\d+))?{re.escape(path.suffix)}$")


def rotated_files(path: Path | str) -> list[LogFile]:
    """The rotated files of the log at ``path``, oldest first."""
    path = Path(path)
    pattern = _rotated_pattern(path)
    found: list[LogFile] = []
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return []
    for entry in entries:
        match = pattern.match(entry.name)
        if not match:
            continue
        try:
            when = datetime.strptime(match.group(1), ROTATED_TIME_FORMAT).replace(tzinfo=UTC)
        except ValueError:
            continue
        found.append(LogFile(entry, when, int(match.group(2) or 0)))
    found.sort(key=lambda f: (f.rotated_at or datetime.max.replace(tzinfo=UTC), f.sequence))
    return found


def log_files(path: Path | str) -> list[Path]:
    """Every file holding the system log at ``path``, oldest first: the rotated ones, then the current one
    (if it exists). What a reader (the report) reads, in order."""
    path = Path(path)
    files = [f.path for f in rotated_files(path)]
    if path.exists():
        files.append(path)
    return files


def delete_expired(path: Path | str, retention_days: float, *, now: datetime | None = None) -> list[Path]:
    """Deletes the rotated files of the log at ``path`` rotated more than ``retention_days`` ago (by the time
    in their name: every line in one is older than that). The current file is never deleted. Returns them."""
    cutoff = (now or datetime.now(UTC)) - timedelta(days=retention_days)
    deleted: list[Path] = []
    for file in rotated_files(path):
        if file.rotated_at is not None and file.rotated_at < cutoff:
            try:
                file.path.unlink()
            except FileNotFoundError:
                continue  # another process's clean-up got there first
            deleted.append(file.path)
    return deleted
