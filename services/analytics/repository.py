"""All SQL of the analytics service: users' saved comparisons (analytics owns ``comparisons``). Candles and
ticks are pricing's, read through pricing's repositories."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from shared.models import Comparison


async def add_comparison_once(session: AsyncSession, **values: Any) -> Comparison | None:
    """Inserts the comparison; None when the user already has one of that name (the unique index decides,
    so two concurrent requests can't both pass)."""
    inserted = await session.execute(
        pg_insert(Comparison).values(**values).on_conflict_do_nothing().returning(Comparison.id)
    )
    if inserted.first() is None:
        return None
    return await session.get(Comparison, values["id"])


async def user_comparisons(session: AsyncSession, user_id: uuid.UUID) -> Sequence[Comparison]:
    query = select(Comparison).where(Comparison.user_id == user_id).order_by(Comparison.created_at.desc())
    return (await session.scalars(query)).all()


async def count_comparisons(session: AsyncSession, user_id: uuid.UUID) -> int:
    count = await session.scalar(select(func.count()).select_from(Comparison).where(Comparison.user_id == user_id))
    return int(count or 0)


async def user_comparison(session: AsyncSession, user_id: uuid.UUID, comparison_id: uuid.UUID) -> Comparison | None:
    query = select(Comparison).where(Comparison.id == comparison_id, Comparison.user_id == user_id)
    return (await session.scalars(query)).first()


async def name_taken(session: AsyncSession, user_id: uuid.UUID, name: str) -> bool:
    query = select(Comparison.id).where(Comparison.user_id == user_id, Comparison.name == name)
    return (await session.scalar(query)) is not None


async def delete_comparison(session: AsyncSession, user_id: uuid.UUID, comparison_id: uuid.UUID) -> bool:
    result = await session.execute(
        delete(Comparison).where(Comparison.id == comparison_id, Comparison.user_id == user_id).returning(Comparison.id)
    )
    return result.first() is not None
