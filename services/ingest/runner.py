"""The polling runner: one source's loop of open, poll, publish, with backoff on failure. It knows no exchange;
the websocket runner (services/ingest/ws.py) shares its error log and health reporting (``Reporting``)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import UTC, datetime
from typing import Any, Protocol

import structlog
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.ingest import repository
from services.ingest.metrics import IngestMetrics
from services.ingest.publishing import TickPublisher
from services.ingest.rest import CcxtRestSource
from services.ingest.sim import SimSource
from services.ingest.sources import Source, SourceError
from shared.backoff import jittered_backoff
from shared.settings import Settings
from shared.source_health import SourceHealth, SourceState, health_key, save_health
from shared.streams import StreamPublisher

log = structlog.get_logger("ingest")

MAX_BACKOFF_SECONDS = 300.0
# HTTP 418 is an IP ban (Binance: 2 minutes to 3 days); without a Retry-After, wait at least this long.
BAN_BACKOFF_SECONDS = 120.0
# Failures after which the markets may have failed to load or changed: the source is reopened.
REOPEN_KINDS = frozenset({"network", "timeout", "unavailable", "no_markets", "bad_response"})
FAILURE_STATES = {"rate_limited": SourceState.RATE_LIMITED, "banned": SourceState.BANNED}


def build_source(
    name: str, *, rest_url: str | None, timeout_seconds: float, sim_seed: int | None, sim_interval: float
) -> Source:
    if name == "sim":
        return SimSource(name, seed=sim_seed, interval_seconds=sim_interval)
    return CcxtRestSource(name, rest_url=rest_url, timeout_seconds=timeout_seconds)


class Reporting:
    """What a runner reports about its source: failures to the error log (Postgres, one transaction each), its
    health hash (Redis), and whether it is connected (the system log's source_connected / source_disconnected /
    source_error events and the ``ingest_source_up`` gauge)."""

    def __init__(
        self,
        name: str,
        *,
        redis: Redis,
        sessions: async_sessionmaker[AsyncSession],
        health: SourceHealth,
        key: str,
        metrics: IngestMetrics | None = None,
    ) -> None:
        self.reported_name = name
        self.redis = redis
        self.sessions = sessions
        self.health = health
        self.health_key = key
        self.metrics = metrics
        self.link_up = False
        self.link_kind = ""  # the kind the last source_connected said, for the disconnect that closes it
        self._set_up_gauge(0)

    def _set_up_gauge(self, value: int) -> None:
        if self.metrics is not None:
            self.metrics.source_up.labels(self.reported_name).set(value)

    def _link_connected(self, kind: str, **fields: Any) -> None:
        """The source delivers: logged once per change from not delivering."""
        if not self.link_up:
            self.link_up = True
            self.link_kind = kind
            log.info("source_connected", source=self.reported_name, kind=kind, **fields)
        self._set_up_gauge(1)

    def _link_failed(self, kind: str, reason: str, **fields: Any) -> None:
        """A failure: the first after the source delivered is its disconnection, the others are errors."""
        event = "source_disconnected" if self.link_up else "source_error"
        self.link_up = False
        log.warning(event, source=self.reported_name, kind=kind, reason=reason, **fields)
        self._set_up_gauge(0)

    def _link_closed(self) -> None:
        """Stopped on purpose (switched off, shutting down): not delivering, and not a failure. A link that was
        up says it closed (reason "stopped"), so the report's uptime ends here rather than at the next start."""
        if self.link_up:
            log.info("source_disconnected", source=self.reported_name, kind=self.link_kind, reason="stopped")
        self.link_up = False
        self._set_up_gauge(0)

    def _count(self, kind: str, n: int = 1) -> None:
        self.health.count(kind, n)

    async def _record_error(self, kind: str, message: str) -> None:
        await repository.log_source_error(self.sessions, source=self.reported_name, kind=kind, message=message)

    async def _store_health(self) -> None:
        await save_health(self.redis, self.health_key, self.health)


