"""Scheduled jobs of the conversion service (arq, run in its lifespan): the ECB reference rates (or, in
the offline demo, simulated ones) and the periodic rate snapshot. Both are idempotent, so a retry or a
repeated cron run changes nothing."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import structlog
from arq.cron import cron
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.conversion import repository
from services.conversion.ecb import (
    DAILY_FILE,
    DEFAULT_ECB_URL,
    HISTORY_FILE,
    EcbError,
    EcbRates,
    fetch,
    last_publication_day,
)
from services.conversion.service import ConversionService
from services.conversion.simfiat import SIM_FIAT_SOURCE, next_rates
from shared.db import transaction
from shared.jobs import retention_job
from shared.settings import Settings
from shared.source_health import SourceState, health_key, load_health, save_health
from shared.streams import SOURCE_ERRORS_STREAM, StreamPublisher
from shared.timeparse import iso_z

log = structlog.get_logger("conversion")

SOURCE = "ecb"
# Rates are stale for startup purposes when the newest stored day is older than this (a long weekend
# plus a holiday is 4 days; the job then runs at once instead of waiting for the next cron slot).
STARTUP_STALE_AFTER = timedelta(days=3)
HISTORY_MIN_DAYS = 30  # fewer stored working days in the last 90 means the history file is fetched too


def fiat_source(settings: Settings) -> str | None:
    """Where fiat rates come from: the ECB when it is a source, else simulated ones when ``sim`` is (the
    offline demo would otherwise have no fiat at all), else nowhere."""
    if SOURCE in settings.sources:
        return SOURCE
    if "sim" in settings.sources:
        return SIM_FIAT_SOURCE
    return None


async def refresh_fiat_rates(
    settings: Settings, sessions: async_sessionmaker[AsyncSession], redis: Redis, service: ConversionService
) -> dict[str, Any]:
    if fiat_source(settings) == SIM_FIAT_SOURCE:
        return await refresh_sim_fiat_rates(settings, sessions, service)
    return await refresh_ecb_rates(settings, sessions, redis, service)


async def refresh_sim_fiat_rates(
    settings: Settings, sessions: async_sessionmaker[AsyncSession], service: ConversionService
) -> dict[str, Any]:
    """One random-walk step of the simulated rates, stored as the day the ECB would have published last."""
    fetched_at = datetime.now(UTC)
    # A fixed sim seed makes runs repeatable; the time keeps successive steps from being identical.
    seed = None if settings.sim_seed is None else f"{settings.sim_seed}:{fetched_at.isoformat()}"
    async with transaction(sessions) as session:
        _, _, previous = await repository.latest_fiat(session)
        rates = next_rates(previous, random.Random(seed))
        stored = await repository.upsert_fiat_rates(
            session, {last_publication_day(fetched_at): rates}, fetched_at, source=SIM_FIAT_SOURCE
        )
        day, confirmed_at, latest = await repository.latest_fiat(session)
        source = None if day is None else await repository.fiat_day_source(session, day)
    if day is not None:
        await service.set_fiat(day, confirmed_at or fetched_at, latest, source=source)
    log.info("sim_fiat_rates_stored", source=SIM_FIAT_SOURCE, simulated=True, rates=stored, latest_day=str(day))
    return {"stored": stored, "latest_day": str(day), "source": SIM_FIAT_SOURCE, "simulated": True}


def ecb_url(settings: Settings) -> str:
    return settings.source_url(SOURCE, "rest") or DEFAULT_ECB_URL


async def write_health(redis: Redis, settings: Settings, *, ok: bool, stored: int = 0, rejected: int = 0,
                       kind: str = "", message: str = "") -> None:  # fmt: skip
    """The ECB's entry in source health (shared/source_health.py, the codec every source writer uses), for
    /api/v1/admin/sources: counters accumulate across runs, so the stored entry is read and updated."""
    key = health_key(settings, SOURCE)
    health = await load_health(redis, key, name=SOURCE, kind="rest")
    if ok:
        health.connected()
        health.last_message_at = iso_z(datetime.now(UTC))
    else:
        health.failed(kind, message[:500], state=SourceState.ERROR, backoff_seconds=0.0)
    health.messages_total += stored
    health.rejected_total += rejected
    await save_health(redis, key, health)


async def refresh_ecb_rates(
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    redis: Redis,
    service: ConversionService,
    *,
    force_history: bool = False,
) -> dict[str, Any]:
    """Fetches the daily file (and the 90-day file when history is missing), stores every rate, and puts
    the latest day into the cached rate table. Failures are logged, stored and reported in source health;
    stored rates stay in use."""
    if SOURCE not in settings.sources:
        return {"skipped": "ecb is not in COINLYTICS_SOURCES"}
    base = ecb_url(settings)
    fetched_at = datetime.now(UTC)
    try:
        async with httpx.AsyncClient(timeout=settings.source_timeout_seconds, follow_redirects=True) as client:
            got = await fetch(client, base, DAILY_FILE)
            async with transaction(sessions) as session:
                # Simulated days (a demo once ran on this database) don't make up for missing ECB history.
                state = await repository.fiat_state(session, source=SOURCE)
            if force_history or state.days_in_last_90 < HISTORY_MIN_DAYS:
                history = await fetch(client, base, HISTORY_FILE)
                got = merge(history, got)
    except EcbError as exc:
        await _failed(settings, sessions, redis, exc.kind, str(exc))
        return {"error": exc.kind, "message": str(exc)}
    async with transaction(sessions) as session:
        stored = await repository.upsert_fiat_rates(session, got.days, fetched_at)
        dropped = await repository.delete_simulated_fiat_rates(session)
        day, confirmed_at, latest = await repository.latest_fiat(session)
    if dropped:
        log.info("simulated_fiat_rates_dropped", count=dropped, reason="real ECB rates are stored")
    # After commit: the cache never shows rates the database does not hold.
    if day is not None:
        await service.set_fiat(day, confirmed_at or fetched_at, latest, source=SOURCE)
    await write_health(redis, settings, ok=True, stored=stored, rejected=got.rejected)
    log.info("ecb_rates_stored", source=SOURCE, rates=stored, days=len(got.days), latest_day=str(day),
             rejected=got.rejected)  # fmt: skip
    return {"stored": stored, "days": len(got.days), "latest_day": str(day), "rejected": got.rejected}


def merge(older: EcbRates, newer: EcbRates) -> EcbRates:
    days = dict(older.days)
    days.update(newer.days)
    return EcbRates(days=days, rejected=older.rejected + newer.rejected)


async def _failed(
    settings: Settings, sessions: async_sessionmaker[AsyncSession], redis: Redis, kind: str, message: str
) -> None:
    log.error("source_failed", source=SOURCE, kind=kind, reason=message)
    # Ingest owns the error log: the failure goes to it as a message, with an id that makes a redelivery
    # harmless.
    report = {"id": str(uuid.uuid4()), "source": SOURCE, "kind": kind, "message": message,
              "at": iso_z(datetime.now(UTC))}  # fmt: skip
    publisher = StreamPublisher(redis, namespace=settings.redis_namespace, maxlen=settings.stream_maxlen)
    try:
        await publisher.publish(SOURCE_ERRORS_STREAM, report)
    except Exception as exc:  # the error log is best effort; the health hash below still says what happened
        log.warning("error_log_unavailable", source=SOURCE, error=str(exc))
    await write_health(redis, settings, ok=False, kind=kind, message=message)


async def startup_refresh_needed(sessions: async_sessionmaker[AsyncSession], source: str = SOURCE) -> bool:
    """Whether ``source``'s own rates are missing or stale: rows of another source (the demo's simulated
    ones in a real run) don't count."""
    async with transaction(sessions) as session:
        state = await repository.fiat_state(session, source=source)
    if state.latest_day is None or state.fetched_at is None:
        return True
    return datetime.now(UTC) - state.fetched_at > STARTUP_STALE_AFTER


