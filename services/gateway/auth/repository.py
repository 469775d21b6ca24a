"""All SQL of accounts: users, refresh tokens, reset tokens, personal API keys and the activity log."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from shared.db import delete_older_than
from shared.models import ApiKey, PasswordResetToken, RefreshToken, User, UserActivity


async def user_by_email(session: AsyncSession, email: str) -> User | None:
    result = await session.execute(select(User).where(User.email == email))
    return result.scalar_one_or_none()


async def user_by_id(session: AsyncSession, user_id: uuid.UUID, *, for_update: bool = False) -> User | None:
    query = select(User).where(User.id == user_id)
    if for_update:
        query = query.with_for_update()
    result = await session.execute(query)
    return result.scalar_one_or_none()


async def add_user(session: AsyncSession, *, email: str, password_hash: str, role: str, now: datetime) -> User:
    user = User(
        id=uuid.uuid4(),
        email=email,
        password_hash=password_hash,
        role=role,
        vs_currency="USD",
        watchlist=[],
        is_active=True,
        password_changed_at=now,
        created_at=now,
        updated_at=now,
    )
    session.add(user)
    await session.flush()
    return user


async def update_user(session: AsyncSession, user_id: uuid.UUID, now: datetime, **values: Any) -> None:
    await session.execute(update(User).where(User.id == user_id).values(updated_at=now, **values))


async def add_refresh_token(
    session: AsyncSession, *, jti: str, user_id: uuid.UUID, family: str, issued_at: datetime, expires_at: datetime
) -> None:
    session.add(RefreshToken(jti=jti, user_id=user_id, family_id=family, issued_at=issued_at, expires_at=expires_at))
    await session.flush()


async def refresh_token_for_update(session: AsyncSession, jti: str) -> RefreshToken | None:
    result = await session.execute(select(RefreshToken).where(RefreshToken.jti == jti).with_for_update())
    return result.scalar_one_or_none()


async def mark_refresh_used(session: AsyncSession, jti: str, now: datetime) -> None:
    await session.execute(update(RefreshToken).where(RefreshToken.jti == jti).values(used_at=now))


async def revoke_family(session: AsyncSession, family: str, now: datetime) -> None:
    await session.execute(
        update(RefreshToken)
        .where(RefreshToken.family_id == family, RefreshToken.revoked_at.is_(None))
        .values(revoked_at=now)
    )


async def revoke_user_families(session: AsyncSession, user_id: uuid.UUID, now: datetime) -> list[str]:
    """Revokes every live refresh token of the user; returns the families that had one."""
    result = await session.execute(
        update(RefreshToken)
        .where(RefreshToken.user_id == user_id, RefreshToken.revoked_at.is_(None), RefreshToken.expires_at > now)
        .values(revoked_at=now)
        .returning(RefreshToken.family_id)
    )
    return sorted({row[0] for row in result})


async def add_reset_token(
    session: AsyncSession, *, token_hash: str, user_id: uuid.UUID, now: datetime, expires_at: datetime
) -> None:
    session.add(PasswordResetToken(token_hash=token_hash, user_id=user_id, created_at=now, expires_at=expires_at))
    await session.flush()


async def reset_token_for_update(session: AsyncSession, token_hash: str) -> PasswordResetToken | None:
    result = await session.execute(
        select(PasswordResetToken).where(PasswordResetToken.token_hash == token_hash).with_for_update()
    )
    return result.scalar_one_or_none()


async def spend_reset_tokens(session: AsyncSession, user_id: uuid.UUID, now: datetime) -> None:
    """Marks every open reset token of the user used: one completed reset spends the others too."""
    await session.execute(
        update(PasswordResetToken)
        .where(PasswordResetToken.user_id == user_id, PasswordResetToken.used_at.is_(None))
        .values(used_at=now)
    )


async def add_activity(
    session: AsyncSession,
    *,
    user_id: uuid.UUID,
    kind: str,
    client_address: str | None,
    now: datetime,
    details: dict[str, Any] | None = None,
) -> None:
    session.add(
        UserActivity(
            user_id=user_id, kind=kind, details=details, client_address=(client_address or "")[:64], created_at=now
        )
    )
    await session.flush()


async def list_activity(
    session: AsyncSession, user_id: uuid.UUID, *, limit: int, before_id: int | None
) -> Sequence[UserActivity]:
    query = select(UserActivity).where(UserActivity.user_id == user_id)
    if before_id is not None:
        query = query.where(UserActivity.id < before_id)
    result = await session.execute(query.order_by(UserActivity.id.desc()).limit(limit))
    return result.scalars().all()


async def list_users(
    session: AsyncSession, *, limit: int, offset: int, email_contains: str | None
) -> tuple[Sequence[User], int]:
    query = select(User)
    counted = select(func.count()).select_from(User)
    if email_contains:
        pattern = "%" + email_contains.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        query = query.where(User.email.ilike(pattern, escape="\\"))
        counted = counted.where(User.email.ilike(pattern, escape="\\"))
    rows = (await session.execute(query.order_by(User.created_at, User.id).limit(limit).offset(offset))).scalars()
    total = (await session.execute(counted)).scalar_one()
    return rows.all(), int(total)


async def delete_activity_before(session: AsyncSession, cutoff: datetime, batch: int) -> int:
    return await delete_older_than(session, "user_activity", "created_at", cutoff, batch)


async def add_activity_once(
    session: AsyncSession,
    *,
    message_id: str,
    user_id: uuid.UUID,
    kind: str,
    client_address: str | None,
    at: datetime,
    details: dict[str, Any] | None,
) -> bool:
    """Records an activity another service reported, once per ``message_id`` (kept in ``details``), and
    only while the user exists. Whether a row was added."""
    # Two consumers handling one redelivered message wait for each other here, then see the first one's row.
    await session.execute(
        text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"), {"key": f"activity:{message_id}"}
    )
    if await session.get(User, user_id) is None:
        return False
    seen = await session.scalar(
        select(UserActivity.id)
        .where(UserActivity.user_id == user_id, UserActivity.details["message_id"].astext == message_id)
        .limit(1)
    )
    if seen is not None:
        return False
    await add_activity(
        session,
        user_id=user_id,
        kind=kind,
        client_address=client_address,
        now=at,
        details={**(details or {}), "message_id": message_id},
    )
    return True


# --- personal API keys ---------------------------------------------------------------------------


async def add_api_key(
    session: AsyncSession,
    *,
    user_id: uuid.UUID,
    name: str,
    key_hash: str,
    prefix: str,
    now: datetime,
    expires_at: datetime | None,
) -> ApiKey:
    key = ApiKey(
        id=uuid.uuid4(), user_id=user_id, name=name, key_hash=key_hash, prefix=prefix, created_at=now,
        expires_at=expires_at,
    )  # fmt: skip
    session.add(key)
    await session.flush()
    return key


async def count_live_api_keys(session: AsyncSession, user_id: uuid.UUID, now: datetime) -> int:
    counted = await session.scalar(
        select(func.count())
        .select_from(ApiKey)
        .where(
            ApiKey.user_id == user_id,
            ApiKey.revoked_at.is_(None),
            (ApiKey.expires_at.is_(None)) | (ApiKey.expires_at > now),
        )
    )
    return int(counted or 0)


async def list_api_keys(session: AsyncSession, user_id: uuid.UUID) -> Sequence[ApiKey]:
    """The user's unrevoked keys (expired ones too, so their owner sees why a script stopped), newest first."""
    result = await session.execute(
        select(ApiKey)
        .where(ApiKey.user_id == user_id, ApiKey.revoked_at.is_(None))
        .order_by(ApiKey.created_at.desc(), ApiKey.id)
    )
    return result.scalars().all()


