"""Runs every enabled source: polls, publishes normalised ticks, keeps per-source health in Redis."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.ingest import repository
from services.ingest.adapters import Source, SourceError, build_source
from services.ingest.publishing import TickPublisher
from services.ingest.websocket import WebsocketRunner, build_ws_source
from shared.db import transaction
from shared.settings import Settings
from shared.streams import StreamPublisher
from shared.supervisor import Supervisor

log = structlog.get_logger("ingest")

# Sources named in COINLYTICS_SOURCES that are not exchanges polled for tickers here.
NON_EXCHANGE_SOURCES = {"coingecko": "market caps (scheduled job)", "ecb": "fiat reference rates (conversion job)"}
MAX_BACKOFF_SECONDS = 300.0
# HTTP 418 is an IP ban (Binance: 2 minutes to 3 days); without a Retry-After, wait at least this long.
BAN_BACKOFF_SECONDS = 120.0


@dataclass
class SourceHealth:
    name: str
    kind: str
    state: str = "starting"
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
            "state": self.state,
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


def health_key(settings: Settings, source: str) -> str:
    return settings.key("source", source)


def parse_health(raw: dict[bytes, bytes] | dict[str, str]) -> dict[str, Any]:
    data = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in raw.items()}  # fmt: skip
    errors: dict[str, int] = {}
    for part in filter(None, data.get("errors", "").split(",")):
        kind, _, count = part.partition("=")
        errors[kind] = int(count or 0)
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


class SourceRunner:
    """One source's loop: open, poll on an interval, back off with jitter on failure, never crash."""

    def __init__(
        self,
        source: Source,
        *,
        settings: Settings,
        redis: Redis,
        publisher: StreamPublisher,
        sessions: async_sessionmaker[AsyncSession],
    ) -> None:
        self.source = source
        self.settings = settings
        self.redis = redis
        self.publisher = publisher
        self.sessions = sessions
        self.health = SourceHealth(name=source.name, kind=source.kind)
        self.ticks = TickPublisher(publisher, source.name)
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
        await self._save_health()
        try:
            while not stop.is_set():
                delay = await self.run_once()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=delay)
        finally:
            # Also when the supervisor is about to restart us: the next run opens the source afresh.
            self.opened = False
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
            self.health.state = "publish_failed"
            self.health.errors["publish_failed"] = self.health.errors.get("publish_failed", 0) + 1
            return self.interval
        by_kind: dict[str, list[Any]] = {}
        for item in rejected:
            kind = getattr(item, "kind", "rejected_quote")
            log.warning("quote_rejected", source=self.source.name, pair=item.pair, kind=kind, reason=item.reason)
            by_kind.setdefault(kind, []).append(item)
        for kind, items in by_kind.items():
            self.health.errors[kind] = self.health.errors.get(kind, 0) + len(items)
            await self._record_error(kind, f"{len(items)} quote(s) rejected: "
                                     + "; ".join(f"{r.pair}: {r.reason}" for r in items[:5]))  # fmt: skip
        now = datetime.now(UTC).isoformat()
        self.failures = 0
        self.health.state = "connected"
        self.health.backoff_seconds = 0.0
        self.health.last_message_at = now if ticks else self.health.last_message_at
        self.health.messages_total += published
        self.health.rejected_total += len(rejected)
        self.health.rate_window.append((time.monotonic(), published))
        await self._save_health()
        return self.interval

    async def _failed(self, kind: str, message: str, retry_after: float | None) -> float:
        self.failures += 1
        # Capped exponential backoff with full jitter; an exchange's Retry-After is a floor.
        ceiling = min(MAX_BACKOFF_SECONDS, self.interval * (2 ** min(self.failures, 10)))
        delay = random.uniform(self.interval, max(self.interval, ceiling))
        if kind == "banned":
            delay = max(delay, random.uniform(BAN_BACKOFF_SECONDS, 2 * BAN_BACKOFF_SECONDS))
        if retry_after is not None:
            delay = max(delay, retry_after)
        self.health.state = {"rate_limited": "rate_limited", "banned": "banned"}.get(kind, "down")
        self.health.backoff_seconds = delay
        self.health.errors[kind] = self.health.errors.get(kind, 0) + 1
        self.health.last_error = message
        self.health.last_error_kind = kind
        self.health.last_error_at = datetime.now(UTC).isoformat()
        if kind in ("network", "timeout", "unavailable", "no_markets", "bad_response", "unexpected"):
            # Markets may have failed to load or changed: reopen on the next attempt.
            self.opened = False
        log.warning("source_failed", source=self.source.name, kind=kind, reason=message, retry_in=round(delay, 2))
        await self._record_error(kind, message)
        await self._save_health()
        return delay

    async def _record_error(self, kind: str, message: str) -> None:
        await repository.log_source_error(self.sessions, source=self.source.name, kind=kind, message=message)

    async def _save_health(self) -> None:
        try:
            await self.redis.hset(health_key(self.settings, self.source.name), mapping=self.health.as_redis())
        except Exception as exc:
            log.warning("health_not_saved", source=self.source.name, error=str(exc))


