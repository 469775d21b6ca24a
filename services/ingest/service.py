"""Runs every enabled source: polls, publishes normalised ticks, keeps per-source health in Redis."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime
from typing import Any

import structlog
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.ingest import repository
from services.ingest.metrics import IngestMetrics
from services.ingest.runner import SourceRunner, SourceSwitch, build_source
from services.ingest.ws import WebsocketRunner, build_ws_source
from services.pricing.coins.repository import active_coins, coins_seeded
from shared.db import transaction
from shared.errors import Conflict, NotFound
from shared.models import ErrorLog
from shared.settings import Settings
from shared.source_health import SourceHealth, SourceState, health_key, parse_health, save_health
from shared.streams import StreamPublisher
from shared.supervisor import Supervisor

log = structlog.get_logger("ingest")

# Sources named in COINLYTICS_SOURCES that are not exchanges polled for tickers here: their jobs
# (services/ingest/coingecko, conversion's ECB job) report their own health.
NON_EXCHANGE_SOURCES = {"coingecko": "market caps (scheduled job)", "ecb": "fiat reference rates (conversion job)"}
# How long a switch waits for the loop to stop (a poll in flight ends first) or start before answering: well
# inside the gateway's upstream timeout. Past it the answer shows the state as it then is.
SWITCH_SETTLE_SECONDS = 5.0


class IngestService:
    def __init__(
        self,
        settings: Settings,
        *,
        redis: Redis,
        publisher: StreamPublisher,
        sessions: async_sessionmaker[AsyncSession],
        metrics: IngestMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.publisher = publisher
        self.sessions = sessions
        self.metrics = metrics
        self.runners: list[SourceRunner | WebsocketRunner] = []
        self.skipped: dict[str, str] = {}
        self.coins: list[str] = list(settings.coins)
        # The administrators' on/off per running source (source_settings), applied without a restart.
        self.switches: dict[str, SourceSwitch] = {}

    def build_runners(self) -> None:
        for name in self.settings.sources:
            if name in NON_EXCHANGE_SOURCES:
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
                        metrics=self.metrics,
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
                    metrics=self.metrics,
                )
            )

    async def start(self, supervisor: Supervisor) -> None:
        self.build_runners()
        self.coins = await self._active_coins() or self.coins
        for runner in self.runners:
            runner.set_coins(self.coins)
        for name, reason in self.skipped.items():
            disabled = SourceHealth(name=name, kind="none", state=SourceState.DISABLED, last_error=reason)
            await save_health(self.redis, health_key(self.settings, name), disabled)
        log.info(
            "ingest_sources",
            running=[r.source.name for r in self.runners],
            skipped=self.skipped,
            coins=self.settings.coins,
        )
        if any(r.source.kind == "sim" for r in self.runners):
            log.warning("sim_source_enabled", note="prices come from the offline simulator, not markets")
        self.switches = {r.source.name: SourceSwitch(r) for r in self.runners}
        await self._apply_switches()
        off = [name for name, switch in self.switches.items() if not switch.enabled]
        if off:
            log.warning("sources_switched_off", sources=off, note="an administrator disabled them")
        for name, switch in self.switches.items():
            supervisor.start(f"source:{name}", switch.run)
        supervisor.start("ingest:coins", self._follow_coins)
        supervisor.start("ingest:source-switches", self._follow_switches)

    async def _active_coins(self) -> list[str] | None:
        """The tracked coins from pricing's table (pricing owns it and seeds it at its start); None while
        it is unreadable or not seeded yet, and the configured coins stay tracked meanwhile."""
        try:
            async with transaction(self.sessions) as session:
                if not await coins_seeded(session):
                    return None
                return await active_coins(session)
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

    async def _apply_switches(self) -> bool:
        """Reads the administrators' switches and applies those changed since this process last saw them;
        False while the database is unreadable (the sources keep their current state meanwhile)."""
        try:
            async with transaction(self.sessions) as session:
                rows = await repository.source_settings(session)
        except Exception as exc:
            log.warning("source_switches_not_read", error=str(exc))
            return False
        for name, row in rows.items():
            switch = self.switches.get(name)
            if switch is None or (switch.changed_at is not None and row.changed_at <= switch.changed_at):
                continue
            if switch.enabled != row.enabled:
                log.info("source_switched", source=name, enabled=row.enabled, changed_by=row.changed_by)
            switch.set(row.enabled, changed_at=row.changed_at, changed_by=row.changed_by)
        return True

    async def _follow_switches(self, stop: asyncio.Event) -> None:
        """Re-reads the switches every ``coins_refresh_seconds``: a switch made while the database was away at
        start, or through another ingest process, still takes effect."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.settings.coins_refresh_seconds)
            if not stop.is_set():
                await self._apply_switches()

    def _switch(self, name: str) -> SourceSwitch:
        switch = self.switches.get(name)
        if switch is not None:
            return switch
        if name in self.skipped:
            raise Conflict(f"{name} is not running ({self.skipped[name]}): fix its configuration and restart ingest")
        if name in NON_EXCHANGE_SOURCES:
            raise Conflict(f"{name} is a scheduled job ({NON_EXCHANGE_SOURCES[name]}), not a source ingest runs")
        known = ", ".join(sorted(self.switches)) or "none"
        raise NotFound(f"no source named {name!r} runs here (running: {known})")

    async def set_enabled(self, name: str, enabled: bool, *, changed_by: str | None) -> dict[str, Any]:
        """Switches a source on or off: stored first (so it holds across restarts), then applied; answers once
        the loop has stopped or started (or after SWITCH_SETTLE_SECONDS, with the health as it then is)."""
        switch = self._switch(name)
        async with transaction(self.sessions) as session:
            row = await repository.set_source_enabled(
                session, name, enabled=enabled, changed_by=changed_by, at=datetime.now(UTC)
            )
        was = switch.enabled
        switch.set(row.enabled, changed_at=row.changed_at, changed_by=row.changed_by)
        log.info("source_switched", source=name, enabled=enabled, was=was, changed_by=changed_by)
        try:
            # A poll in flight finishes first: normally no tick of a disabled source arrives after the answer.
            async with asyncio.timeout(SWITCH_SETTLE_SECONDS):
                await switch.settled()
        except TimeoutError:
            log.warning("source_switch_pending", source=name, enabled=enabled)
        # The runner's own copy (the Redis hash is written from it): a Redis outage now cannot make a switch that
        # is stored and applied look failed.
        return self._with_switch(parse_health(switch.runner.health.as_redis()))

    def _with_switch(self, health: dict[str, Any]) -> dict[str, Any]:
        switch = self.switches.get(str(health.get("name")))
        if switch is None:
            return {**health, "enabled": True, "switchable": False}
        return {
            **health,
            "enabled": switch.enabled,
            "switchable": True,
            "enabled_changed_at": switch.changed_at,
            "enabled_changed_by": switch.changed_by,
        }

    async def health(self) -> list[dict[str, Any]]:
        names = list(dict.fromkeys([*self.settings.sources, *(r.source.name for r in self.runners)]))
        result = []
        for name in names:
            raw = await self.redis.hgetall(health_key(self.settings, name))
            if not raw and name in self.switches:
                # A parked source writes its hash once; after Redis lost it (a restart without persistence),
                # the runner's own copy still tells the truth.
                raw = self.switches[name].runner.health.as_redis()
            if raw:
                result.append(self._with_switch(parse_health(raw)))
        return result

    async def errors(
        self, *, source: str | None, since: datetime | None, limit: int
    ) -> tuple[list[ErrorLog], dict[str, int]]:
        """The newest error-log entries (optionally of one source, since a time) and the counts per source."""
        async with transaction(self.sessions) as session:
            return await repository.list_errors(session, source=source, since=since, limit=limit)