class SourceRunner(Reporting):
    """One source's loop: open, poll on an interval, back off with jitter on failure, never crash."""

    def __init__(
        self,
        source: Source,
        *,
        settings: Settings,
        redis: Redis,
        publisher: StreamPublisher,
        sessions: async_sessionmaker[AsyncSession],
        metrics: IngestMetrics | None = None,
    ) -> None:
        super().__init__(
            source.name,
            redis=redis,
            sessions=sessions,
            health=SourceHealth(name=source.name, kind=source.kind),
            key=health_key(settings, source.name),
            metrics=metrics,
        )
        self.source = source
        self.settings = settings
        self.publisher = publisher
        # Each tick goes to its coin's pricing shard's stream (docs/scaling.md).
        self.ticks = TickPublisher(publisher, source.name, metrics=metrics, shards=settings.pricing_shards)
        self.opened = False
        self.failures = 0
        # The tracked coins this source quotes; IngestService follows the coins table and updates them.
        self.coins: list[str] = list(settings.coins)

    def set_coins(self, coins: list[str]) -> None:
        """Track a new coin list: the source is re-opened (symbols re-selected) before its next poll."""
        if coins != self.coins:
            self.coins = list(coins)
            self.opened = False

    @property
    def interval(self) -> float:
        if self.source.kind == "sim":
            return self.settings.sim_interval_seconds
        return self.settings.poll_interval_seconds

    async def run(self, stop: asyncio.Event) -> None:
        await self._store_health()
        try:
            while not stop.is_set():
                delay = await self.run_once()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=delay)
        finally:
            # Also when the supervisor is about to restart us: the next run opens the source afresh.
            self.opened = False
            self._link_closed()
            await self.source.close()

    async def run_once(self) -> float:
        """One poll (opening the source first if needed); returns how long to wait before the next."""
        try:
            if not self.opened:
                coins = self.coins
                await self.source.open(coins)
                # A coin change while opening means this open is already out of date: open again next time.
                self.opened = coins == self.coins
                log.info(
                    "source_opened",
                    source=self.source.name,
                    kind=self.source.kind,
                    coins=self.coins,
                    symbols=getattr(self.source, "symbols", None),
                )
            ticks, rejected = await self.source.poll()
        except SourceError as exc:
            return await self._failed(exc.kind, str(exc), exc.retry_after)
        except Exception as exc:  # a source must never take the service down
            log.exception("source_unexpected_error", source=self.source.name)
            return await self._failed("unexpected", f"{type(exc).__name__}: {exc}", None)
        published = await self.ticks.publish(ticks)
        if published is None:
            # Redis, not the exchange, is the problem: keep the source open and its backoff as it is, hold
            # the ticks, and try again at the normal pace (the held ones go first).
            self.health.state = SourceState.PUBLISH_FAILED
            self._count("publish_failed")
            return self.interval
        by_kind: dict[str, list[Any]] = {}
        for item in rejected:
            kind = getattr(item, "kind", "rejected_quote")
            log.warning("quote_rejected", source=self.source.name, pair=item.pair, kind=kind, reason=item.reason)
            by_kind.setdefault(kind, []).append(item)
        for kind, items in by_kind.items():
            self._count(kind, len(items))
            await self._record_error(kind, f"{len(items)} quote(s) rejected: "
                                     + "; ".join(f"{r.pair}: {r.reason}" for r in items[:5]))  # fmt: skip
        now = datetime.now(UTC).isoformat()
        self.failures = 0
        self._link_connected(self.source.kind)
        self.health.connected()
        self.health.last_message_at = now if ticks else self.health.last_message_at
        self.health.messages_total += published
        self.health.rejected_total += len(rejected)
        self.health.rate_window.append((time.monotonic(), published))
        await self._store_health()
        return self.interval

    async def _failed(self, kind: str, message: str, retry_after: float | None) -> float:
        self.failures += 1
        # Never sooner than the normal pace; the first retry already waits up to two intervals. An exchange's
        # Retry-After is a floor.
        delay = jittered_backoff(self.failures, base=2 * self.interval, cap=MAX_BACKOFF_SECONDS, floor=self.interval)
        if kind == "banned":
            delay = max(delay, jittered_backoff(1, base=2 * BAN_BACKOFF_SECONDS, cap=2 * BAN_BACKOFF_SECONDS,
                                                jitter="equal"))  # fmt: skip
        if retry_after is not None:
            delay = max(delay, retry_after)
        self.health.failed(kind, message, state=FAILURE_STATES.get(kind, SourceState.DOWN), backoff_seconds=delay)
        if kind in REOPEN_KINDS or kind == "unexpected":
            self.opened = False
        self._link_failed(self.source.kind, message, error_kind=kind, retry_in=round(delay, 2))
        await self._record_error(kind, message)
        await self._store_health()
        return delay


