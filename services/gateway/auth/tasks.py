"""Scheduled jobs of the accounts area (arq cron, run by the gateway's worker): expiring the activity log
the gateway owns."""

from __future__ import annotations

from arq.cron import CronJob, cron

from services.gateway.auth import repository
from shared.jobs import retention_job

activity_retention = retention_job(
    "user_activity", repository.delete_activity_before, lambda s: s.retention_user_activity_days
)


def cron_jobs() -> list[CronJob]:
    return [cron(activity_retention, name="user_activity_retention", hour={3}, minute={47}, timeout=3600)]
