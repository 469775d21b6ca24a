"""Scheduled jobs of the ingest service (arq cron, run by its worker): expiring the error log it owns."""

from __future__ import annotations

from arq.cron import CronJob, cron

from services.ingest import repository
from shared.jobs import retention_job

error_log_retention = retention_job("error_log", repository.delete_errors_before, lambda s: s.retention_error_log_days)


def cron_jobs() -> list[CronJob]:
    return [cron(error_log_retention, name="error_log_retention", hour={3}, minute={37}, timeout=3600)]
