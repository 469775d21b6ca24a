"""Accounts logic: passwords (Argon2id), token pairs with rotation and reuse detection, login throttling,
password reset, profiles, the activity log and administration of users."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
import time
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from jose import jwt
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.gateway.auth import repository
from services.gateway.auth.schemas import TokenOut, UserPatch
from services.gateway.ratelimit import SlidingWindowLimiter
from services.pricing.coins.repository import active_coins
from shared.auth import LOCAL_ALGORITHM, Denylist, LocalTokenVerifier, Principal, TokenError
from shared.db import transaction
from shared.errors import (
    BadRequest,
    Conflict,
    NotFound,
    RateLimited,
    ServiceUnavailable,
    Unauthorized,
    ValidationFailed,
    store_unavailable,
)
from shared.models import ApiKey, User
from shared.settings import Settings
from shared.streams import EMAILS_STREAM, StreamPublisher

log = structlog.get_logger("auth")

INVALID_LOGIN = "incorrect email or password"
RESET_ACCEPTED = "if the address has an account, a reset link is on its way"


def utcnow() -> datetime:
    return datetime.now(UTC)


def _bytes(text: str) -> bytes:
    # JSON can carry lone surrogates; they are bytes like any others to a hash, never an error.
    return text.encode("utf-8", "surrogatepass")


def hash_token(token: str) -> str:
    return hashlib.sha256(_bytes(token)).hexdigest()


class Passwords:
    """Argon2id with the configured cost; hashing runs in a thread so the event loop keeps serving."""

    def __init__(self, settings: Settings) -> None:
        self.hasher = PasswordHasher(
            time_cost=settings.argon2_time_cost,
            memory_cost=settings.argon2_memory_kib,
            parallelism=settings.argon2_parallelism,
            hash_len=32,
            salt_len=16,
            type=Type.ID,
        )
        self._dummy: str | None = None

    async def hash(self, password: str) -> str:
        return await asyncio.to_thread(self.hasher.hash, _bytes(password))

    async def verify(self, stored: str | None, password: str) -> bool:
        """Checks ``password``; with no account (``stored`` None) checks a dummy hash so both take as long."""
        if stored is None:
            if self._dummy is None:
                self._dummy = await self.hash(secrets.token_urlsafe(16))
            stored = self._dummy
        try:
            return await asyncio.to_thread(self.hasher.verify, stored, _bytes(password))
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    def needs_rehash(self, stored: str) -> bool:
        try:
            return self.hasher.check_needs_rehash(stored)
        except InvalidHashError:
            return True


def client_key(email: str) -> str:
    # Hashed so Redis keys don't hold addresses.
    return hashlib.sha256(email.encode()).hexdigest()[:32]


class AuthService:
    def __init__(
        self,
        settings: Settings,
        sessions: async_sessionmaker[AsyncSession],
        redis: Redis,
        publisher: StreamPublisher,
        denylist: Denylist,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.redis = redis
        self.publisher = publisher
        self.denylist = denylist
        self.passwords = Passwords(settings)
        self._tasks: set[asyncio.Task[None]] = set()
        self.limiter = SlidingWindowLimiter(redis, settings.key("ratelimit"))
        self.refresh_verifier = LocalTokenVerifier(
            settings.jwt_secret_value(), issuer=settings.jwt_issuer, audience=settings.jwt_audience
        )
        self.api_keys = ApiKeyService(settings, sessions, redis)

    # --- tokens ---------------------------------------------------------------------------------

    def _encode(self, claims: dict[str, Any]) -> str:
        token: str = jwt.encode(claims, self.settings.jwt_secret_value(), algorithm=LOCAL_ALGORITHM)
        return token

    async def _issue_pair(self, session: AsyncSession, user: User, family: str, now: datetime) -> TokenOut:
        access_ttl = timedelta(minutes=self.settings.access_token_minutes)
        refresh_ttl = timedelta(days=self.settings.refresh_token_days)
        common = {
            "iss": self.settings.jwt_issuer,
            "aud": self.settings.jwt_audience,
            "sub": str(user.id),
            "iat": int(now.timestamp()),
            "fam": family,
        }
        access = {
            **common,
            "typ": "access",
            "role": user.role,
            "jti": secrets.token_hex(16),
            "exp": int((now + access_ttl).timestamp()),
        }
        refresh_jti = secrets.token_hex(16)
        refresh = {**common, "typ": "refresh", "jti": refresh_jti, "exp": int((now + refresh_ttl).timestamp())}
        await repository.add_refresh_token(
            session, jti=refresh_jti, user_id=user.id, family=family, issued_at=now, expires_at=now + refresh_ttl
        )
        return TokenOut(
            access_token=self._encode(access),
            refresh_token=self._encode(refresh),
            expires_in=int(access_ttl.total_seconds()),
        )

    # --- registration and sign-in ---------------------------------------------------------------

    async def register(self, email: str, password: str, client: str | None, *, role: str = "user") -> User:
        password_hash = await self.passwords.hash(password)
        now = utcnow()
        try:
            async with transaction(self.sessions) as session:
                if await repository.user_by_email(session, email) is not None:
                    raise Conflict("an account with this email address exists; sign in or reset the password")
                user = await repository.add_user(session, email=email, password_hash=password_hash, role=role, now=now)
                await repository.add_activity(session, user_id=user.id, kind="register", client_address=client, now=now)
        except IntegrityError:
            raise Conflict("an account with this email address exists; sign in or reset the password") from None
        await self._send_email(
            email,
            "Welcome to Coinlytics",
            f"Your Coinlytics account {email} is ready.\n\nSign in at {self.settings.public_url}/docs\n",
        )
        return user

    async def _throttle_login(self, email: str, client: str | None) -> str:
        ip_key = f"login-ip:{client or 'unknown'}"
        await self.limiter.enforce(
            ip_key,
            limit=self.settings.login_max_attempts_per_ip,
            window_seconds=self.settings.login_ip_window_seconds,
            what="sign-in attempts from this address",
        )
        fail_key = self.settings.key("auth", "login-failures", client_key(email))
        # Counted before the password is checked, in one MULTI: parallel guesses each draw their own number,
        # so no more than `login_max_failures` of them get to try. A successful sign-in clears the count.
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(fail_key, 0, ex=self.settings.login_failure_window_seconds, nx=True)
            pipe.incr(fail_key)
            pipe.ttl(fail_key)
            _, attempts, ttl = await pipe.execute()
        if int(attempts) > self.settings.login_max_failures:
            raise RateLimited("too many failed sign-ins for this account; retry later", retry_after=max(1, int(ttl)))
        return fail_key

    async def login(self, email: str, password: str, client: str | None) -> TokenOut:
        fail_key = await self._throttle_login(email, client)
        async with transaction(self.sessions) as session:
            user = await repository.user_by_email(session, email)
        # Unknown accounts verify a dummy hash: same answer, same work, whether or not the account exists.
        ok = await self.passwords.verify(user.password_hash if user else None, password)
        now = utcnow()
        if not ok or user is None or not user.is_active:
            # Already counted by _throttle_login.
            if user is not None:
                # Recorded off the response path, so a failure for a real account takes no longer to answer.
                self._background(self._record(user.id, "login_failed", client, now))
            raise Unauthorized(INVALID_LOGIN, headers={"WWW-Authenticate": "Bearer"})
        await self.redis.delete(fail_key)
        new_hash = await self.passwords.hash(password) if self.passwords.needs_rehash(user.password_hash) else None
        async with transaction(self.sessions) as session:
            if new_hash is not None:
                await repository.update_user(session, user.id, now, password_hash=new_hash)
            tokens = await self._issue_pair(session, user, secrets.token_hex(16), now)
            details = {"rehashed": True} if new_hash else None
            await repository.add_activity(
                session, user_id=user.id, kind="login", client_address=client, now=now, details=details
            )
        return tokens

    async def refresh(self, token: str, client: str | None) -> TokenOut:
        try:
            claims = await self.refresh_verifier.verify(token, expected_type="refresh")
        except TokenError as exc:
            log.info("refresh_rejected", reason=str(exc)[:200])
            raise Unauthorized("invalid or expired refresh token") from None
        try:
            subject = uuid.UUID(str(claims["sub"]))
        except ValueError:
            raise Unauthorized("invalid or expired refresh token") from None
        now = utcnow()
        reused_family: str | None = None
        async with transaction(self.sessions) as session:
            # The user row is the lock every revocation (logout, password reset, admin change) takes first:
            # a refresh commits before one, whose UPDATE then sees the new token, or runs after it and finds
            # its own token revoked. Taken before the token row, in the same order as they are, to avoid deadlocks.
            user = await repository.user_by_id(session, subject, for_update=True)
            row = await repository.refresh_token_for_update(session, str(claims["jti"]))
            if user is None or row is None or row.user_id != user.id:
                raise Unauthorized("invalid or expired refresh token")
            if row.used_at is not None or row.revoked_at is not None:
                # A spent token presented again: someone holds a copy. RFC 9700 says end the whole family.
                await repository.revoke_family(session, row.family_id, now)
                await repository.add_activity(
                    session,
                    user_id=row.user_id,
                    kind="refresh_reuse_detected",
                    client_address=client,
                    now=now,
                )
                reused_family = row.family_id
            else:
                if not user.is_active or row.expires_at <= now:
                    raise Unauthorized("invalid or expired refresh token")
                await repository.mark_refresh_used(session, row.jti, now)
                tokens = await self._issue_pair(session, user, row.family_id, now)
        if reused_family is not None:
            await self.denylist.deny_families([reused_family])
            log.warning("refresh_token_reuse", family=reused_family)
            raise Unauthorized("refresh token already used; every session of this sign-in has been revoked")
        return tokens

    async def logout(self, principal: Principal, client: str | None) -> None:
        if principal.jti and principal.expires_at:
            await self.denylist.deny_token(principal.jti, principal.expires_at)
        now = utcnow()
        if principal.family:
            await self.denylist.deny_families([principal.family])
        async with transaction(self.sessions) as session:
            if principal.family:
                if principal.user_id:
                    # Waits for a refresh in flight (it holds the user row), so the token it issues is revoked too.
                    await repository.user_by_id(session, uuid.UUID(principal.user_id), for_update=True)
                await repository.revoke_family(session, principal.family, now)
            if principal.user_id:
                await repository.add_activity(
                    session, user_id=uuid.UUID(principal.user_id), kind="logout", client_address=client, now=now
                )

    # --- password reset -------------------------------------------------------------------------

    async def request_reset(self, email: str, client: str | None) -> None:
        """Sends the reset mail after the response: the answer can't reveal that this account exists.

        At most one mail per address per ``password_reset_mail_interval_seconds``, so the endpoint can't
        flood a mailbox; a request within the interval is answered the same and sends nothing. The slot is
        taken for every address, known or not, before the account is looked up: a Redis failure then
        answers every address alike instead of only those that have an account."""
        interval = self.settings.password_reset_mail_interval_seconds
        if interval:
            # ``email`` comes normalised (PasswordResetIn); hashed so Redis holds no address.
            slot = self.settings.key("auth", "reset-mail", hash_token(email))
            if not await self.redis.set(slot, b"1", ex=interval, nx=True):
                log.info("password_reset_mail_skipped", reason="one was sent recently")
                return
        async with transaction(self.sessions) as session:
            user = await repository.user_by_email(session, email)
        if user is not None and user.is_active:
            self._background(self._send_reset_logged(user.id, client))

    async def _send_reset_logged(self, user_id: uuid.UUID, client: str | None) -> None:
        try:
            await self.send_reset(user_id, client)
        except Exception as exc:
            log.error("password_reset_failed", error=f"{type(exc).__name__}: {exc}")

    async def send_reset(self, user_id: uuid.UUID, client: str | None) -> None:
        """Creates a reset token and emails its link; run after the (uniform) response has gone out."""
        token = secrets.token_urlsafe(32)  # 256 random bits
        now = utcnow()
        async with transaction(self.sessions) as session:
            user = await repository.user_by_id(session, user_id)
            if user is None:
                return
            await repository.add_reset_token(
                session,
                token_hash=hash_token(token),
                user_id=user_id,
                now=now,
                expires_at=now + timedelta(minutes=self.settings.password_reset_minutes),
            )
            await repository.add_activity(
                session, user_id=user_id, kind="password_reset_requested", client_address=client, now=now
            )
            email = user.email
        # The host comes from configuration: a forged Host header must not steer the link elsewhere.
        link = f"{self.settings.public_url}/reset-password#token={token}"
        await self._send_email(
            email,
            "Reset your Coinlytics password",
            "Someone asked to reset the password of this Coinlytics account.\n\n"
            f"Choose a new password here (the link works once, for {self.settings.password_reset_minutes} "
            f"minutes):\n{link}\n\nIf it wasn't you, ignore this message; your password stays as it is.\n",
        )

    async def confirm_reset(self, token: str, new_password: str, client: str | None) -> None:
        password_hash = await self.passwords.hash(new_password)
        now = utcnow()
        async with transaction(self.sessions) as session:
            row = await repository.reset_token_for_update(session, hash_token(token))
            if row is None or row.used_at is not None or row.expires_at <= now:
                raise BadRequest("the reset link is invalid, used or expired; ask for a new one")
            user = await repository.user_by_id(session, row.user_id, for_update=True)
            if user is None or not user.is_active:
                raise BadRequest("the reset link is invalid, used or expired; ask for a new one")
            await repository.spend_reset_tokens(session, user.id, now)
            await repository.update_user(session, user.id, now, password_hash=password_hash, password_changed_at=now)
            families = await repository.revoke_user_families(session, user.id, now)
            # A reset is what an owner does after losing control of the account: keys minted meanwhile go
            # too, like every session.
            revoked_keys = await repository.revoke_user_api_keys(session, user.id, now)
            await repository.add_activity(
                session, user_id=user.id, kind="password_changed", client_address=client, now=now,
                details={"api_keys_revoked": len(revoked_keys)} if revoked_keys else None,
            )  # fmt: skip
        await self.denylist.deny_families(families)
        await self.api_keys.forget_keys(revoked_keys)
        await self.redis.delete(self.settings.key("auth", "login-failures", client_key(user.email)))

    # --- profile and activity -------------------------------------------------------------------

    async def me(self, user_id: str) -> User:
        async with transaction(self.sessions) as session:
            user = await repository.user_by_id(session, uuid.UUID(user_id))
        if user is None or not user.is_active:
            raise Unauthorized("the account no longer exists or is disabled")
        return user

    async def update_me(self, user_id: str, patch: UserPatch, client: str | None) -> User:
        changes: dict[str, Any] = patch.model_dump(exclude_unset=True, exclude_none=True)
        if "vs_currency" in changes and changes["vs_currency"] not in self.settings.vs_currencies:
            raise ValidationFailed(
                f"vs_currency: choose one of {', '.join(self.settings.vs_currencies)}",
                details={"allowed": self.settings.vs_currencies},
            )
        now = utcnow()
        async with transaction(self.sessions) as session:
            if changes.get("watchlist"):
                wanted: list[str] = changes["watchlist"]
                known = set(self.settings.coins) | set(await active_coins(session))
                unknown = [s for s in wanted if s not in known]
                if unknown:
                    raise ValidationFailed(
                        f"watchlist: not a tracked coin: {', '.join(unknown[:5])}", details={"unknown": unknown}
                    )
            if changes:
                await repository.update_user(session, uuid.UUID(user_id), now, **changes)
                await repository.add_activity(
                    session,
                    user_id=uuid.UUID(user_id),
                    kind="preferences_changed",
                    client_address=client,
                    now=now,
                    details=changes,
                )
            user = await repository.user_by_id(session, uuid.UUID(user_id))
        if user is None or not user.is_active:
            raise Unauthorized("the account no longer exists or is disabled")
        return user

    async def activity(self, user_id: str, *, limit: int, before_id: int | None) -> list[Any]:
        async with transaction(self.sessions) as session:
            return list(await repository.list_activity(session, uuid.UUID(user_id), limit=limit, before_id=before_id))

    # --- administration -------------------------------------------------------------------------

    async def list_users(self, *, limit: int, offset: int, email_contains: str | None) -> tuple[list[User], int]:
        async with transaction(self.sessions) as session:
            users, total = await repository.list_users(
                session, limit=limit, offset=offset, email_contains=email_contains
            )
        return list(users), total

    async def admin_update_user(
        self, admin: Principal, user_id: uuid.UUID, role: str | None, is_active: bool | None, client: str | None
    ) -> User:
        if admin.user_id == str(user_id) and (role == "user" or is_active is False):
            raise Conflict("administrators cannot demote or disable themselves; ask another administrator")
        now = utcnow()
        families: list[str] = []
        async with transaction(self.sessions) as session:
            user = await repository.user_by_id(session, user_id, for_update=True)
            if user is None:
                raise NotFound(f"no user {user_id}")
            changes: dict[str, Any] = {}
            if role is not None and role != user.role:
                changes["role"] = role
            if is_active is not None and is_active != user.is_active:
                changes["is_active"] = is_active
            if changes:
                await repository.update_user(session, user_id, now, **changes)
                # Roles live in tokens: sign the user out so the next sign-in carries the new role.
                families = await repository.revoke_user_families(session, user_id, now)
                await repository.add_activity(
                    session,
                    user_id=user_id,
                    kind="account_changed_by_admin",
                    client_address=client,
                    now=now,
                    details={**changes, "by": admin.user_id},
                )
            user = await repository.user_by_id(session, user_id)
        await self.denylist.deny_families(families)
        if changes.get("is_active") is False:
            await self.api_keys.forget_user(user_id)
        assert user is not None
        return user

    async def ensure_admin(self, email: str, password: str | None) -> tuple[User, bool]:
        """For the CLI: makes ``email`` an administrator, creating the account when ``password`` is given."""
        async with transaction(self.sessions) as session:
            user = await repository.user_by_email(session, email)
            if user is not None:
                await repository.update_user(session, user.id, utcnow(), role="admin", is_active=True)
        if user is not None:
            return user, False
        if password is None:
            raise NotFound(f"no account {email}; give a password to create it")
        return await self.register(email, password, "cli", role="admin"), True

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _record(self, user_id: uuid.UUID, kind: str, client: str | None, now: datetime) -> None:
        try:
            async with transaction(self.sessions) as session:
                await repository.add_activity(session, user_id=user_id, kind=kind, client_address=client, now=now)
        except Exception as exc:
            log.warning("activity_not_recorded", kind=kind, error=f"{type(exc).__name__}: {exc}")

    async def close(self) -> None:
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, timeout=5)
        await self.api_keys.close()

    # --- email ----------------------------------------------------------------------------------

    async def _send_email(self, to: str, subject: str, text: str) -> None:
        """Hands the message to the alerting service's sender (after the transaction committed)."""
        try:
            await self.publisher.publish(
                EMAILS_STREAM, {"id": uuid.uuid4().hex, "to": to, "subject": subject, "text": text}
            )
        except Exception as exc:
            # The account change stands; the mail is lost and the log says so.
            log.error("email_not_queued", subject=subject, error=f"{type(exc).__name__}: {exc}")


