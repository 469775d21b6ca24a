"""Scheduled jobs of the gateway itself (arq cron, run by its worker): the system log's retention."""

from __future__ import annotations

import asyncio
from typing import Any

import structlog
from arq.cron import CronJob, cron

from shared.settings import Settings
from shared.system_log import delete_expired

log = structlog.get_logger("gateway")


async def system_log_cleanup(ctx: dict[str, Any]) -> dict[str, int]:
    """Deletes the rotated system-log files older than ``system_log_retention_days``; the current file stays.
    Idempotent: a repeated run finds nothing more to delete."""
    settings: Settings = ctx["settings"]
    deleted = await asyncio.to_thread(delete_expired, settings.system_log_file(), settings.system_log_retention_days)
    log.info("system_log_cleaned", deleted=len(deleted), files=[path.name for path in deleted])
    return {"deleted": len(deleted)}


def cron_jobs() -> list[CronJob]:
    # Hourly: a rotated file outlives the retention by an hour at most.
    return [cron(system_log_cleanup, name="system_log_cleanup", minute={17}, timeout=600)]
