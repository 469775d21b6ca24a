"""All SQL of the ingest service."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import func, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared.db import delete_older_than, transaction
from shared.models import ErrorLog, SourceSetting

log = structlog.get_logger("ingest")


async def record_error(
    session: AsyncSession, *, source: str, kind: str, message: str, details: dict[str, Any] | None = None
) -> None:
    session.add(ErrorLog(source=source, kind=kind, message=message[:4000], details=details))


async def record_reported_error(
    session: AsyncSession, *, report_id: str, source: str, kind: str, message: str, at: datetime
) -> bool:
    """Store a failure another service reported on the source-errors stream, once per report id (the
    stream delivers at least once). True when it was new."""
    result = await session.execute(
        text(
            "INSERT INTO error_log (source, kind, message, details, created_at) "
            "SELECT :source, :kind, :message, CAST(:details AS jsonb), :at "
            "WHERE NOT EXISTS (SELECT 1 FROM error_log WHERE details->>'report_id' = :report_id) RETURNING id"
        ),
        {
            "source": source[:50],
            "kind": kind[:50],
            "message": message[:4000],
            "details": json.dumps({"report_id": report_id}),
            "at": at,
            "report_id": report_id,
        },
    )
    return result.first() is not None


async def list_errors(
    session: AsyncSession, *, source: str | None, since: datetime | None, limit: int
) -> tuple[list[ErrorLog], dict[str, int]]:
    query = select(ErrorLog).order_by(ErrorLog.created_at.desc(), ErrorLog.id.desc()).limit(limit)
    counts = select(ErrorLog.source, func.count()).group_by(ErrorLog.source)
    if source:
        query = query.where(ErrorLog.source == source)
        counts = counts.where(ErrorLog.source == source)
    if since:
        query = query.where(ErrorLog.created_at >= since)
        counts = counts.where(ErrorLog.created_at >= since)
    rows = list((await session.scalars(query)).all())
    count_rows = (await session.execute(counts)).all()
    return rows, {row[0]: int(row[1]) for row in count_rows}


async def log_source_error(sessions: async_sessionmaker[AsyncSession], *, source: str, kind: str, message: str) -> None:
    """Write one error-log row in a transaction of its own: a source failure is its own unit of work, and a
    database outage while logging it is itself only logged (the runner must keep going)."""
    try:
        async with transaction(sessions) as session:
            await record_error(session, source=source, kind=kind, message=message)
    except Exception as exc:
        log.warning("error_log_unavailable", source=source, error=str(exc))


async def delete_errors_before(session: AsyncSession, cutoff: datetime, batch: int) -> int:
    """The error log is written by ingest and conversion alike; its retention lives here, with its writer."""
    return await delete_older_than(session, "error_log", "created_at", cutoff, batch)


async def source_settings(session: AsyncSession) -> dict[str, SourceSetting]:
    """Every administrator's switch by source name (a source without one runs)."""
    return {row.name: row for row in (await session.scalars(select(SourceSetting))).all()}


async def set_source_enabled(
    session: AsyncSession, name: str, *, enabled: bool, changed_by: str | None, at: datetime
) -> SourceSetting:
    statement = (
        insert(SourceSetting)
        .values(name=name, enabled=enabled, changed_by=changed_by, changed_at=at)
        .on_conflict_do_update(
            index_elements=[SourceSetting.name],
            set_={"enabled": enabled, "changed_by": changed_by, "changed_at": at},
        )
        .returning(SourceSetting)
    )
    row: SourceSetting = (await session.scalars(statement)).one()
    return row