class IngestService:
    def __init__(
        self,
        settings: Settings,
        *,
        redis: Redis,
        publisher: StreamPublisher,
        sessions: async_sessionmaker[AsyncSession],
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.publisher = publisher
        self.sessions = sessions
        self.runners: list[SourceRunner | WebsocketRunner] = []
        self.skipped: dict[str, str] = {}
        self.coins: list[str] = list(settings.coins)

    def build_runners(self) -> None:
        for name in self.settings.sources:
            if name in NON_EXCHANGE_SOURCES:
                if name not in ("coingecko", "ecb"):  # their jobs (ingest/coingecko, conversion) report own health
                    self.skipped[name] = f"not polled by ingest: {NON_EXCHANGE_SOURCES[name]}; not implemented yet"
                continue
            ws_source = build_ws_source(self.settings, name)
            if ws_source is not None:
                # Websocket first; the runner polls REST itself while the socket is down.
                self.runners.append(
                    WebsocketRunner(
                        ws_source,
                        settings=self.settings,
                        redis=self.redis,
                        publisher=self.publisher,
                        sessions=self.sessions,
                        health=SourceHealth(name=name, kind=ws_source.kind),
                        health_key=health_key(self.settings, name),
                    )
                )
                continue
            try:
                source = build_source(
                    name,
                    rest_url=self.settings.source_url(name, "rest"),
                    timeout_seconds=self.settings.source_timeout_seconds,
                    sim_seed=self.settings.sim_seed,
                    sim_interval=self.settings.sim_interval_seconds,
                )
            except ValueError as exc:
                self.skipped[name] = str(exc)
                log.error("source_not_started", source=name, reason=str(exc))
                continue
            self.runners.append(
                SourceRunner(
                    source,
                    settings=self.settings,
                    redis=self.redis,
                    publisher=self.publisher,
                    sessions=self.sessions,
                )
            )

    async def start(self, supervisor: Supervisor) -> None:
        self.build_runners()
        await self._seed_coins()
        self.coins = await self._active_coins() or self.coins
        for runner in self.runners:
            runner.set_coins(self.coins)
        for name, reason in self.skipped.items():
            await self.redis.hset(
                health_key(self.settings, name),
                mapping={"name": name, "kind": "none", "state": "disabled", "last_error": reason},
            )
        log.info(
            "ingest_sources",
            running=[r.source.name for r in self.runners],
            skipped=self.skipped,
            coins=self.settings.coins,
        )
        if any(r.source.kind == "sim" for r in self.runners):
            log.warning("sim_source_enabled", note="prices come from the offline simulator, not markets")
        for runner in self.runners:
            supervisor.start(f"source:{runner.source.name}", runner.run)
        supervisor.start("ingest:coins", self._follow_coins)

    async def _seed_coins(self) -> None:
        # Pricing seeds too; doing it here as well lets ingest run alone. Existing rows (and their
        # active flag, which admins own) are left as they are.
        try:
            async with transaction(self.sessions) as session:
                await repository.seed_coins(session, self.settings.coins)
        except Exception as exc:
            log.warning("coins_not_seeded", error=str(exc))

    async def _active_coins(self) -> list[str] | None:
        try:
            async with transaction(self.sessions) as session:
                return await repository.active_coins(session)
        except Exception as exc:
            log.warning("coins_not_read", error=str(exc))
            return None

    async def _follow_coins(self, stop: asyncio.Event) -> None:
        """Re-reads the tracked coins every ``coins_refresh_seconds``; sources re-select their symbols on change."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.settings.coins_refresh_seconds)
            if stop.is_set():
                return
            coins = await self._active_coins()
            if coins is None or coins == self.coins:
                continue
            added = [c for c in coins if c not in self.coins]
            removed = [c for c in self.coins if c not in coins]
            log.info("tracked_coins_changed", added=added, removed=removed, coins=coins)
            self.coins = coins
            for runner in self.runners:
                runner.set_coins(coins)

    async def health(self) -> list[dict[str, Any]]:
        names = list(dict.fromkeys([*self.settings.sources, *(r.source.name for r in self.runners)]))
        result = []
        for name in names:
            raw = await self.redis.hgetall(health_key(self.settings, name))
            if raw:
                result.append(parse_health(raw))
        return result
