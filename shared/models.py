"""The one schema shared by every service; alembic's history in shared/migrations follows it.

Each table has one writer, named beside its model ("Written by"): only that service's repository inserts,
updates or deletes its rows. Another service reads it only through a read-only function of the writer's
repository, imported from there (e.g. ``services.pricing.coins.repository.active_coins``). Retention is a
write too: each writer expires its own tables in a scheduled job of its own worker."""

from __future__ import annotations

import uuid
from datetime import date, datetime
from decimal import Decimal

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Numeric,
    String,
    Text,
    Uuid,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Prices and volumes: NUMERIC without a fixed scale keeps every digit an exchange sends.
Amount = Numeric()


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Coin(Base):
    """Written by: pricing (seeded from COINLYTICS_COINS at startup, changed by /api/v1/admin/coins)."""

    __tablename__ = "coins"

    symbol: Mapped[str] = mapped_column(String(15), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(100))
    active: Mapped[bool] = mapped_column(Boolean, default=True, server_default="true")
    added_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Tick(Base):
    """Every normalised quote as it arrived; the key makes redelivered messages harmless.

    Written by: pricing (its tick consumer; ingest only publishes ticks to the stream)."""

    __tablename__ = "ticks"

    tick_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    source: Mapped[str] = mapped_column(String(50))
    base: Mapped[str] = mapped_column(String(15))
    quote: Mapped[str] = mapped_column(String(15))
    price: Mapped[Decimal] = mapped_column(Amount)
    bid: Mapped[Decimal | None] = mapped_column(Amount)
    ask: Mapped[Decimal | None] = mapped_column(Amount)
    volume_24h: Mapped[Decimal | None] = mapped_column(Amount)
    quote_volume_24h: Mapped[Decimal | None] = mapped_column(Amount)
    exchange_ts: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (Index("ix_ticks_base_quote_exchange_ts", "base", "quote", "exchange_ts"),)


class SourceQuote(Base):
    """The latest quote of each source for a pair, with how consolidation treated it. Written by: pricing."""

    __tablename__ = "source_quotes"

    source: Mapped[str] = mapped_column(String(50), primary_key=True)
    base: Mapped[str] = mapped_column(String(15), primary_key=True)
    quote: Mapped[str] = mapped_column(String(15), primary_key=True)
    pair: Mapped[str] = mapped_column(String(40))
    price: Mapped[Decimal] = mapped_column(Amount)
    bid: Mapped[Decimal | None] = mapped_column(Amount)
    ask: Mapped[Decimal | None] = mapped_column(Amount)
    volume_24h: Mapped[Decimal | None] = mapped_column(Amount)
    exchange_ts: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    tick_id: Mapped[str] = mapped_column(String(200))
    transport: Mapped[str] = mapped_column(String(10), default="rest", server_default="rest")
    status: Mapped[str] = mapped_column(String(10), default="used", server_default="used")


class Price(Base):
    """The latest consolidated price of a coin in one currency. Written by: pricing."""

    __tablename__ = "prices"

    base: Mapped[str] = mapped_column(String(15), primary_key=True)
    vs: Mapped[str] = mapped_column(String(15), primary_key=True)
    price: Mapped[Decimal] = mapped_column(Amount)
    volume_24h: Mapped[Decimal | None] = mapped_column(Amount)
    status: Mapped[str] = mapped_column(String(10))
    sources_used: Mapped[int] = mapped_column(Integer)
    sources_total: Mapped[int] = mapped_column(Integer)
    method: Mapped[str] = mapped_column(String(120))
    last_updated: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # Until when the quorum of fresh votes holds without new quotes (null while stale).
    fresh_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ErrorLog(Base):
    """Failures of sources and consumers, kept for /api/v1/admin/errors and /api/v1/status.

    Written by: ingest (exchanges and CoinGecko; it serves and expires the log). Sources run by other
    services (conversion's ECB job) report their failures on the source-errors stream, and ingest writes
    them here."""

    __tablename__ = "error_log"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    source: Mapped[str] = mapped_column(String(50), index=True)
    kind: Mapped[str] = mapped_column(String(50))
    message: Mapped[str] = mapped_column(Text)
    details: Mapped[dict | None] = mapped_column(JSONB)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(), index=True)


