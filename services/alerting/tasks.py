"""Scheduled jobs of the alerting service (arq, run in its lifespan): deleting alerts that expired more
than a day ago. Idempotent: a repeated run finds nothing more to delete."""

from __future__ import annotations

from typing import Any

import structlog
from arq.cron import cron

from services.alerting.service import AlertService

log = structlog.get_logger("alerting")


async def delete_expired_alerts(ctx: dict[str, Any]) -> dict[str, int]:
    service: AlertService = ctx["alerts"]
    deleted = await service.delete_expired()
    log.info("expired_alerts_deleted", deleted=deleted)
    return {"alerts": deleted}


FUNCTIONS = [delete_expired_alerts]
# Hourly; an expired alert stops firing at once (the engine checks expires_at), this only tidies up.
CRON_JOBS = [cron(delete_expired_alerts, minute=17, run_at_startup=True, unique=True)]
