"""Jobs of the alerting service (arq, run in its lifespan).

- ``deliver_alert``: one attempt at delivering a stored alert event to one channel (its own queue and worker,
  see services/alerting/delivery.py); idempotent by event and channel.
- ``sweep_deliveries``: every minute, re-enqueues deliveries left unfinished with no job to finish them (a job
  lost with a Redis restart, or one never enqueued because the evaluator died right after the commit). The job
  id makes it a no-op for deliveries whose job still exists.
- ``delete_expired_alerts``: hourly, deletes alerts that expired more than a day ago.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from arq.cron import cron
from arq.worker import func

from services.alerting import repository
from services.alerting.delivery import DeliveryService
from services.alerting.evaluation import DELIVER_JOB, DELIVERY_QUEUE, enqueue_delivery
from services.alerting.service import AlertService
from shared.jobs import JobQueue
from shared.settings import Settings

log = structlog.get_logger("alerting")

# A delivery untouched this long while pending is presumed to have lost its job (an attempt takes at most 10 s).
SWEEP_UNTOUCHED = timedelta(minutes=2)
SWEEP_BATCH = 1000
# arq's own cap on runs of one job, above the schedule's attempts: cancellations of a stopping worker count too.
DELIVERY_MAX_TRIES = 50
# Each attempt is bounded by its channel's timeout (10 s); a job running past this is cut and run again.
DELIVERY_JOB_TIMEOUT = 30


async def deliver_alert(ctx: dict[str, Any], event_id: str, channel_index: int) -> str:
    delivery: DeliveryService = ctx["delivery"]
    return await delivery.deliver(uuid.UUID(event_id), int(channel_index))


async def sweep_deliveries(ctx: dict[str, Any]) -> dict[str, int]:
    settings: Settings = ctx["settings"]
    jobs: JobQueue = ctx["jobs"]
    now = datetime.now(UTC)
    async with ctx["sessions"]() as session:
        stalled = await repository.unfinished_deliveries(session, now - SWEEP_UNTOUCHED, now, SWEEP_BATCH)
    queued = 0
    for event_id, index, _next_at in stalled:
        queued += await enqueue_delivery(jobs, event_id, index)
    if queued:
        log.warning(
            "alert_deliveries_requeued", count=queued, examined=len(stalled), queue=settings.key("arq", DELIVERY_QUEUE)
        )
    return {"requeued": queued}


async def delete_expired_alerts(ctx: dict[str, Any]) -> dict[str, int]:
    service: AlertService = ctx["alerts"]
    deleted = await service.delete_expired()
    log.info("expired_alerts_deleted", deleted=deleted)
    return {"alerts": deleted}


FUNCTIONS = [delete_expired_alerts, sweep_deliveries]
# Hourly; an expired alert stops firing at once (the engine checks expires_at), this only tidies up.
CRON_JOBS = [
    cron(delete_expired_alerts, minute=17, run_at_startup=True, unique=True),
    cron(sweep_deliveries, second=7, run_at_startup=True, unique=True),
]
DELIVERY_FUNCTIONS = [func(deliver_alert, name=DELIVER_JOB, max_tries=DELIVERY_MAX_TRIES, timeout=DELIVERY_JOB_TIMEOUT)]
