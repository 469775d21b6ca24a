"""All SQL of the pricing service."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from decimal import Decimal
from typing import Any

from sqlalchemy import delete, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from services.conversion.repository import latest_fiat_rates as latest_fiat_rates
from shared.messages import TickMessage
from shared.models import Coin, Price, PriceOutbox, SourceQuote

TICK_COLUMNS = (
    "tick_id", "source", "base", "quote", "price", "bid", "ask", "volume_24h", "quote_volume_24h",
    "exchange_ts", "received_at",
)  # fmt: skip


async def insert_ticks(session: AsyncSession, ticks: Sequence[TickMessage]) -> set[str]:
    """Store ticks; returns the ids that were new (a redelivered tick is not applied twice).

    Rows go in with COPY into a per-connection staging table, then one INSERT ... ON CONFLICT DO NOTHING:
    the idempotent write without building a statement with thousands of bind parameters."""
    if not ticks:
        return set()
    connection = await session.connection()
    # Through SQLAlchemy first: that opens the session's transaction on the connection, so the driver-level
    # COPY below belongs to it (a tick must not commit unless the quotes and prices it changes do).
    await connection.exec_driver_sql(
        "CREATE TEMP TABLE IF NOT EXISTS tick_stage (LIKE ticks INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
    )
    raw = await connection.get_raw_connection()
    driver = raw.driver_connection
    assert driver is not None
    records = [tuple(getattr(t, column) for column in TICK_COLUMNS) for t in ticks]
    await driver.copy_records_to_table("tick_stage", records=records, columns=TICK_COLUMNS)
    columns = ", ".join(TICK_COLUMNS)
    rows = await driver.fetch(
        f"INSERT INTO ticks ({columns}) SELECT DISTINCT ON (tick_id) {columns} FROM tick_stage "  # noqa: S608
        "ON CONFLICT (tick_id) DO NOTHING RETURNING tick_id"
    )
    return {r["tick_id"] for r in rows}


async def upsert_source_quotes(session: AsyncSession, ticks: Iterable[TickMessage]) -> None:
    """Keep each source's latest quote per pair; an older tick arriving late changes nothing."""
    latest: dict[tuple[str, str, str], TickMessage] = {}
    for t in ticks:
        key = (t.source, t.base, t.quote)
        if key not in latest or t.exchange_ts > latest[key].exchange_ts:
            latest[key] = t
    if not latest:
        return
    rows = [
        {
            "source": t.source,
            "base": t.base,
            "quote": t.quote,
            "pair": t.pair,
            "price": t.price,
            "bid": t.bid,
            "ask": t.ask,
            "volume_24h": t.volume_24h,
            "exchange_ts": t.exchange_ts,
            "received_at": t.received_at,
            "tick_id": t.tick_id,
            "transport": t.transport,
            "status": "used",
        }
        for t in latest.values()
    ]
    # Parameters passed separately (executemany): the statement compiles once and is cached, and
    # SQLAlchemy batches the rows into multi-row VALUES itself. Inlining them with .values(rows) cost a
    # fresh compile of thousands of bind parameters per batch.
    # In one order for every writer, as prices are (upsert_prices): rows locked in different orders deadlock.
    rows.sort(key=lambda r: (r["source"], r["base"], r["quote"]))
    await session.execute(_QUOTE_UPSERT, rows)


def _quote_upsert() -> Any:
    stmt = insert(SourceQuote)
    keys = ("source", "base", "quote", "status")
    return stmt.on_conflict_do_update(
        index_elements=[SourceQuote.source, SourceQuote.base, SourceQuote.quote],
        set_={c.name: stmt.excluded[c.name] for c in SourceQuote.__table__.columns if c.name not in keys},
        where=stmt.excluded.exchange_ts > SourceQuote.exchange_ts,
    )