async def revoke_api_key(session: AsyncSession, user_id: uuid.UUID, key_id: uuid.UUID, now: datetime) -> ApiKey | None:
    """Revokes the user's own unrevoked key; None when there is none such (someone else's id included)."""
    result = await session.execute(
        update(ApiKey)
        .where(ApiKey.id == key_id, ApiKey.user_id == user_id, ApiKey.revoked_at.is_(None))
        .values(revoked_at=now)
        .returning(ApiKey)
    )
    return result.scalar_one_or_none()


async def revoke_user_api_keys(session: AsyncSession, user_id: uuid.UUID, now: datetime) -> list[uuid.UUID]:
    """Revokes every unrevoked key of the user (a password reset); the ids of those it revoked."""
    result = await session.execute(
        update(ApiKey)
        .where(ApiKey.user_id == user_id, ApiKey.revoked_at.is_(None))
        .values(revoked_at=now)
        .returning(ApiKey.id)
    )
    return list(result.scalars())


async def api_key_owner(session: AsyncSession, key_hash: str) -> tuple[ApiKey, bool] | None:
    """The key with this hash and whether its owner's account is active: the one lookup (by the unique
    index) an API-key request costs."""
    result = await session.execute(
        select(ApiKey, User.is_active).join(User, User.id == ApiKey.user_id).where(ApiKey.key_hash == key_hash)
    )
    row = result.one_or_none()
    return (row[0], bool(row[1])) if row is not None else None


async def touch_api_key(session: AsyncSession, key_id: uuid.UUID, now: datetime) -> bool | None:
    """Sets the key's last use; whether it had never been used before (None: no such key any more)."""
    result = await session.execute(select(ApiKey.last_used_at).where(ApiKey.id == key_id).with_for_update())
    row = result.one_or_none()
    if row is None:
        return None
    await session.execute(update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=now))
    return row[0] is None
