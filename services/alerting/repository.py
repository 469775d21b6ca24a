"""All SQL of alert rules and their events. Alerting owns ``alerts``, ``alert_events`` and
``alert_deliveries`` (their only writer)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
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


# --- evaluation and delivery -------------------------------------------------------------------------


async def alert_symbols(session: AsyncSession) -> list[str]:
    """Every coin some alert is on (an index-only scan of ix_alerts_symbol_vs). Read-only."""
    return list((await session.scalars(select(Alert.symbol).distinct())).all())


async def armed_alerts(session: AsyncSession, now: datetime, *, symbols: Sequence[str] | None = None) -> list[Any]:
    """Every rule the engine evaluates (not paused, not expired, not a one-shot that has fired), of the
    given coins (all without ``symbols``: an evaluator shard passes its own), as rows of the columns it
    needs: a million ORM objects would take far longer to build."""
    columns = (
        Alert.id, Alert.symbol, Alert.vs, Alert.condition, Alert.threshold, Alert.cooldown_seconds, Alert.one_shot,
        Alert.window_minutes, Alert.expires_at, Alert.paused, Alert.last_fired_at,
    )  # fmt: skip
    query = select(*columns).where(
        Alert.paused.is_(False),
        (Alert.expires_at.is_(None)) | (Alert.expires_at > now),
        ~(Alert.one_shot & Alert.last_fired_at.is_not(None)),
    )
    if symbols is not None:
        query = query.where(Alert.symbol.in_(list(symbols)))
    return list((await session.execute(query)).all())


async def alert_by_id(session: AsyncSession, alert_id: uuid.UUID, *, lock: bool = False) -> Alert | None:
    query = select(Alert).where(Alert.id == alert_id)
    if lock:
        query = query.with_for_update()
    return (await session.scalars(query)).first()


async def alerts_by_ids(session: AsyncSession, alert_ids: Sequence[uuid.UUID]) -> Sequence[Alert]:
    if not alert_ids:
        return []
    return (await session.scalars(select(Alert).where(Alert.id.in_(list(alert_ids))))).all()


async def add_events(
    session: AsyncSession, events: list[dict[str, Any]], deliveries: list[dict[str, Any]]
) -> set[uuid.UUID]:
    """Stores trigger events and their deliveries; an event already stored (the same id: the same alert
    fired by the same price event, seen again after a redelivery) is left as it is. The ids newly stored."""
    if not events:
        return set()
    stored = await session.execute(
        pg_insert(AlertEvent).values(events).on_conflict_do_nothing(index_elements=["id"]).returning(AlertEvent.id)
    )
    new = {row[0] for row in stored.all()}
    fresh = [d for d in deliveries if d["event_id"] in new]
    if fresh:
        await session.execute(pg_insert(AlertDelivery).values(fresh).on_conflict_do_nothing())
    return new


async def mark_fired(session: AsyncSession, fired_at: dict[uuid.UUID, datetime]) -> None:
    for alert_id, at in fired_at.items():
        await session.execute(
            update(Alert)
            .where(Alert.id == alert_id, (Alert.last_fired_at.is_(None)) | (Alert.last_fired_at < at))
            .values(last_fired_at=at)
        )


async def deliveries_of(session: AsyncSession, event_ids: Sequence[uuid.UUID]) -> Sequence[AlertDelivery]:
    """Read-only."""
    if not event_ids:
        return []
    query = select(AlertDelivery).where(AlertDelivery.event_id.in_(list(event_ids)))
    return (await session.scalars(query)).all()


async def delivery_for_update(session: AsyncSession, event_id: uuid.UUID, channel_index: int) -> AlertDelivery | None:
    query = (
        select(AlertDelivery)
        .where(AlertDelivery.event_id == event_id, AlertDelivery.channel_index == channel_index)
        .with_for_update()
    )
    return (await session.scalars(query)).first()


async def event_by_id(session: AsyncSession, event_id: uuid.UUID) -> AlertEvent | None:
    return await session.get(AlertEvent, event_id)


async def unfinished_deliveries(
    session: AsyncSession, untouched_since: datetime, due_by: datetime, limit: int
) -> list[tuple[uuid.UUID, int, datetime | None]]:
    """Deliveries still pending or retrying that nothing has touched since ``untouched_since`` and whose next
    attempt is due by ``due_by``: (event id, channel, next attempt). Read-only."""
    query = (
        select(AlertDelivery.event_id, AlertDelivery.channel_index, AlertDelivery.next_attempt_at)
        .where(
            AlertDelivery.status.in_(("pending", "retrying")),
            AlertDelivery.updated_at < untouched_since,
            (AlertDelivery.next_attempt_at.is_(None)) | (AlertDelivery.next_attempt_at <= due_by),
        )
        .order_by(AlertDelivery.updated_at)
        .limit(limit)
    )
    return [(row[0], row[1], row[2]) for row in (await session.execute(query)).all()]


async def disable_channel(session: AsyncSession, alert_id: uuid.UUID, channel_index: int, reason: str) -> Alert | None:
    """Marks one of an alert's channels disabled (a webhook answering 410 Gone, an unsubscribed address)."""
    alert = await alert_by_id(session, alert_id, lock=True)
    if alert is None or not 0 <= channel_index < len(alert.channels):
        return None
    channels = [dict(c) for c in alert.channels]
    channels[channel_index].update({"disabled": True, "disabled_reason": reason})
    alert.channels = channels
    await session.flush()
    return alert