# --- personal API keys ---------------------------------------------------------------------------

# Recognisable in logs and by secret scanners; the rest is 256 random bits (43 URL-safe characters).
API_KEY_PREFIX = "cl_live_"
API_KEY_MAX_LENGTH = 128
# What the key list shows of a key: the marker and four characters of the secret (24 bits: not enough to
# help a guesser, enough for an owner to tell keys apart).
DISPLAY_PREFIX_LENGTH = len(API_KEY_PREFIX) + 4
# ``last_used_at`` is written at most this often per key: one replica remembers its latest write, and a
# Redis marker makes the interval hold across replicas.
LAST_USED_INTERVAL_SECONDS = 60
MARKS_MAX_ENTRIES = 10_000
INVALID_API_KEY = "invalid, expired or revoked API key"
# A key found valid in the database is trusted by this replica for this long (never past its expiry), with
# Redis asked on every request whether it (or its account) was revoked since: the markers outlive every
# cached entry, so a revocation holds on every replica as soon as the revoking call returned.
VERIFIED_KEY_TTL_SECONDS = 30.0
VERIFIED_KEYS_MAX_ENTRIES = 10_000
REVOCATION_MARKER_SECONDS = int(2 * VERIFIED_KEY_TTL_SECONDS) + 5
API_KEY_CHALLENGE = {"WWW-Authenticate": 'ApiKey realm="coinlytics", header="X-API-Key"'}


