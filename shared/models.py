"""The one schema shared by every service; alembic's history in shared/migrations follows it."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Index,
    Integer,
    MetaData,
    Numeric,
    String,
    Text,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB
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
    __tablename__ = "coins"

    symbol: Mapped[str] = mapped_column(String(15), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(100))
    active: Mapped[bool] = mapped_column(Boolean, default=True, server_default="true")
    added_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Tick(Base):
    """Every normalised quote as it arrived; the key makes redelivered messages harmless."""

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
    """The latest quote of each source for a pair, with how consolidation treated it."""

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
    status: Mapped[str] = mapped_column(String(10), default="used", server_default="used")


class Price(Base):
    """The latest consolidated price of a coin in one currency."""

    __tablename__ = "prices"

    base: Mapped[str] = mapped_column(String(15), primary_key=True)
    vs: Mapped[str] = mapped_column(String(15), primary_key=True)
    price: Mapped[Decimal] = mapped_column(Amount)
    volume_24h: Mapped[Decimal | None] = mapped_column(Amount)
    status: Mapped[str] = mapped_column(String(10))
    sources_used: Mapped[int] = mapped_column(Integer)
    sources_total: Mapped[int] = mapped_column(Integer)
    method: Mapped[str] = mapped_column(String(40))
    last_updated: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ErrorLog(Base):
    """Failures of sources and consumers, kept for /api/v1/admin/errors and /api/v1/status."""

    __tablename__ = "error_log"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    source: Mapped[str] = mapped_column(String(50), index=True)
    kind: Mapped[str] = mapped_column(String(50))
    message: Mapped[str] = mapped_column(Text)
    details: Mapped[dict | None] = mapped_column(JSONB)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(), index=True)