class Switchable(Protocol):
    """What SourceSwitch needs of a runner (SourceRunner and WebsocketRunner alike)."""

    health: SourceHealth
    failures: int

    async def run(self, stop: asyncio.Event) -> None: ...

    async def _store_health(self) -> None: ...


async def _either(first: asyncio.Event, second: asyncio.Event) -> None:
    waits = {asyncio.create_task(first.wait()), asyncio.create_task(second.wait())}
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


class SourceSwitch:
    """An administrator's on/off for one source, and the supervised task that obeys it: while on, the runner's
    own loop; while off, the loop is stopped (its source closed) and the health says ``disabled``. Switching
    takes effect at once, without a restart of the service or of the supervised task."""

    def __init__(self, runner: Switchable, *, enabled: bool = True) -> None:
        self.runner = runner
        self.name = runner.health.name
        self._on = asyncio.Event()
        self._off = asyncio.Event()
        # What the loop is doing now, for callers that wait until a switch has taken effect.
        self.parked = asyncio.Event()
        self.running = asyncio.Event()
        self.changed_at: datetime | None = None
        self.changed_by: str | None = None
        self.set(enabled)

    @property
    def enabled(self) -> bool:
        return self._on.is_set()

    def set(self, enabled: bool, *, changed_at: datetime | None = None, changed_by: str | None = None) -> None:
        (self._off if enabled else self._on).clear()
        (self._on if enabled else self._off).set()
        if changed_at is not None:
            self.changed_at, self.changed_by = changed_at, changed_by

    async def settled(self) -> None:
        """Returns once the loop does what the switch says (stopped and parked, or started)."""
        await (self.running if self.enabled else self.parked).wait()

    async def run(self, stop: asyncio.Event) -> None:
        runner = self.runner
        try:
            while not stop.is_set():
                if not self.enabled:
                    await self._park()
                    await _either(stop, self._on)
                    continue
                self.parked.clear()
                # A fresh start: an outage from before it was switched off is no reason to wait now.
                runner.failures = 0
                runner.health.state = SourceState.STARTING
                runner.health.backoff_seconds = 0.0
                await runner._store_health()
                halt = asyncio.Event()
                relay = asyncio.create_task(self._halt_on(stop, halt))
                self.running.set()
                try:
                    await runner.run(halt)
                finally:
                    self.running.clear()
                    relay.cancel()
                if not halt.is_set() and not stop.is_set():
                    # Left to the supervisor, which logs it and restarts us with a backoff.
                    raise RuntimeError(f"the {self.name} runner returned while it was switched on")
        finally:
            self.running.clear()
            self.parked.clear()

    async def _halt_on(self, stop: asyncio.Event, halt: asyncio.Event) -> None:
        await _either(stop, self._off)
        halt.set()

    async def _park(self) -> None:
        health = self.runner.health
        health.state = SourceState.DISABLED
        health.backoff_seconds = 0.0
        # No rate from before it stopped: messages_per_second says 0 while nothing arrives.
        health.rate_window.clear()
        await self.runner._store_health()
        log.info("source_parked", source=self.name, changed_by=self.changed_by)
        self.parked.set()
