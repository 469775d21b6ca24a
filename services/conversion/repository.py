"""All SQL of the conversion service."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from services.conversion.simfiat import SIM_FIAT_SOURCE
from shared.db import delete_older_than
from shared.models import FiatRate, RateSnapshot

INSERT_CHUNK = 2000  # 5 columns a row keeps far inside asyncpg's 32,767 bind parameters


async def upsert_fiat_rates(
    session: AsyncSession, days: dict[date, dict[str, Decimal]], fetched_at: datetime, *, source: str = "ecb"
) -> int:
    """Stores the rates; returns how many rows were written. Simulated rates (the demo's) only ever replace
    simulated ones: a database that has also fetched the ECB keeps the real rates of those days."""
    rows = [
        {"currency": currency, "day": day, "per_eur": rate, "source": source, "fetched_at": fetched_at}
        for day, rates in days.items()
        for currency, rate in rates.items()
    ]
    written = 0
    for start in range(0, len(rows), INSERT_CHUNK):
        stmt = insert(FiatRate).values(rows[start : start + INSERT_CHUNK])
        stmt = stmt.on_conflict_do_update(
            index_elements=[FiatRate.currency, FiatRate.day],
            set_={
                "per_eur": stmt.excluded.per_eur,
                "fetched_at": stmt.excluded.fetched_at,
                "source": stmt.excluded.source,
            },
            where=(FiatRate.source == SIM_FIAT_SOURCE) if source == SIM_FIAT_SOURCE else None,
        )
        result = await session.execute(stmt)
        written += int(getattr(result, "rowcount", 0) or 0)
    return written


async def delete_simulated_fiat_rates(session: AsyncSession) -> int:
    """Drops every simulated rate: once real ECB rates are stored, a demo's leftovers must never be read as
    real (days the ECB did not overwrite, or a simulated day newer than the ECB's latest)."""
    result = await session.execute(delete(FiatRate).where(FiatRate.source == SIM_FIAT_SOURCE))
    return int(getattr(result, "rowcount", 0) or 0)


@dataclass
class FiatState:
    latest_day: date | None
    fetched_at: datetime | None
    days_in_last_90: int


async def fiat_state(session: AsyncSession, *, source: str | None = None) -> FiatState:
    """What is stored; with ``source``, only that publisher's rows count (the demo's simulated rates are no
    recent ECB rates to a real run on the same database)."""
    only = [] if source is None else [FiatRate.source == source]
    latest_day, fetched_at = (
        await session.execute(select(func.max(FiatRate.day), func.max(FiatRate.fetched_at)).where(*only))
    ).one()
    days = 0
    if latest_day is not None:
        days = (
            await session.scalar(
                select(func.count(func.distinct(FiatRate.day))).where(
                    *only, FiatRate.day > latest_day - timedelta(days=90)
                )
            )
            or 0
        )
    return FiatState(latest_day=latest_day, fetched_at=fetched_at, days_in_last_90=days)


async def latest_fiat(session: AsyncSession) -> tuple[date | None, datetime | None, dict[str, Decimal]]:
    """The rates of the latest published day (currencies the ECB has since dropped are not current)."""
    state = await fiat_state(session)
    if state.latest_day is None:
        return None, None, {}
    result = await session.execute(select(FiatRate.currency, FiatRate.per_eur).where(FiatRate.day == state.latest_day))
    return state.latest_day, state.fetched_at, {row[0]: row[1] for row in result.all()}


async def fiat_day_source(session: AsyncSession, day: date) -> str | None:
    """Who published the rates of ``day``: ecb, or sim-ecb for the demo's simulated rates."""
    value: str | None = await session.scalar(select(FiatRate.source).where(FiatRate.day == day).limit(1))
    return value


async def fiat_on_or_before(session: AsyncSession, day: date, earliest: date) -> dict[str, tuple[date, Decimal, str]]:
    """Per currency, its rate of the last published day in ``[earliest, day]`` and who published it."""
    result = await session.execute(
        select(FiatRate.currency, FiatRate.day, FiatRate.per_eur, FiatRate.source)
        .where(FiatRate.day <= day, FiatRate.day >= earliest)
        .distinct(FiatRate.currency)
        .order_by(FiatRate.currency, FiatRate.day.desc())
    )
    return {row[0]: (row[1], row[2], row[3]) for row in result.all()}


async def fiat_first_day(session: AsyncSession, currency: str | None = None) -> date | None:
    query = select(func.min(FiatRate.day))
    if currency is not None:
        query = query.where(FiatRate.currency == currency)
    value: date | None = await session.scalar(query)
    return value


async def fiat_currencies(session: AsyncSession) -> set[str]:
    result = await session.scalars(select(FiatRate.currency).distinct())
    return set(result.all())


async def insert_snapshot(session: AsyncSession, taken_at: datetime, base: str, rates: dict[str, Any]) -> int:
    snapshot = RateSnapshot(taken_at=taken_at, base=base, rates=rates)
    session.add(snapshot)
    await session.flush()
    return snapshot.id


async def snapshot_at(session: AsyncSession, at: datetime, window: timedelta) -> RateSnapshot | None:
    result = await session.scalars(
        select(RateSnapshot)
        .where(RateSnapshot.taken_at <= at, RateSnapshot.taken_at >= at - window)
        .order_by(RateSnapshot.taken_at.desc())
        .limit(1)
    )
    return result.first()


async def delete_snapshots_before(session: AsyncSession, cutoff: datetime, batch: int) -> int:
    return await delete_older_than(session, "rate_snapshots", "taken_at", cutoff, batch)


# -- Read by other services (pricing derives fiat prices from these): the owner's read-only functions. --


async def latest_fiat_rates(session: AsyncSession) -> dict[str, Decimal]:
    """The latest ECB rate of every currency (units per EUR)."""
    result = await session.execute(
        select(FiatRate.currency, FiatRate.per_eur)
        .distinct(FiatRate.currency)
        .order_by(FiatRate.currency, FiatRate.day.desc())
    )
    return {row[0]: row[1] for row in result.all()}
