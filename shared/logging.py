"""structlog setup: the system log (JSON lines, shared/system_log.py) and stderr (JSON or readable lines), with a
request/correlation id carried through HTTP and stream messages."""

from __future__ import annotations

import contextlib
import logging
import sys
import uuid
from collections.abc import Callable
from contextvars import ContextVar
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.system_log import SystemLog, encode_line

CORRELATION_HEADER = "x-correlation-id"
_correlation_id: ContextVar[str | None] = ContextVar("correlation_id", default=None)


def new_correlation_id() -> str:
    return uuid.uuid4().hex


def get_correlation_id() -> str | None:
    return _correlation_id.get()


def set_correlation_id(value: str | None) -> None:
    _correlation_id.set(value)


def _add_correlation_id(
    logger: object, method: str, event_dict: structlog.types.EventDict
) -> structlog.types.EventDict:
    cid = _correlation_id.get()
    if cid and "correlation_id" not in event_dict:
        event_dict["correlation_id"] = cid
    return event_dict


# Level names as the methods structlog calls, and as they are written.
_LEVEL_NUMBERS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "msg": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "exception": logging.ERROR,
    "critical": logging.CRITICAL,
    "fatal": logging.CRITICAL,
}
_LEVEL_NAMES = {"msg": "info", "warn": "warning", "exception": "error", "fatal": "critical"}
# Not repeated on a console line: the launcher prefixes each line with the service already.
_CONSOLE_HIDDEN = frozenset({"timestamp", "level", "service", "event", "correlation_id", "exception", "stack"})


def _will_retry(d: dict[str, Any]) -> str:
    return "will retry" if d.get("will_retry") else "giving up"


# The readable console line of each catalogued event (docs/operations.md); any other event is
# "Event name: k=v ...". A template missing a field falls back to that form too.
_CONSOLE_MESSAGES: dict[str, Callable[[dict[str, Any]], str]] = {
    "request_started": lambda d: f"Request started: {d['method']} {d['path']}",
    "request_finished": lambda d: (
        f"Request finished: {d['method']} {d['path']} {d['status']} in {float(d['duration_ms']):.1f} ms"
    ),
    "db_connection_created": lambda d: f"Database connection created: {d['host']}/{d['database']}",
    "task_started": lambda d: (
        f"Task started: {d['task']} (job {d['job_id']}, queue {d['queue']}, attempt {d['attempt']})"
    ),
    "task_completed": lambda d: (
        f"Task completed: {d['task']} (job {d['job_id']}, attempt {d['attempt']}) in {float(d['duration_ms']):.1f} ms"
    ),
    "task_failed": lambda d: (
        f"Task failed: {d['task']} (job {d['job_id']}, attempt {d['attempt']}) after "
        f"{float(d['duration_ms']):.1f} ms: {d['error']}; {_will_retry(d)}"
    ),
    "consumer_started": lambda d: f"Consumer started: {d['consumer']} reading {d['stream']} (group {d['group']})",
    "consumer_stopped": lambda d: f"Consumer stopped: {d['consumer']} reading {d['stream']} (group {d['group']})",
    "consumer_reclaimed": lambda d: (
        f"Consumer reclaimed {d['count']} entries: {d['consumer']} on {d['stream']} (group {d['group']})"
    ),
    "consumer_dead_lettered": lambda d: (
        f"Entry dead-lettered: {d['entry_id']} of {d['stream']} (group {d['group']}): {d['reason']}"
    ),
    "source_connected": lambda d: f"Source connected: {d['source']} ({d['kind']})",
    "source_disconnected": lambda d: f"Source disconnected: {d['source']} ({d['kind']}): {d['reason']}",
    "source_error": lambda d: f"Source error: {d['source']} ({d['kind']}): {d['reason']}",
    "alert_fired": lambda d: f"Alert fired: {d['alert_id']} {d['symbol']}/{d['vs']} {d['condition']}",
    "alert_delivered": lambda d: (
        f"Alert delivery {d['outcome']}: {d['alert_id']} by {d['channel']} (attempt {d['attempt']}, "
        f"{float(d['duration_ms']):.1f} ms)"
    ),
}


# What a console line must not carry raw: C0 controls, DEL, C1 controls (U+0085 is a line break to
# str.splitlines, U+009B a CSI to some terminals) and the Unicode line and paragraph separators. Values such
# as a request's path are the caller's (percent-decoded) input: a raw newline would let it forge a line of
# its own (CWE-117), an ESC would drive the terminal. Written as \n, \r, \t, \xNN, \u2028, \u2029.
_CONSOLE_ESCAPES: dict[int, str] = {
    **{code: f"\\x{code:02x}" for code in (*range(0x20), 0x7F, *range(0x80, 0xA0))},
    0x09: "\\t",
    0x0A: "\\n",
    0x0D: "\\r",
    0x2028: "\\u2028",
    0x2029: "\\u2029",
}


def console_escape(text: str) -> str:
    # isprintable() is false for every character above (and for a few harmless ones, left as they are by
    # translate): one C-level scan on the usual line, which has none.
    return text if text.isprintable() else text.translate(_CONSOLE_ESCAPES)


def _generic_message(record: dict[str, Any]) -> str:
    name = str(record.get("event", "")).replace("_", " ")
    fields = " ".join(f"{k}={v}" for k, v in record.items() if k not in _CONSOLE_HIDDEN)
    title = name[:1].upper() + name[1:]
    return f"{title}: {fields}" if fields else title


