"""Alert rules: the checks no schema can state, storage, and what follows each committed change (the
change event for the engine, the user's activity log, the Redis expiry key)."""

from __future__ import annotations

import base64
import math
import secrets
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.alerting import repository
from services.alerting.channels.mail import read_unsubscribe_token, recipient_key, token_target
from services.alerting.schemas import PCT_CONDITIONS, AlertPatch, PctChangeAlertIn, PriceAlertIn, SpreadAlertIn
from services.alerting.ssrf import private_target
from services.gateway.activity import USER_ACTIVITY_STREAM, ActivityMessage
from services.pricing.coins.repository import active_coins
from shared.db import transaction
from shared.errors import NotFound, UnknownCurrency, UnknownSymbol, ValidationFailed
from shared.models import Alert
from shared.settings import Settings
from shared.streams import StreamPublisher

log = structlog.get_logger("alerting")

# {"id", "action": created|updated|paused|resumed|deleted, "user_id", "symbol", "vs"}, after commit: what
# the evaluation engine follows to keep its rules in sync.
ALERT_CHANGES_STREAM = "alert-changes"
# Expired alerts are kept (listed as "expired") this long, then the cleanup job deletes them.
EXPIRED_KEPT_FOR = timedelta(days=1)
CLEANUP_BATCH = 1000
# The key an email's unsubscribe link is signed with (settings.purpose_key).
UNSUBSCRIBE_PURPOSE = "alert-unsubscribe"

AlertIn = PriceAlertIn | PctChangeAlertIn | SpreadAlertIn