def _price_upsert() -> Any:
    stmt = insert(Price)
    return stmt.on_conflict_do_update(
        index_elements=[Price.base, Price.vs],
        set_={c.name: stmt.excluded[c.name] for c in Price.__table__.columns if c.name not in ("base", "vs")},
        # Like the quote upsert's guard: a refresh computed from quotes read before a newer consolidation
        # committed must not put the older price back. Equal times pass (a status change of the same quotes).
        where=stmt.excluded.last_updated >= Price.last_updated,
    ).returning(Price.base, Price.vs)


_QUOTE_UPSERT = _quote_upsert()
_PRICE_UPSERT = _price_upsert()


async def load_quotes(session: AsyncSession, bases: Iterable[str]) -> list[SourceQuote]:
    result = await session.scalars(select(SourceQuote).where(SourceQuote.base.in_(list(bases))))
    return list(result.all())


async def set_quote_statuses(session: AsyncSession, statuses: dict[tuple[str, str, str], str]) -> None:
    """One statement for all quotes: only rows whose status changed are written."""
    if not statuses:
        return
    keys = sorted(statuses)  # one lock order for every writer (see upsert_quotes)
    await session.execute(
        text(
            "UPDATE source_quotes AS s SET status = u.status "
            "FROM unnest(CAST(:sources AS text[]), CAST(:bases AS text[]), CAST(:quotes AS text[]), "
            "CAST(:statuses AS text[])) AS u(source, base, quote, status) "
            "WHERE s.source = u.source AND s.base = u.base AND s.quote = u.quote AND s.status <> u.status"
        ),
        {
            "sources": [k[0] for k in keys],
            "bases": [k[1] for k in keys],
            "quotes": [k[2] for k in keys],
            "statuses": [statuses[k] for k in keys],
        },
    )


async def stablecoin_usd_rates(session: AsyncSession, stablecoins: Iterable[str]) -> dict[str, Decimal]:
    """Measured USD value of each stablecoin that has a fresh consolidated USD price of its own."""
    result = await session.execute(
        select(Price.base, Price.price).where(
            Price.base.in_(list(stablecoins)), Price.vs == "USD", Price.status == "fresh"
        )
    )
    return {row[0]: row[1] for row in result.all()}


async def quotes_for(session: AsyncSession, base: str) -> list[SourceQuote]:
    result = await session.scalars(
        select(SourceQuote).where(SourceQuote.base == base).order_by(SourceQuote.source, SourceQuote.quote)
    )
    return list(result.all())


async def get_price(session: AsyncSession, base: str, vs: str) -> Price | None:
    return await session.get(Price, (base, vs))


async def tracked_symbols(session: AsyncSession) -> list[str]:
    result = await session.scalars(select(Coin.symbol).where(Coin.active.is_(True)).order_by(Coin.symbol))
    return list(result.all())


async def upsert_prices(session: AsyncSession, prices: Sequence[dict[str, object]]) -> set[tuple[str, str]]:
    """Write consolidated prices; returns the (base, vs) keys actually written (not older than the stored)."""
    if not prices:
        return set()
    # One order for every writer (consolidation, the freshness refresh, other shards' relays): rows locked in
    # different orders by two transactions deadlocked under the freshness bench.
    ordered = sorted(prices, key=lambda p: (str(p["base"]), str(p["vs"])))
    result = await session.execute(_PRICE_UPSERT, ordered)
    return {(row[0], row[1]) for row in result.all()}


async def add_outbox(session: AsyncSession, events: Sequence[tuple[str, dict[str, Any]]]) -> None:
    """Price events, in the transaction that produced them (relayed to the stream after commit)."""
    if events:
        await session.execute(insert(PriceOutbox), [{"event_id": e, "payload": p} for e, p in events])


# Any constant works; it names "the one relay of price events" across all pricing processes.
OUTBOX_RELAY_LOCK = 0x636C_7072_6963_6501