def console_line(record: dict[str, Any]) -> str:
    """``[2026-12-01 13:55:00] [INFO] Request started: GET /api/v1/coins`` (UTC). One line whatever the values
    hold (control characters escaped); a stack or traceback follows on lines indented by four spaces, so no
    line of it can pass for a line of its own."""
    stamp = record.get("timestamp")
    if isinstance(stamp, datetime):
        if stamp.utcoffset():  # ours is UTC already; an event's own timestamp= field may not be
            stamp = stamp.astimezone(UTC)
        when = stamp.isoformat(" ", "seconds")[:19]  # a third of strftime's time, on every console line
    else:
        text = str(stamp or "")
        when = f"{text[:10]} {text[11:19]}"
    template = _CONSOLE_MESSAGES.get(str(record.get("event")))
    message = None
    if template is not None:
        try:
            message = template(record)
        except Exception:  # a field missing or of another type: the generic form still says everything
            message = None
    level = str(record.get("level", "")).upper()
    line = console_escape(f"[{when}] [{level}] {message or _generic_message(record)}")
    for extra in ("stack", "exception"):
        if record.get(extra):
            for part in str(record[extra]).splitlines():
                line += "\n    " + console_escape(part)
    return line


class _Output:
    """The last processor: orders the event (timestamp, level, service, event, fields), renders the JSON line
    for the system log and what stderr gets, and hands both to ``_Sink``."""

    def __init__(self, service: str, system_log: SystemLog | None, stderr_level: int, fmt: str) -> None:
        self.service = service
        self.system_log = system_log
        self.stderr_level = stderr_level
        self.console = fmt == "console"

    def __call__(self, logger: object, method_name: str, event_dict: structlog.types.EventDict) -> Any:
        level = _LEVEL_NAMES.get(method_name, method_name)
        record: dict[str, Any] = {
            # A datetime: encode_line writes it (as iso_z would), the console formats it only when shown.
            "timestamp": datetime.now(UTC),
            "level": level,
            "service": event_dict.pop("service", self.service),
            "event": event_dict.pop("event", None),
        }
        record.update(event_dict)
        to_stderr = _LEVEL_NUMBERS.get(method_name, logging.INFO) >= self.stderr_level
        data = encode_line(record) if self.system_log is not None or (to_stderr and not self.console) else b""
        text = None
        if to_stderr:
            text = console_line(record) if self.console else data.decode()
        return (data, text), {}


class _Sink:
    """structlog's logger: one method per level, all the same (the level was handled by ``_Output``). Also
    the logger factory (it returns itself), so the process's structlog configuration names the writer."""

    def __init__(self, system_log: SystemLog | None) -> None:
        self.system_log = system_log

    def __call__(self, *args: object) -> _Sink:
        return self

    def emit(self, data: bytes, text: str | None) -> None:
        if self.system_log is not None and data:
            self.system_log.write(data)
        if text is not None:
            with contextlib.suppress(Exception):  # a closed or full stderr must not fail the caller
                # Looked up on each line: tests capture stderr by replacing sys.stderr.
                sys.stderr.write(text + "\n")

    debug = info = msg = warning = warn = error = exception = critical = fatal = log = emit


def active_system_log() -> SystemLog | None:
    """The writer structlog's configuration writes to now (None: no system log). structlog's configuration
    is the process's, so this is what the last ``configure_logging`` set up; an app takes it once, when it is
    built (shared/service_app.py puts it on its Resources and its dropped-lines metric)."""
    factory = structlog.get_config().get("logger_factory")
    return factory.system_log if isinstance(factory, _Sink) else None


def configure_logging(
    service: str,
    level: str = "INFO",
    fmt: str = "json",
    system_log: SystemLog | Path | str | None = None,
) -> SystemLog | None:
    """structlog for a process: every event as a JSON line into the system log (``system_log``: a writer or
    a path; at INFO and above even when ``level`` is higher, as the report needs the lifecycle events) and
    at ``level`` and above to stderr, as JSON (``fmt="json"``) or readable lines (``fmt="console"``).
    Returns the system log writer."""
    writer = SystemLog(system_log, service=service) if isinstance(system_log, (str, Path)) else system_log
    if writer is not None and writer.service is None:
        writer.service = service
    previous = active_system_log()
    if previous is not None and previous is not writer:
        previous.close()  # its file descriptor; an app built on it still reads its dropped count
    stderr_level = _LEVEL_NUMBERS.get(level.strip().lower(), logging.INFO)
    # Events below this are dropped by the bound logger's no-op methods, before any processor runs.
    threshold = min(stderr_level, logging.INFO) if writer is not None else stderr_level
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            _add_correlation_id,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            _Output(service, writer, stderr_level, fmt),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        logger_factory=_Sink(writer),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.bind_contextvars(service=service)
    # Route the standard library's loggers (uvicorn, sqlalchemy, ccxt) to the same stream at WARNING+.
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    return writer


class CorrelationIdMiddleware:
    """Takes the caller's ``X-Correlation-ID`` (or makes one), binds it for logs, echoes it back."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        incoming = None
        for name, value in scope.get("headers", []):
            if name == CORRELATION_HEADER.encode():
                incoming = value.decode("latin-1")[:64]
                break
        cid = incoming if incoming and incoming.replace("-", "").isalnum() else new_correlation_id()
        token = _correlation_id.set(cid)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((CORRELATION_HEADER.encode(), cid.encode()))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            _correlation_id.reset(token)
