"""Scheduled history jobs (arq cron, run by the pricing service's worker): roll-ups and retention (of the
history and of the platform's other append-only tables).

Both are idempotent: a repeated or overlapping run rewrites nothing that is already right."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import structlog
from arq.cron import CronJob, cron
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.pricing.history.service import enforce_retention, roll_up
from shared.settings import Settings

log = structlog.get_logger("history")

CTX_KEY = "history"


class HistoryJobs:
    """What the jobs need, kept in the worker's ctx under ``history``."""

    def __init__(self, settings: Settings, sessions: async_sessionmaker[AsyncSession]) -> None:
        self.settings = settings
        self.sessions = sessions


def job_context(settings: Settings, sessions: async_sessionmaker[AsyncSession]) -> dict[str, Any]:
    return {CTX_KEY: HistoryJobs(settings, sessions)}


async def history_rollup(ctx: dict[str, Any]) -> dict[str, int]:
    jobs: HistoryJobs = ctx[CTX_KEY]
    written = await roll_up(jobs.sessions, datetime.now(UTC))
    log.info("history_rollup", written=written)
    return written


async def history_retention(ctx: dict[str, Any]) -> dict[str, int]:
    jobs: HistoryJobs = ctx[CTX_KEY]
    now = datetime.now(UTC)
    deleted = await enforce_retention(
        jobs.sessions,
        now,
        ticks_hours=jobs.settings.retention_ticks_hours,
        candles_1m_days=jobs.settings.retention_candles_1m_days,
    )
    log.info("history_retention", deleted=deleted)
    return deleted


def cron_jobs() -> list[CronJob]:
    return [
        # A few seconds past each 5 minutes: the minute just closed is complete by then.
        cron(history_rollup, name="history_rollup", minute=set(range(0, 60, 5)), second=20, timeout=600),
        cron(history_retention, name="history_retention", minute=17, second=0, timeout=3600),
    ]