# --- arq entry points: ctx holds the service's objects (see app.py) ---------------------------------


async def ecb_job(ctx: dict[str, Any]) -> dict[str, Any]:
    return await refresh_fiat_rates(ctx["settings"], ctx["sessions"], ctx["redis"], ctx["service"])


async def snapshot_job(ctx: dict[str, Any]) -> dict[str, Any]:
    service: ConversionService = ctx["service"]
    # The periodic rebuild also picks up coins added by admins and anything a lost event left behind.
    await service.rebuild()
    snapshot_id = await service.take_snapshot(reason="periodic")
    return {"snapshot_id": snapshot_id}


snapshot_retention_job = retention_job(
    "rate_snapshots", repository.delete_snapshots_before, lambda s: s.retention_rate_snapshots_days
)

# ECB publishes around 16:00 CET on working days; hourly runs pick it up within the hour and retry a
# failed fetch, at one 1.6 KB request an hour.
CRON_JOBS = [
    cron(ecb_job, minute={7}, run_at_startup=False, unique=True, timeout=120),
    cron(snapshot_job, minute={0, 15, 30, 45}, run_at_startup=False, unique=True, timeout=120),
    cron(snapshot_retention_job, hour={3}, minute={27}, run_at_startup=False, unique=True, timeout=3600),
]
FUNCTIONS = [ecb_job, snapshot_job, snapshot_retention_job]