def new_webhook_secret() -> str:
    """A Standard Webhooks endpoint secret: "whsec_" and the base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def alert_status(alert: Alert, now: datetime) -> str:
    if alert.expires_at is not None and alert.expires_at <= now:
        return "expired"
    if alert.paused:
        return "paused"
    # A one-shot alert that fired is done until resumed (which re-arms it).
    return "fired" if alert.one_shot and alert.last_fired_at is not None else "active"


def alert_body(alert: Alert, now: datetime, *, reveal: frozenset[int] = frozenset()) -> dict[str, Any]:
    """The API's view of an alert; a webhook's secret only for the channel positions in ``reveal``."""
    channels = []
    for index, channel in enumerate(alert.channels):
        shown = {k: v for k, v in channel.items() if k != "secret"}
        if index in reveal:
            shown["secret"] = channel.get("secret")
        channels.append(shown)
    return {
        "id": str(alert.id),
        "symbol": alert.symbol,
        "vs": alert.vs,
        "condition": alert.condition,
        "threshold": alert.threshold,
        "window_minutes": alert.window_minutes,
        "channels": channels,
        "cooldown_seconds": alert.cooldown_seconds,
        "one_shot": alert.one_shot,
        "expires_at": alert.expires_at,
        "paused": alert.paused,
        "status": alert_status(alert, now),
        "created_at": alert.created_at,
        "updated_at": alert.updated_at,
        "last_fired_at": alert.last_fired_at,
    }


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class AlertService:
    def __init__(
        self, settings: Settings, sessions: async_sessionmaker[AsyncSession], redis: Redis, publisher: StreamPublisher
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.redis = redis
        self.publisher = publisher

    # --- the rules a schema can't state --------------------------------------------------------

    async def _check_market(self, session: AsyncSession, symbol: str, vs: str) -> None:
        if symbol not in await active_coins(session):
            raise UnknownSymbol(f"unknown coin: {symbol} (not tracked)")
        if vs not in self.settings.vs_currencies:
            known = ", ".join(self.settings.vs_currencies)
            raise UnknownCurrency(f"unknown currency: {vs} (prices are published in {known})")

    def _check_expiry(self, expires_at: datetime | None, now: datetime) -> datetime | None:
        if expires_at is None:
            return None
        expires_at = _utc(expires_at)
        if expires_at <= now:
            raise ValidationFailed("expires_at must be in the future", details={"expires_at": expires_at.isoformat()})
        return expires_at

    async def _channels(self, given: list[dict[str, Any]], kept: list[dict[str, Any]]) -> tuple[list[dict], set[int]]:
        """The channels to store, and the positions of webhooks given a new secret. A webhook URL already
        among ``kept`` keeps its secret: it is the same endpoint."""
        secrets_by_url = {c["url"]: c["secret"] for c in kept if c.get("type") == "webhook" and c.get("secret")}
        stored: list[dict[str, Any]] = []
        fresh: set[int] = set()
        for index, channel in enumerate(given):
            where = f"channels.{index}"
            if channel["type"] == "email" and not self.settings.smtp_url:
                raise ValidationFailed(f"{where}: email channel is not configured (COINLYTICS_SMTP_URL)")
            if channel["type"] == "sms" and not self.settings.sms_url:
                raise ValidationFailed(f"{where}: sms channel is not configured (COINLYTICS_SMS_URL)")
            if channel["type"] == "webhook":
                if not self.settings.webhook_allow_private:
                    reason = await private_target(channel["url"])
                    if reason is not None:
                        raise ValidationFailed(
                            f"{where}.url: webhooks must target a public address: {reason}",
                            details={"url": channel["url"]},
                        )
                secret = secrets_by_url.get(channel["url"])
                if secret is None:
                    secret = new_webhook_secret()
                    fresh.add(index)
                channel = {**channel, "secret": secret}
            stored.append(channel)
        return stored, fresh

    # --- reads ---------------------------------------------------------------------------------

    async def list_alerts(self, user_id: str, *, page: int, per_page: int) -> dict[str, Any]:
        owner = uuid.UUID(user_id)
        async with self.sessions() as session:
            total = await repository.count_alerts(session, owner)
            rows = await repository.user_alerts(session, owner, limit=per_page, offset=(page - 1) * per_page)
        now = datetime.now(UTC)
        return {"items": [alert_body(a, now) for a in rows], "total": total, "page": page, "per_page": per_page}

    async def get(self, user_id: str, alert_id: uuid.UUID) -> dict[str, Any]:
        async with self.sessions() as session:
            alert = await self._own(session, user_id, alert_id)
        return alert_body(alert, datetime.now(UTC))

    async def events(self, user_id: str, alert_id: uuid.UUID, *, limit: int) -> dict[str, Any]:
        async with self.sessions() as session:
            await self._own(session, user_id, alert_id)
            rows = await repository.alert_events(session, alert_id, limit=limit)
        items = [
            {
                "id": str(event.id),
                "created_at": event.created_at,
                "condition": event.payload.get("condition"),
                "threshold": event.payload.get("threshold"),
                "value": event.payload.get("value"),
                "price": event.price,
                "price_at": event.payload.get("price_at"),
                "deliveries": [
                    {
                        "channel": d.channel_index,
                        "type": d.type,
                        "status": d.status,
                        "attempts": d.attempts,
                        "last_error": d.last_error,
                        "next_attempt_at": d.next_attempt_at,
                        "delivered_at": d.delivered_at,
                    }
                    for d in deliveries
                ],
            }
            for event, deliveries in rows
        ]
        return {"items": items}

    async def _own(self, session: AsyncSession, user_id: str, alert_id: uuid.UUID, *, lock: bool = False) -> Alert:
        alert = await repository.user_alert(session, uuid.UUID(user_id), alert_id, lock=lock)
        if alert is None:
            # Another user's alert is as unknown as one that never existed.
            raise NotFound(f"no such alert: {alert_id}")
        return alert

    # --- changes -------------------------------------------------------------------------------

    async def create(self, user_id: str, body: AlertIn, client: str | None) -> dict[str, Any]:
        owner = uuid.UUID(user_id)
        now = datetime.now(UTC)
        expires_at = self._check_expiry(body.expires_at, now)
        channels, fresh = await self._channels([c.model_dump() for c in body.channels], [])
        async with transaction(self.sessions) as session:
            await self._check_market(session, body.symbol, body.vs)
            await repository.lock_user_alerts(session, owner)
            limit = self.settings.alerts_max_per_user
            if await repository.count_alerts(session, owner) >= limit:
                raise ValidationFailed(
                    f"you already have {limit} alerts, the most allowed (COINLYTICS_ALERTS_MAX_PER_USER); "
                    "delete one first"
                )
            alert = await repository.add_alert(
                session,
                id=uuid.uuid4(),
                user_id=owner,
                symbol=body.symbol,
                vs=body.vs,
                condition=body.condition,
                threshold=body.threshold,
                window_minutes=body.window_minutes if isinstance(body, PctChangeAlertIn) else None,
                channels=channels,
                cooldown_seconds=body.cooldown_seconds,
                one_shot=body.one_shot,
                expires_at=expires_at,
                paused=False,
                created_at=now,
                updated_at=now,
            )
        await self._after_change(alert, "created", client, now)
        return alert_body(alert, now, reveal=frozenset(fresh))

    async def update(self, user_id: str, alert_id: uuid.UUID, patch: AlertPatch, client: str | None) -> dict[str, Any]:
        now = datetime.now(UTC)
        given = patch.model_fields_set
        async with transaction(self.sessions) as session:
            alert = await self._own(session, user_id, alert_id, lock=True)
            # null leaves a field as it is, except where null means something: no expiry, no window.
            values: dict[str, Any] = {
                name: getattr(patch, name)
                for name in ("symbol", "vs", "condition", "threshold", "cooldown_seconds", "one_shot", "paused")
                if name in given and getattr(patch, name) is not None
            }
            condition = values.get("condition", alert.condition)
            window = patch.window_minutes if "window_minutes" in given else alert.window_minutes
            if condition in PCT_CONDITIONS:
                if window is None:
                    raise ValidationFailed(f"window_minutes (1 to 10080) is required for {condition}")
            elif "window_minutes" in given and window is not None:
                raise ValidationFailed("window_minutes applies only to pct_change_up and pct_change_down")
            else:
                window = None
            values["window_minutes"] = window
            if "expires_at" in given:
                values["expires_at"] = self._check_expiry(patch.expires_at, now)
            fresh: set[int] = set()
            if patch.channels is not None:
                values["channels"], fresh = await self._channels(
                    [c.model_dump() for c in patch.channels], alert.channels
                )
            if "symbol" in values or "vs" in values:
                await self._check_market(session, values.get("symbol", alert.symbol), values.get("vs", alert.vs))
            pausing = values.get("paused", alert.paused) != alert.paused
            only_pause = pausing and all(values[name] == getattr(alert, name) for name in values if name != "paused")
            changed = sorted(name for name in values if values[name] != getattr(alert, name))
            values["updated_at"] = now
            await repository.update_alert(session, alert, values)
        action = ("paused" if alert.paused else "resumed") if only_pause else "updated"
        await self._after_change(alert, action, client, now, fields=changed)
        return alert_body(alert, now, reveal=frozenset(fresh))

    async def set_paused(self, user_id: str, alert_id: uuid.UUID, paused: bool, client: str | None) -> dict[str, Any]:
        now = datetime.now(UTC)
        async with transaction(self.sessions) as session:
            alert = await self._own(session, user_id, alert_id, lock=True)
            rearm = not paused and alert.one_shot and alert.last_fired_at is not None
            changed = alert.paused != paused or rearm
            if changed:
                values: dict[str, Any] = {"paused": paused, "updated_at": now}
                if rearm:
                    values["last_fired_at"] = None
                await repository.update_alert(session, alert, values)
        if changed:
            await self._after_change(alert, "paused" if paused else "resumed", client, now)
        return alert_body(alert, now)

    async def delete(self, user_id: str, alert_id: uuid.UUID, client: str | None) -> None:
        now = datetime.now(UTC)
        async with transaction(self.sessions) as session:
            alert = await self._own(session, user_id, alert_id, lock=True)
            await repository.delete_alert(session, alert)
        await self._after_change(alert, "deleted", client, now)

    async def delete_expired(self) -> int:
        """Deletes alerts expired more than EXPIRED_KEPT_FOR ago (the backstop to the Redis expiry keys)."""
        removed = 0
        while True:
            now = datetime.now(UTC)
            async with transaction(self.sessions) as session:
                gone = await repository.delete_expired(session, now - EXPIRED_KEPT_FOR, CLEANUP_BATCH)
            for alert_id, owner in gone:
                await self._announce(
                    alert_id, owner, "deleted", None, now, {"alert_id": str(alert_id), "reason": "expired"}
                )
            removed += len(gone)
            if len(gone) < CLEANUP_BATCH:
                return removed

    async def unsubscribe(self, token: str, client: str | None) -> dict[str, Any]:
        """The email link's action: that alert's email channel stops (no sign-in; the token is the proof)."""
        invalid = "this unsubscribe link is not valid: it was altered or cut short"
        claimed = token_target(token)
        if claimed is None:
            raise ValidationFailed(invalid)
        alert_id, index = claimed
        now = datetime.now(UTC)
        async with transaction(self.sessions) as session:
            alert = await repository.alert_by_id(session, alert_id, lock=True)
            channel = alert.channels[index] if alert is not None and index < len(alert.channels) else None
            if alert is None or channel is None or channel.get("type") != "email":
                raise NotFound("this alert or its email channel no longer exists: nothing more will be sent")
            # Signed for the address it was sent to: an old link can't stop mail to a new address.
            key = recipient_key(self.settings.purpose_key(UNSUBSCRIBE_PURPOSE), str(channel.get("to", "")))
            if read_unsubscribe_token(key, token) != claimed:
                raise ValidationFailed(invalid)
            already = bool(channel.get("disabled"))
            if not already:
                await repository.disable_channel(session, alert_id, index, "unsubscribed by the recipient")
        if not already:
            await self.announce_channel_disabled(alert, index, now, client=client)
        return {"alert_id": str(alert_id), "channel": index, "to": channel.get("to"), "unsubscribed": True}

    async def announce_channel_disabled(
        self, alert: Alert, index: int, now: datetime, *, client: str | None = None
    ) -> None:
        channel = alert.channels[index]
        details = {
            "alert_id": str(alert.id),
            "channel": index,
            "type": channel.get("type"),
            "reason": channel.get("disabled_reason"),
        }
        await self._announce(
            alert.id, alert.user_id, "channel_disabled", client, now, details, symbol=alert.symbol, vs=alert.vs
        )

    # --- after commit --------------------------------------------------------------------------

    async def _after_change(
        self, alert: Alert, action: str, client: str | None, now: datetime, *, fields: list[str] | None = None
    ) -> None:
        details: dict[str, Any] = {
            "alert_id": str(alert.id),
            "symbol": alert.symbol,
            "vs": alert.vs,
            "condition": alert.condition,
        }
        if fields is not None:
            details["fields"] = fields
        await self._sync_expiry_key(alert, action, now)
        await self._announce(alert.id, alert.user_id, action, client, now, details, symbol=alert.symbol, vs=alert.vs)

    async def _announce(
        self,
        alert_id: uuid.UUID,
        owner: uuid.UUID,
        action: str,
        client: str | None,
        now: datetime,
        details: dict[str, Any],
        *,
        symbol: str | None = None,
        vs: str | None = None,
    ) -> None:
        # The change is committed and stands whatever happens here; a lost message is logged, not raised.
        change = {"id": str(alert_id), "action": action, "user_id": str(owner), "symbol": symbol, "vs": vs}
        activity = ActivityMessage(
            id=uuid.uuid4().hex,
            user_id=owner,
            kind=f"alert_{action}",
            details=details,
            client_address=(client or None) and client[:64],
            at=now,
        )
        try:
            await self.publisher.publish(ALERT_CHANGES_STREAM, change)
        except Exception as exc:
            log.error(
                "alert_change_not_published",
                alert_id=str(alert_id),
                action=action,
                error=f"{type(exc).__name__}: {exc}",
            )
        try:
            await self.publisher.publish(USER_ACTIVITY_STREAM, activity.to_stream())
        except Exception as exc:
            log.error(
                "activity_not_published", alert_id=str(alert_id), action=action, error=f"{type(exc).__name__}: {exc}"
            )

    def expiry_key(self, alert_id: uuid.UUID) -> str:
        return self.settings.key("alert", "expiry", str(alert_id))

    async def _sync_expiry_key(self, alert: Alert, action: str, now: datetime) -> None:
        """``<ns>:alert:expiry:<id>`` lives until the alert expires; the cleanup job is the backstop."""
        key = self.expiry_key(alert.id)
        try:
            if action == "deleted" or alert.expires_at is None:
                await self.redis.delete(key)
            else:
                ttl = math.ceil((alert.expires_at - now).total_seconds())
                if ttl > 0:
                    await self.redis.set(key, str(alert.user_id), ex=ttl)
        except Exception as exc:
            log.warning("alert_expiry_key_not_set", alert_id=str(alert.id), error=f"{type(exc).__name__}: {exc}")