@dataclass(frozen=True, slots=True)
class _VerifiedKey:
    key_id: uuid.UUID
    user_id: uuid.UUID
    expires_at: datetime | None
    valid_until: float  # time.monotonic()


class ApiKeyService:
    """Personal API keys: created (the secret shown once), listed, revoked, and checked on each request.

    A check is one lookup by the hash's unique index (with the owner's account status); a key that passed
    is then remembered for ``VERIFIED_KEY_TTL_SECONDS``, as the token cache does, and its next requests cost
    one Redis read of the revocation markers instead. A revocation, an expiry or a disabled account holds on
    every gateway replica from the next request on."""

    def __init__(self, settings: Settings, sessions: async_sessionmaker[AsyncSession], redis: Redis) -> None:
        self.settings = settings
        self.sessions = sessions
        self.redis = redis
        self._marked: dict[uuid.UUID, float] = {}
        self._verified: dict[str, _VerifiedKey] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def _revoked_key(self, key_id: uuid.UUID) -> str:
        return self.settings.key("apikeys", "revoked", "key", str(key_id))

    def _revoked_user(self, user_id: uuid.UUID) -> str:
        return self.settings.key("apikeys", "revoked", "user", str(user_id))

    async def forget_keys(self, key_ids: list[uuid.UUID]) -> None:
        """These keys were revoked in the database: replicas that remember them stop too."""
        if key_ids:
            async with self.redis.pipeline(transaction=False) as pipe:
                for key_id in key_ids:
                    pipe.set(self._revoked_key(key_id), b"1", ex=REVOCATION_MARKER_SECONDS)
                await pipe.execute()

    async def forget_user(self, user_id: uuid.UUID) -> None:
        """Every key of this account stops at once (its account was disabled): the database refuses them
        from now on, the marker covers what replicas remembered."""
        await self.redis.set(self._revoked_user(user_id), b"1", ex=REVOCATION_MARKER_SECONDS)

    async def create(
        self, user_id: str, name: str, expires_at: datetime | None, client: str | None
    ) -> tuple[ApiKey, str]:
        """The new key's row and its secret (which is not kept)."""
        now = utcnow()
        if expires_at is not None and expires_at <= now:
            raise ValidationFailed("expires_at: choose a moment in the future")
        secret = API_KEY_PREFIX + secrets.token_urlsafe(32)
        prefix = secret[:DISPLAY_PREFIX_LENGTH]
        limit = self.settings.api_keys_max_per_user
        owner = uuid.UUID(user_id)
        async with transaction(self.sessions) as session:
            # The account row serialises one account's creations, so parallel requests can't pass the limit.
            user = await repository.user_by_id(session, owner, for_update=True)
            if user is None or not user.is_active:
                raise Unauthorized("the account no longer exists or is disabled")
            if await repository.count_live_api_keys(session, owner, now) >= limit:
                raise Conflict(f"an account holds at most {limit} API keys; revoke one first", details={"limit": limit})
            key = await repository.add_api_key(
                session, user_id=owner, name=name, key_hash=hash_token(secret), prefix=prefix, now=now,
                expires_at=expires_at,
            )  # fmt: skip
            await repository.add_activity(
                session, user_id=owner, kind="api_key_created", client_address=client, now=now,
                details={"key_id": str(key.id), "name": name, "prefix": prefix},
            )  # fmt: skip
        return key, secret

    async def list(self, user_id: str) -> list[ApiKey]:
        async with transaction(self.sessions) as session:
            return list(await repository.list_api_keys(session, uuid.UUID(user_id)))

    async def revoke(self, user_id: str, key_id: uuid.UUID, client: str | None) -> None:
        now = utcnow()
        owner = uuid.UUID(user_id)
        async with transaction(self.sessions) as session:
            key = await repository.revoke_api_key(session, owner, key_id, now)
            if key is None:
                # Someone else's key, an unknown id and a key already revoked all look the same.
                raise NotFound(f"no API key {key_id}")
            # Before the commit: if Redis can't take the marker, nothing is revoked (503) rather than a
            # revocation that replicas holding the key in memory would miss.
            await self.redis.set(self._revoked_key(key.id), b"1", ex=REVOCATION_MARKER_SECONDS)
            await repository.add_activity(
                session, user_id=owner, kind="api_key_revoked", client_address=client, now=now,
                details={"key_id": str(key.id), "name": key.name, "prefix": key.prefix},
            )  # fmt: skip

    async def authenticate(self, secret: str, client: str | None) -> Principal:
        """The key owner's principal (never an administrator), or a 401."""
        if not secret.startswith(API_KEY_PREFIX) or len(secret) > API_KEY_MAX_LENGTH:
            raise Unauthorized(INVALID_API_KEY, headers=API_KEY_CHALLENGE)
        now = utcnow()
        digest = hash_token(secret)
        cached = self._verified.get(digest)
        if cached is not None:
            if time.monotonic() < cached.valid_until and (cached.expires_at is None or now < cached.expires_at):
                markers = [self._revoked_key(cached.key_id), self._revoked_user(cached.user_id)]
                try:
                    revoked = await self.redis.mget(markers)
                except (RedisError, OSError):
                    revoked = [b"unknown"]  # Redis can't say: the database decides, below
                if not any(value is not None for value in revoked):
                    self._note_use(cached.key_id, client)
                    return Principal(user_id=str(cached.user_id), role="user", auth_method="api_key")
            del self._verified[digest]
        try:
            async with transaction(self.sessions) as session:
                found = await repository.api_key_owner(session, digest)
        except Exception as exc:
            store = store_unavailable(exc)
            if store is None:
                raise
            # Answered by whatever route asked (the compatible routes in CoinGecko's shape).
            raise ServiceUnavailable(f"{store} is unavailable; retry shortly") from None
        if found is None:
            log.info("api_key_rejected", reason="unknown")
            raise Unauthorized(INVALID_API_KEY, headers=API_KEY_CHALLENGE)
        key, owner_active = found
        reason = (
            "revoked" if key.revoked_at is not None
            else "expired" if key.expires_at is not None and key.expires_at <= now
            else "account disabled" if not owner_active
            else None
        )  # fmt: skip
        if reason is not None:
            log.info("api_key_rejected", reason=reason, key_id=str(key.id))
            raise Unauthorized(INVALID_API_KEY, headers=API_KEY_CHALLENGE)
        if len(self._verified) >= VERIFIED_KEYS_MAX_ENTRIES:
            del self._verified[next(iter(self._verified))]  # the oldest entry
        self._verified[digest] = _VerifiedKey(
            key.id, key.user_id, key.expires_at, time.monotonic() + VERIFIED_KEY_TTL_SECONDS
        )
        self._note_use(key.id, client)
        # Whatever the owner's role: a key alone never opens an admin route (guard.py refuses it there).
        return Principal(user_id=str(key.user_id), role="user", auth_method="api_key")

    def _note_use(self, key_id: uuid.UUID, client: str | None) -> None:
        now = time.monotonic()
        seen = self._marked.get(key_id)
        if seen is not None and now - seen < LAST_USED_INTERVAL_SECONDS:
            return
        if len(self._marked) >= MARKS_MAX_ENTRIES:
            # Forgetting only costs a Redis round trip per key, once, before the marker answers.
            self._marked.clear()
        self._marked[key_id] = now
        task = asyncio.create_task(self._record_use(key_id, client))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _record_use(self, key_id: uuid.UUID, client: str | None) -> None:
        """Writes ``last_used_at`` unless another replica did within the interval; the first use of a key
        goes to its owner's activity log."""
        try:
            marker = self.settings.key("apikeys", "used", str(key_id))
            if not await self.redis.set(marker, b"1", ex=LAST_USED_INTERVAL_SECONDS, nx=True):
                return
            now = utcnow()
            async with transaction(self.sessions) as session:
                first = await repository.touch_api_key(session, key_id, now)
                key = await session.get(ApiKey, key_id) if first else None
                if key is not None:
                    await repository.add_activity(
                        session, user_id=key.user_id, kind="api_key_first_used", client_address=client, now=now,
                        details={"key_id": str(key.id), "name": key.name, "prefix": key.prefix},
                    )  # fmt: skip
        except Exception as exc:
            # The request was served; only the "last used" time is late (the next interval writes it).
            self._marked.pop(key_id, None)
            log.warning("api_key_use_not_recorded", error=f"{type(exc).__name__}: {exc}")

    async def close(self) -> None:
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, timeout=5)
