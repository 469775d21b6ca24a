"""Source health: the per-source hash in Redis behind ``/api/v1/status`` and ``/api/v1/admin/sources``.

Every writer (ingest's REST and websocket runners, the CoinGecko job, conversion's ECB job, and ingest for
sources it does not run) builds a ``SourceHealth`` and stores it with ``save_health``; readers use
``parse_health``. This module is the one place the hash's fields and the ``state`` values are defined."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import structlog
from redis.asyncio import Redis

from shared.settings import Settings

log = structlog.get_logger("source_health")


class SourceState(StrEnum):
    """What a source is doing now (the ``state`` field; docs/sources.md lists the same values).

    - ``starting``: the runner is up and has not polled or connected yet.
    - ``connected``: the last poll, connection or scheduled run delivered.
    - ``down``: the last attempt failed (network, timeout, 5xx, bad response...); backing off, see
      ``backoff_seconds`` and ``last_error``.
    - ``rate_limited``: the source answered 429 (or its equivalent); waiting at least its Retry-After.
    - ``banned``: HTTP 418, an IP ban; a longer backoff.
    - ``publish_failed``: the source delivered but Redis refused the ticks; they are held and retried.
    - ``disabled``: named in COINLYTICS_SOURCES but not run (``last_error`` says why), or switched off by an
      administrator at runtime (``enabled: false``).
    - ``scheduled``: a scheduled job (CoinGecko) waiting for its first run.
    - ``backing_off``: a scheduled job starting inside the backoff a failure set before the restart.
    - ``error``: the ECB job's last fetch failed; its stored rates stay in use.
    """

    STARTING = "starting"
    CONNECTED = "connected"
    DOWN = "down"
    RATE_LIMITED = "rate_limited"
    BANNED = "banned"
    PUBLISH_FAILED = "publish_failed"
    DISABLED = "disabled"
    SCHEDULED = "scheduled"
    BACKING_OFF = "backing_off"
    ERROR = "error"


@dataclass
class SourceHealth:
    name: str
    kind: str
    state: SourceState = SourceState.STARTING
    last_message_at: str | None = None
    last_error: str | None = None
    last_error_kind: str | None = None
    last_error_at: str | None = None
    backoff_seconds: float = 0.0
    messages_total: int = 0
    rejected_total: int = 0
    # Websocket sources: how often the socket came back after dropping.
    reconnects: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    rate_window: list[tuple[float, int]] = field(default_factory=list)

    def count(self, kind: str, n: int = 1) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + n

    def connected(self) -> None:
        self.state = SourceState.CONNECTED
        self.backoff_seconds = 0.0

    def failed(self, kind: str, message: str, *, state: SourceState, backoff_seconds: float) -> None:
        """A failure of ``kind``: counted, kept as the last error, and the state and backoff it leads to."""
        self.state = state
        self.backoff_seconds = backoff_seconds
        self.count(kind)
        self.last_error = message
        self.last_error_kind = kind
        self.last_error_at = datetime.now(UTC).isoformat()

    def messages_per_second(self) -> float:
        now = time.monotonic()
        self.rate_window = [(t, n) for t, n in self.rate_window if now - t <= 60]
        if not self.rate_window:
            return 0.0
        span = max(now - self.rate_window[0][0], 1.0)
        return round(sum(n for _, n in self.rate_window) / span, 3)

    def as_redis(self) -> dict[str, str]:
        return {
            "name": self.name,
            "kind": self.kind,
            "state": str(self.state),
            "last_message_at": self.last_message_at or "",
            "last_error": self.last_error or "",
            "last_error_kind": self.last_error_kind or "",
            "last_error_at": self.last_error_at or "",
            "backoff_seconds": f"{self.backoff_seconds:.1f}",
            "messages_total": str(self.messages_total),
            "rejected_total": str(self.rejected_total),
            "reconnects": str(self.reconnects),
            "messages_per_second": str(self.messages_per_second()),
            "errors": ",".join(f"{k}={v}" for k, v in sorted(self.errors.items())),
        }

    @classmethod
    def from_redis(cls, raw: dict[bytes, bytes] | dict[str, str], *, name: str, kind: str) -> SourceHealth:
        """The stored hash back as an object, for a writer that updates it across processes (an empty hash
        gives a fresh one). The rate window is not stored: it starts empty."""
        data = parse_health(raw) if raw else {}
        return cls(
            name=data.get("name") or name,
            kind=data.get("kind") or kind,
            state=_state(data.get("state")),
            last_message_at=data.get("last_message_at"),
            last_error=data.get("last_error"),
            last_error_kind=data.get("last_error_kind"),
            last_error_at=data.get("last_error_at"),
            backoff_seconds=data.get("backoff_seconds", 0.0),
            messages_total=data.get("messages_total", 0),
            rejected_total=data.get("rejected_total", 0),
            reconnects=data.get("reconnects", 0),
            errors=dict(data.get("errors", {})),
        )


def _state(value: str | None) -> SourceState:
    try:
        return SourceState(value or SourceState.STARTING)
    except ValueError:
        return SourceState.STARTING


def health_key(settings: Settings, source: str) -> str:
    return settings.key("source", source)


def parse_health(raw: dict[bytes, bytes] | dict[str, str]) -> dict[str, Any]:
    data = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in raw.items()}  # fmt: skip
    errors: dict[str, int] = {}
    for part in filter(None, data.get("errors", "").split(",")):
        kind, _, count = part.partition("=")
        errors[kind] = int(count) if count.isdigit() else 0
    return {
        "name": data.get("name"),
        "kind": data.get("kind"),
        "state": data.get("state"),
        "last_message_at": data.get("last_message_at") or None,
        "last_error": data.get("last_error") or None,
        "last_error_kind": data.get("last_error_kind") or None,
        "last_error_at": data.get("last_error_at") or None,
        "backoff_seconds": float(data.get("backoff_seconds") or 0),
        "messages_total": int(data.get("messages_total") or 0),
        "rejected_total": int(data.get("rejected_total") or 0),
        "reconnects": int(data.get("reconnects") or 0),
        "messages_per_second": float(data.get("messages_per_second") or 0),
        "errors": errors,
    }


async def load_health(redis: Redis, key: str, *, name: str, kind: str) -> SourceHealth:
    return SourceHealth.from_redis(await redis.hgetall(key), name=name, kind=kind)


async def save_health(redis: Redis, key: str, health: SourceHealth) -> None:
    """Store ``health`` under ``key`` (see health_key); a Redis outage is logged, never raised: the source
    itself must keep going."""
    try:
        await redis.hset(key, mapping=health.as_redis())
    except Exception as exc:
        log.warning("health_not_saved", source=health.name, error=str(exc))