class SourceSetting(Base):
    """An administrator's runtime switch of one source (``PATCH /api/v1/admin/sources/{name}``). A source
    without a row runs when COINLYTICS_SOURCES names it; the row keeps a switched-off source off across
    restarts. Written by: ingest."""

    __tablename__ = "source_settings"

    name: Mapped[str] = mapped_column(String(50), primary_key=True)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True, server_default="true")
    # The administrator's subject (a local user id, or an external issuer's subject).
    changed_by: Mapped[str | None] = mapped_column(String(255))
    changed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


# --- Market data (issue: market data) -----------------------------------------------------------


class CoinMarketData(Base):
    """Metadata and market cap from CoinGecko, refreshed by a scheduled job. Written by: ingest."""

    __tablename__ = "coin_market_data"

    symbol: Mapped[str] = mapped_column(String(15), primary_key=True)
    coingecko_id: Mapped[str | None] = mapped_column(String(100))
    name: Mapped[str | None] = mapped_column(String(100))
    market_cap_usd: Mapped[Decimal | None] = mapped_column(Amount)
    circulating_supply: Mapped[Decimal | None] = mapped_column(Amount)
    total_supply: Mapped[Decimal | None] = mapped_column(Amount)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Candle(Base):
    """OHLCV per coin and currency. ``interval`` is '1m', '1h' or '1d'; coarser views aggregate these.

    Written by: pricing (live candles, roll-ups, retention, and ``coinlytics backfill`` through pricing's
    history package)."""

    __tablename__ = "candles"

    base: Mapped[str] = mapped_column(String(15), primary_key=True)
    vs: Mapped[str] = mapped_column(String(15), primary_key=True)
    interval: Mapped[str] = mapped_column(String(4), primary_key=True)
    t: Mapped[datetime] = mapped_column(DateTime(timezone=True), primary_key=True)
    open: Mapped[Decimal] = mapped_column(Amount)
    high: Mapped[Decimal] = mapped_column(Amount)
    low: Mapped[Decimal] = mapped_column(Amount)
    close: Mapped[Decimal] = mapped_column(Amount)
    volume: Mapped[Decimal | None] = mapped_column(Amount)
    source: Mapped[str] = mapped_column(String(50), default="consolidated", server_default="consolidated")
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    # Times of the first and last consolidated price in a live candle (null for exchange candles).
    first_ts: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_ts: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (Index("ix_candles_interval_t", "interval", "t"),)


class BackfillProgress(Base):
    """How far a backfill got per coin, currency, source and interval: [oldest, newest) is loaded, so a
    rerun resumes instead of starting over. Written by: pricing (its backfill)."""

    __tablename__ = "backfill_progress"

    base: Mapped[str] = mapped_column(String(15), primary_key=True)
    vs: Mapped[str] = mapped_column(String(15), primary_key=True)
    source: Mapped[str] = mapped_column(String(50), primary_key=True)
    interval: Mapped[str] = mapped_column(String(4), primary_key=True, server_default="1d")
    oldest: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    newest: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


# --- Fiat rates and conversion (issue: conversion) ----------------------------------------------


class FiatRate(Base):
    """ECB euro reference rates: units of ``currency`` per 1 EUR on ``day`` (working days only).

    Written by: conversion."""

    __tablename__ = "fiat_rates"

    currency: Mapped[str] = mapped_column(String(3), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    per_eur: Mapped[Decimal] = mapped_column(Amount)
    source: Mapped[str] = mapped_column(String(20), default="ecb", server_default="ecb")
    # When the rate was last confirmed by a fetch: rates stay current between working days as long as
    # the job keeps succeeding, so freshness is judged by this, not by ``day``.
    fetched_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class RateSnapshot(Base):
    """The full rate table as it was at ``taken_at`` (against ``base``), so past conversions reproduce.

    Written by: conversion."""

    __tablename__ = "rate_snapshots"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    taken_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    base: Mapped[str] = mapped_column(String(15))
    rates: Mapped[dict] = mapped_column(JSONB)


# --- Accounts (issue: accounts and gateway security) --------------------------------------------


class User(Base):
    """Written by: gateway (accounts; ``coinlytics create-admin`` goes through the gateway's AuthService)."""

    __tablename__ = "users"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(10), default="user", server_default="user")
    vs_currency: Mapped[str] = mapped_column(String(15), default="USD", server_default="USD")
    watchlist: Mapped[list[str]] = mapped_column(ARRAY(String(15)), default=list, server_default="{}")
    is_active: Mapped[bool] = mapped_column(Boolean, default=True, server_default="true")
    password_changed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    __table_args__ = (CheckConstraint("role IN ('user', 'admin')", name="role"),)