async def claim_outbox(session: AsyncSession, limit: int) -> list[PriceOutbox]:
    """The oldest unrelayed events, with the relay lock held until this transaction ends: one relay at a
    time publishes, in commit order, so a newer price never overtakes an older one on the stream."""
    await session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": OUTBOX_RELAY_LOCK})
    result = await session.scalars(select(PriceOutbox).order_by(PriceOutbox.id).limit(limit))
    return list(result.all())


async def delete_outbox(session: AsyncSession, ids: Sequence[int]) -> None:
    if ids:
        await session.execute(delete(PriceOutbox).where(PriceOutbox.id.in_(list(ids))))


async def oldest_outbox_age(session: AsyncSession) -> float | None:
    """Seconds the oldest unrelayed event has waited, or None when the outbox is empty."""
    value = (
        await session.execute(text("SELECT EXTRACT(EPOCH FROM now() - min(created_at)) FROM price_outbox"))
    ).scalar_one()
    return None if value is None else float(value)


async def get_prices(session: AsyncSession, bases: Iterable[str], vs: Iterable[str]) -> list[Price]:
    result = await session.scalars(select(Price).where(Price.base.in_(list(bases)), Price.vs.in_(list(vs))))
    return list(result.all())


async def prices_of(session: AsyncSession, bases: Iterable[str]) -> list[Price]:
    result = await session.scalars(select(Price).where(Price.base.in_(list(bases))))
    return list(result.all())


async def known_symbols(session: AsyncSession, symbols: Iterable[str]) -> set[str]:
    wanted = list(symbols)
    tracked = await session.scalars(select(Coin.symbol).where(Coin.symbol.in_(wanted)))
    priced = await session.scalars(select(Price.base).where(Price.base.in_(wanted)).distinct())
    return set(tracked.all()) | set(priced.all())


async def known_currencies(session: AsyncSession) -> set[str]:
    result = await session.scalars(select(Price.vs).distinct())
    return set(result.all())


async def seed_coins(session: AsyncSession, symbols: Iterable[str]) -> None:
    rows = [{"symbol": s} for s in symbols]
    if rows:
        await session.execute(insert(Coin).values(rows).on_conflict_do_nothing(index_elements=[Coin.symbol]))


# -- Read by other services (conversion's rate graph): the owner's read-only functions, imported from here. --


async def all_prices(session: AsyncSession) -> list[Price]:
    result = await session.scalars(select(Price))
    return list(result.all())


async def stablecoin_quotes(session: AsyncSession, stablecoins: Iterable[str]) -> list[SourceQuote]:
    result = await session.scalars(select(SourceQuote).where(SourceQuote.quote.in_(list(stablecoins))))
    return list(result.all())


async def candle_currencies(session: AsyncSession, bases: Iterable[str]) -> set[tuple[str, str]]:
    """The (coin, currency) pairs priced now; their candles are the ones worth probing."""
    wanted = list(bases)
    result = await session.execute(select(Price.base, Price.vs).where(Price.base.in_(wanted)))
    return {(row[0], row[1]) for row in result.all()}


_SOURCE_PRICES_SQL = text(
    "SELECT source, quote, date_bin(make_interval(secs => :step), exchange_ts, TIMESTAMPTZ '1970-01-01 00:00:00+00') "
    "AS t, (array_agg(price ORDER BY exchange_ts DESC))[1] AS price "
    "FROM ticks WHERE base = :base AND quote = ANY(:quotes) AND exchange_ts >= :lo AND exchange_ts < :hi "
    "GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
)


async def source_prices(
    session: AsyncSession, base: str, quotes: Sequence[str], step_seconds: int, lo: Any, hi: Any
) -> list[dict[str, Any]]:
    """Each source's last traded price per ``step_seconds`` bucket of [lo, hi), for the given quote currencies
    (raw ticks: kept for COINLYTICS_RETENTION_TICKS_HOURS). Read-only; for the analytics sources chart."""
    result = await session.execute(
        _SOURCE_PRICES_SQL, {"step": step_seconds, "base": base, "quotes": list(quotes), "lo": lo, "hi": hi}
    )
    return [dict(row._mapping) for row in result]
