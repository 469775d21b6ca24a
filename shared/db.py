"""Async SQLAlchemy engine and sessions (asyncpg)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Protocol

import structlog
from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine


def async_database_url(url: str) -> str:
    """Accept ``postgresql://`` / ``postgres://`` DSNs (as users and pgserver write them) and use asyncpg."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres", "postgresql+psycopg2", "postgresql+psycopg"):
        parsed = parsed.set(drivername="postgresql+asyncpg")
    return parsed.render_as_string(hide_password=False)


def create_engine(url: str, *, pool_size: int = 5, echo: bool = False) -> AsyncEngine:
    engine = create_async_engine(
        async_database_url(url),
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        pool_recycle=1800,
        echo=echo,
        # No JIT compilation: every statement here is short, and the planner's row estimates for the candle
        # reads (a LATERAL join per missing bucket) run into the millions, past jit_above_cost, so a read of
        # 7,300 daily candles spent 270 ms compiling for 25 ms of work.
        connect_args={"server_settings": {"jit": "off"}},
    )
    _log_new_connections(engine)
    return engine


def _log_new_connections(engine: AsyncEngine) -> None:
    """``db_connection_created`` for the system log each time the pool opens a connection (never the password)."""
    parsed = engine.url
    # A Unix-socket DSN (the embedded server) names its directory in the query, not as the host.
    socket_dir = parsed.query.get("host")
    host = parsed.host or (socket_dir if isinstance(socket_dir, str) else None) or "localhost"
    fields: dict[str, object] = {"host": host, "database": parsed.database}
    if parsed.port:
        fields["port"] = parsed.port
    log = structlog.get_logger("db")

    def connected(dbapi_connection: object, connection_record: object) -> None:
        log.info("db_connection_created", **fields)

    event.listen(engine.sync_engine, "connect", connected)


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


@asynccontextmanager
async def transaction(factory: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    """One unit of work: commits on success, rolls back on error. Side effects go after it returns."""
    async with factory() as session, session.begin():
        yield session


_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]*")


async def delete_older_than(
    session: AsyncSession,
    table: str,
    column: str,
    cutoff: datetime,
    batch: int,
    *,
    key: str = "id",
    where: str | None = None,
) -> int:
    """Deletes at most ``batch`` rows of ``table`` whose ``column`` is before ``cutoff``; returns how many.

    One bounded batch per call keeps each transaction short (see ``delete_in_batches`` for the loop). The
    rows are picked by ``key``, ``ctid`` for a table without an id, through ``= ANY(ARRAY(...))``: a key or
    TID lookup of just the picked rows, where ``IN (subquery)`` could be planned as a join over the table.
    ``where`` narrows the rows further (e.g. ``"interval = '1m'"``). Names and ``where`` are the callers'
    constants, never input; the names are checked all the same, as they are formatted into the SQL."""
    for name in (table, column, key):
        if not _IDENTIFIER.fullmatch(name):
            raise ValueError(f"not a plain SQL identifier: {name!r}")
    condition = f"{column} < :cutoff" + (f" AND ({where})" if where else "")
    sql = f"DELETE FROM {table} WHERE {key} = ANY(ARRAY(SELECT {key} FROM {table} WHERE {condition} LIMIT :batch))"  # noqa: S608 - checked constants only; values are bound
    result = await session.execute(text(sql), {"cutoff": cutoff, "batch": batch})
    return int(getattr(result, "rowcount", 0) or 0)


class BatchDelete(Protocol):
    async def __call__(self, session: AsyncSession, cutoff: datetime, batch: int) -> int: ...


async def delete_in_batches(
    sessions: async_sessionmaker[AsyncSession], delete: BatchDelete, cutoff: datetime, batch: int
) -> int:
    """Rows older than ``cutoff``, ``batch`` at a time, each batch its own short transaction (no long lock)."""
    total = 0
    while True:
        async with transaction(sessions) as session:
            count = await delete(session, cutoff, batch)
        total += count
        if count < batch:
            return total