class RefreshToken(Base):
    """One issued refresh token; tokens rotated from one login share a family (reuse revokes it).

    Written by: gateway."""

    __tablename__ = "refresh_tokens"

    jti: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("users.id", ondelete="CASCADE"), index=True)
    family_id: Mapped[str] = mapped_column(String(64), index=True)
    issued_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class PasswordResetToken(Base):
    """Written by: gateway."""

    __tablename__ = "password_reset_tokens"

    token_hash: Mapped[str] = mapped_column(String(128), primary_key=True)
    user_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("users.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class UserActivity(Base):
    """Written by: gateway."""

    __tablename__ = "user_activity"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    user_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("users.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(50))
    details: Mapped[dict | None] = mapped_column(JSONB)
    client_address: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(), index=True)

    __table_args__ = (Index("ix_user_activity_user_id_id", "user_id", "id"),)


class ApiKey(Base):
    """A personal API key: only the SHA-256 of its secret (256 random bits, so no slow hash is needed) and a
    short prefix to recognise it by are kept; the secret itself is shown once, at creation.

    Written by: gateway."""

    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    user_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class PriceOutbox(Base):
    """Price events committed with the consolidation that produced them, until relayed to the prices stream:
    a publish that fails after commit is retried from here, never lost. Written by: pricing."""

    __tablename__ = "price_outbox"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(36), unique=True)
    payload: Mapped[dict] = mapped_column(JSONB)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Alert(Base):
    """A user's alert rule. ``channels`` is the list of delivery targets as given (a webhook's ``secret``,
    returned once at creation, is kept here for signing). Written by: alerting."""

    __tablename__ = "alerts"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    user_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("users.id", ondelete="CASCADE"), index=True)
    symbol: Mapped[str] = mapped_column(String(15))
    vs: Mapped[str] = mapped_column(String(15))
    condition: Mapped[str] = mapped_column(String(20))
    threshold: Mapped[Decimal] = mapped_column(Amount)
    window_minutes: Mapped[int | None] = mapped_column(Integer)
    channels: Mapped[list[dict]] = mapped_column(JSONB)
    cooldown_seconds: Mapped[int] = mapped_column(Integer, default=300, server_default="300")
    one_shot: Mapped[bool] = mapped_column(Boolean, default=False, server_default="false")
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    paused: Mapped[bool] = mapped_column(Boolean, default=False, server_default="false")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    last_fired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (Index("ix_alerts_symbol_vs", "symbol", "vs"),)


class AlertEvent(Base):
    """One trigger of an alert, stored before anything is sent. Written by: alerting."""

    __tablename__ = "alert_events"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    alert_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("alerts.id", ondelete="CASCADE"))
    user_id: Mapped[uuid.UUID] = mapped_column(Uuid, index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    price: Mapped[Decimal] = mapped_column(Amount)
    payload: Mapped[dict] = mapped_column(JSONB)

    __table_args__ = (Index("ix_alert_events_alert_id_created_at", "alert_id", "created_at"),)


class AlertDelivery(Base):
    """An event's delivery to one of its alert's channels (by position in ``channels``).
    Written by: alerting."""

    __tablename__ = "alert_deliveries"

    event_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("alert_events.id", ondelete="CASCADE"), primary_key=True
    )
    channel_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    type: Mapped[str] = mapped_column(String(20))
    status: Mapped[str] = mapped_column(String(20), default="pending", server_default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    last_error: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        Index(
            "ix_alert_deliveries_unfinished",
            "updated_at",
            postgresql_where=text("status IN ('pending', 'retrying')"),
        ),
    )


class Comparison(Base):
    """A user's saved comparison: a named set of coins, a currency and a range, re-run on demand. The range
    is either relative (``period``, such as ``30d``: the last 30 days at each run) or fixed (``start`` and
    ``end``). Written by: analytics."""

    __tablename__ = "comparisons"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    user_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    symbols: Mapped[list[str]] = mapped_column(ARRAY(String(15)))
    vs: Mapped[str] = mapped_column(String(15))
    period: Mapped[str | None] = mapped_column(String(10))
    start: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    end: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    interval: Mapped[str] = mapped_column(String(4), default="auto", server_default="auto")
    benchmark: Mapped[str | None] = mapped_column(String(15))
    risk_free_rate: Mapped[Decimal] = mapped_column(Amount, default=Decimal(0), server_default="0")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    __table_args__ = (Index("uq_comparisons_user_id_name", "user_id", "name", unique=True),)
