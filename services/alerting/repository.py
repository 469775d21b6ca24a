"""All SQL of alert rules and their events. Alerting owns ``alerts``, ``alert_events`` and
``alert_deliveries`` (their only writer)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from shared.models import Alert, AlertDelivery, AlertEvent


async def lock_user_alerts(session: AsyncSession, user_id: uuid.UUID) -> None:
    """Serialises one user's creations until commit, so concurrent requests can't pass the limit together."""
    await session.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"), {"key": f"alerts:{user_id}"})


async def count_alerts(session: AsyncSession, user_id: uuid.UUID) -> int:
    return int(await session.scalar(select(func.count()).select_from(Alert).where(Alert.user_id == user_id)) or 0)


async def add_alert(session: AsyncSession, **values: Any) -> Alert:
    alert = Alert(**values)
    session.add(alert)
    await session.flush()
    return alert


async def user_alert(
    session: AsyncSession, user_id: uuid.UUID, alert_id: uuid.UUID, *, lock: bool = False
) -> Alert | None:
    query = select(Alert).where(Alert.id == alert_id, Alert.user_id == user_id)
    if lock:
        query = query.with_for_update()
    return (await session.scalars(query)).first()


async def user_alerts(session: AsyncSession, user_id: uuid.UUID, *, limit: int, offset: int) -> Sequence[Alert]:
    query = select(Alert).where(Alert.user_id == user_id).order_by(Alert.created_at.desc(), Alert.id)
    return (await session.scalars(query.limit(limit).offset(offset))).all()


async def update_alert(session: AsyncSession, alert: Alert, values: dict[str, Any]) -> Alert:
    for name, value in values.items():
        setattr(alert, name, value)
    await session.flush()
    return alert


async def delete_alert(session: AsyncSession, alert: Alert) -> None:
    await session.delete(alert)
    await session.flush()


async def delete_expired(session: AsyncSession, cutoff: datetime, batch: int) -> list[tuple[uuid.UUID, uuid.UUID]]:
    """Deletes up to ``batch`` alerts that expired before ``cutoff``; their (id, user_id)."""
    doomed = select(Alert.id).where(Alert.expires_at < cutoff).order_by(Alert.expires_at).limit(batch)
    result = await session.execute(
        delete(Alert).where(Alert.id.in_(doomed.scalar_subquery())).returning(Alert.id, Alert.user_id)
    )
    return [(row[0], row[1]) for row in result.all()]


async def alert_events(
    session: AsyncSession, alert_id: uuid.UUID, *, limit: int
) -> list[tuple[AlertEvent, list[AlertDelivery]]]:
    """The alert's newest events, each with its deliveries in channel order. Read-only."""
    events = list(
        (
            await session.scalars(
                select(AlertEvent)
                .where(AlertEvent.alert_id == alert_id)
                .order_by(AlertEvent.created_at.desc(), AlertEvent.id)
                .limit(limit)
            )
        ).all()
    )
    if not events:
        return []
    deliveries = (
        await session.scalars(
            select(AlertDelivery)
            .where(AlertDelivery.event_id.in_([e.id for e in events]))
            .order_by(AlertDelivery.event_id, AlertDelivery.channel_index)
        )
    ).all()
    by_event: dict[uuid.UUID, list[AlertDelivery]] = {}
    for delivery in deliveries:
        by_event.setdefault(delivery.event_id, []).append(delivery)
    return [(event, by_event.get(event.id, [])) for event in events]
