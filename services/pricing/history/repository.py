"""All SQL of price history."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import TextClause, and_, case, func, or_, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from shared.db import delete_older_than
from shared.models import BackfillProgress, Candle, Coin, Price

# 12 columns a row keeps a chunk far below asyncpg's 32,767 bind parameters.
INSERT_CHUNK = 1000
STEP_SECONDS = {"1m": 60, "1h": 3600, "1d": 86_400}
# Buckets are aligned on the Unix epoch, as service.floor_time does.
ORIGIN = "TIMESTAMPTZ '1970-01-01 00:00:00+00'"
PAIRS_RANGE = "base = ANY(:bases) AND vs = :vs AND t >= :lo AND t < :hi"


async def upsert_live_candles(session: AsyncSession, rows: Sequence[dict[str, Any]]) -> None:
    """Merge 1-minute candles built from consolidated prices into the stored ones.

    ``open``/``close`` only move for a point that is strictly earlier/later than the stored first/last one,
    high/low only widen, so applying the same points again is a no-op (the WHERE clause skips the write).
    Candles loaded from an exchange are left as they are."""
    if rows:
        # executemany with one cached statement: SQLAlchemy batches the rows into multi-row VALUES.
        # In one order for every writer, as prices are (services/pricing/repository.py upsert_prices).
        ordered = sorted(rows, key=lambda r: (str(r["base"]), str(r["vs"]), str(r["interval"]), r["t"]))
        await session.execute(_LIVE_CANDLE_UPSERT, ordered)


def _live_candle_upsert() -> Any:
    stmt = insert(Candle)
    new = stmt.excluded
    return stmt.on_conflict_do_update(
        index_elements=[Candle.base, Candle.vs, Candle.interval, Candle.t],
        set_={
            "open": case((new.first_ts < Candle.first_ts, new.open), else_=Candle.open),
            "first_ts": func.least(Candle.first_ts, new.first_ts),
            "close": case((new.last_ts > Candle.last_ts, new.close), else_=Candle.close),
            "last_ts": func.greatest(Candle.last_ts, new.last_ts),
            "high": func.greatest(Candle.high, new.high),
            "low": func.least(Candle.low, new.low),
            "updated_at": func.now(),
        },
        where=and_(
            Candle.source == new.source,
            or_(
                new.first_ts < Candle.first_ts,
                new.last_ts > Candle.last_ts,
                new.high > Candle.high,
                new.low < Candle.low,
            ),
        ),
    )


_LIVE_CANDLE_UPSERT = _live_candle_upsert()


def _level_sql(level: str, *, base: str = "ANY(:bases)", lo: str = ":lo", hi: str = ":hi") -> str:
    """Rows (base, t, ohlcv) at ``level`` granularity (1m, 1h or 1d) for the coins :bases in :vs, in [:lo, :hi).

    A stored row of that interval wins; a bucket without one is aggregated from the next finer level, so the
    latest hour/day (not rolled up yet) and hours whose 1-minute rows are all there is still show. Only the
    buckets that lack a stored row look at the finer level (a range search per missing bucket), so a year of
    daily candles reads some 365 rows a coin, not the half-million 1-minute rows below them. ``base``, ``lo``
    and ``hi`` are SQL: the bind parameters at the top, the missing bucket's columns one level down."""
    stored = (
        f"SELECT base, t, open, high, low, close, volume FROM candles "  # noqa: S608
        f"WHERE base = {base} AND vs = :vs AND interval = '{level}' AND t >= {lo} AND t < {hi}"
    )
    finer = {"1h": "1m", "1d": "1h"}.get(level)
    if finer is None:
        return stored
    step = f"INTERVAL '{STEP_SECONDS[level]} seconds'"
    # m_<level>: every bucket of the range, per coin, that has no stored row at this level.
    m = f"m_{level}"
    top = base == "ANY(:bases)"
    coins = "unnest(CAST(:bases AS varchar[]))" if top else f"(VALUES ({base}))"
    buckets = (
        f"SELECT b.base, g.t FROM {coins} AS b(base) "  # noqa: S608
        f"CROSS JOIN generate_series(date_bin({step}, {lo}, {ORIGIN}), {hi} - INTERVAL '1 microsecond', {step}) "
        f"AS g(t) WHERE g.t >= {lo} "
    )
    below = _level_sql(finer, base=f"{m}.base", lo=f"{m}.t", hi=f"{m}.t + {step}")
    if top:
        # The whole range at once: the stored rows are read once, and the buckets they lack found by a hash
        # anti-join against them (one index probe per bucket made a year of hourly candles take a second).
        k = f"k_{level}"
        missing = f"{buckets}AND NOT EXISTS (SELECT 1 FROM {k} WHERE {k}.base = b.base AND {k}.t = g.t)"  # noqa: S608
        return (
            f"WITH {k} AS MATERIALIZED ({stored}) SELECT * FROM {k} UNION ALL "  # noqa: S608
            f"SELECT {m}.base, {m}.t, {_agg('f')} FROM ({missing}) AS {m} "
            f"CROSS JOIN LATERAL ({below}) AS f GROUP BY 1, 2"
        )
    missing = (
        f"{buckets}AND NOT EXISTS (SELECT 1 FROM candles c WHERE c.base = b.base AND c.vs = :vs "  # noqa: S608
        f"AND c.interval = '{level}' AND c.t = g.t)"
    )
    # Only our constants are formatted in (level names, step lengths); every value is a bind parameter.
    return (
        f"{stored} UNION ALL "  # noqa: S608
        f"SELECT {m}.base, {m}.t, {_agg('f')} FROM ({missing}) AS {m} "
        f"CROSS JOIN LATERAL ({below}) AS f GROUP BY 1, 2"
    )


def _agg_parts(alias: str) -> list[str]:
    # first/last by time; SUM of only nulls stays null (consolidated candles have no volume).
    return [
        f"(array_agg({alias}.open ORDER BY {alias}.t))[1] AS open",
        f"max({alias}.high) AS high",
        f"min({alias}.low) AS low",
        f"(array_agg({alias}.close ORDER BY {alias}.t DESC))[1] AS close",
        f"sum({alias}.volume) AS volume",
    ]


def _agg(alias: str) -> str:
    return ", ".join(_agg_parts(alias))


def _source_level(interval: str, step: int) -> str:
    return max((lvl for lvl, s in STEP_SECONDS.items() if s <= step and step % s == 0), key=STEP_SECONDS.__getitem__)


def candles_sql(interval: str, *, floats: bool = False) -> str:
    """The query of ``read_candles_many``: every coin's candles of ``interval`` (1m, 5m, 15m, 1h, 4h, 1d) in
    one statement, aggregated in PostgreSQL from the coarsest stored level that divides it. ``floats`` casts
    the prices to float8 there (for statistics, which compute in float64 anyway)."""
    step = int(interval[:-1]) * {"m": 60, "h": 3600, "d": 86_400}[interval[-1]]
    level = _source_level(interval, step)
    cast = "::float8" if floats else ""
    if STEP_SECONDS[level] == step:
        # A stored level (1m, 1h, 1d): its rows are already one per coin and bucket (the key holds one stored
        # row per bucket, and a missing bucket is aggregated once), so there is nothing left to group.
        columns = ", ".join(f"s.{c}{cast} AS {c}" for c in ("open", "high", "low", "close", "volume"))
        return f"SELECT s.base, s.t, {columns} FROM ({_level_sql(level)}) AS s ORDER BY 1, 2"  # noqa: S608
    columns = ", ".join(
        f"({part.rsplit(' AS ', 1)[0]}){cast} AS {part.rsplit(' AS ', 1)[1]}" for part in _agg_parts("s")
    )
    return (
        f"SELECT s.base, date_bin(INTERVAL '{step} seconds', s.t, {ORIGIN}) AS t, {columns} "  # noqa: S608
        f"FROM ({_level_sql(level)}) AS s GROUP BY 1, 2 ORDER BY 1, 2"
    )


@functools.lru_cache(maxsize=32)
def candles_statement(interval: str, *, floats: bool = False) -> TextClause:
    """``candles_sql`` as a statement, built once per interval: parsing the text for its bind parameters cost
    a history read more than running the query's Python side."""
    return text(candles_sql(interval, floats=floats))


@functools.lru_cache(maxsize=16)
def candle_floats_sql(interval: str) -> str:
    """``candles_sql(interval, floats=True)`` with asyncpg's positional parameters ($1 bases, $2 vs, $3 lo,
    $4 hi), for ``read_candle_floats``."""
    sql = candles_sql(interval, floats=True)
    for name, number in ((":bases", "$1"), (":vs", "$2"), (":lo", "$3"), (":hi", "$4")):
        sql = sql.replace(name, number)
    return sql


async def read_candle_floats(
    session: AsyncSession, bases: Sequence[str], vs: str, interval: str, lo: datetime, hi: datetime
) -> Sequence[Sequence[Any]]:
    """``read_candles_many`` as rows (base, t, open, high, low, close, volume) of floats: what a statistics
    read wants, without a Decimal and a dict per value. Run on the session's own asyncpg connection (its
    transaction): for a year of hourly candles (175,000 rows), SQLAlchemy's row objects alone cost 0.2 s."""
    connection = await session.connection()
    raw = await connection.get_raw_connection()
    driver = raw.driver_connection
    assert driver is not None
    records: Sequence[Sequence[Any]] = await driver.fetch(candle_floats_sql(interval), list(bases), vs, lo, hi)
    return records


async def read_candles(
    session: AsyncSession, base: str, vs: str, interval: str, lo: datetime, hi: datetime
) -> list[dict[str, Any]]:
    """Candles of ``interval`` (1m, 5m, 15m, 1h, 4h, 1d) starting in [lo, hi), aggregated in PostgreSQL."""
    result = await session.execute(candles_statement(interval), {"bases": [base], "vs": vs, "lo": lo, "hi": hi})
    names = list(result.keys())
    # The statement's first column is the coin (one coin here): left out of each row.
    assert names[0] == "base", names
    columns = names[1:]
    return [dict(zip(columns, row[1:], strict=True)) for row in result]


async def read_candles_many(
    session: AsyncSession, bases: Sequence[str], vs: str, interval: str, lo: datetime, hi: datetime
) -> list[dict[str, Any]]:
    """Several coins' candles in one query: rows with ``base`` and ``t``, ordered by coin then time."""
    result = await session.execute(candles_statement(interval), {"bases": list(bases), "vs": vs, "lo": lo, "hi": hi})
    return [dict(r._mapping) for r in result]


async def roll_up(session: AsyncSession, target: str, finer: str, *, until: datetime) -> int:
    """Write ``target`` candles (1h from 1m, 1d from 1h) for complete buckets before ``until``.

    Starts a little before the newest roll-up (late minutes still count), or at the oldest finer row on
    the first run. Exchange candles already stored for a bucket are kept; unchanged buckets are not rewritten.
    Returns the number of rows written."""
    step = STEP_SECONDS[target]
    newest = await session.scalar(
        select(func.max(Candle.t)).where(Candle.interval == target, Candle.source == "rollup")
    )
    since: datetime | None
    if newest is not None:
        since = newest - timedelta(seconds=2 * step)
    else:
        since = await session.scalar(select(func.min(Candle.t)).where(Candle.interval == finer))
        if since is None:
            return 0
    sql = f"""
        INSERT INTO candles AS c (base, vs, interval, t, open, high, low, close, volume, source, first_ts, last_ts,
                                  updated_at)
        SELECT f.base, f.vs, '{target}', date_bin(INTERVAL '{step} seconds', f.t, {ORIGIN}) AS bucket,
               (array_agg(f.open ORDER BY f.t))[1], max(f.high), min(f.low),
               (array_agg(f.close ORDER BY f.t DESC))[1], sum(f.volume), 'rollup',
               min(f.first_ts), max(f.last_ts), now()
        FROM candles f
        WHERE f.interval = :finer AND f.t < :until
          AND f.t >= date_bin(INTERVAL '{step} seconds', CAST(:since AS timestamptz), {ORIGIN})
        GROUP BY f.base, f.vs, bucket
        ON CONFLICT (base, vs, interval, t) DO UPDATE
        SET open = excluded.open, high = excluded.high, low = excluded.low, close = excluded.close,
            volume = excluded.volume, first_ts = excluded.first_ts, last_ts = excluded.last_ts, updated_at = now()
        WHERE c.source = 'rollup'
          AND (c.open, c.high, c.low, c.close, c.volume)
              IS DISTINCT FROM (excluded.open, excluded.high, excluded.low, excluded.close, excluded.volume)
    """  # noqa: S608 - only constants are formatted in; values are bound
    result = await session.execute(text(sql), {"finer": finer, "since": since, "until": until})
    return int(getattr(result, "rowcount", 0) or 0)


async def delete_ticks_before(session: AsyncSession, cutoff: datetime, batch: int) -> int:
    # ticks has no index on arrival time (it would cost the hot insert path); old rows sit at the start of
    # the heap, so each batch's scan stops early.
    return await delete_older_than(session, "ticks", "received_at", cutoff, batch, key="ctid")


async def delete_minute_candles_before(session: AsyncSession, cutoff: datetime, batch: int) -> int:
    return await delete_older_than(session, "candles", "t", cutoff, batch, key="ctid", where="interval = '1m'")


async def symbol_known(session: AsyncSession, base: str) -> bool:
    for stmt in (
        select(Coin.symbol).where(Coin.symbol == base),
        select(Price.base).where(Price.base == base),
        select(Candle.base).where(Candle.base == base),
    ):
        if await session.scalar(stmt.limit(1)) is not None:
            return True
    return False


async def currency_known(session: AsyncSession, vs: str) -> bool:
    found = await session.scalar(select(Price.vs).where(Price.vs == vs).limit(1))
    if found is not None:
        return True
    found = await session.scalar(select(Candle.vs).where(Candle.vs == vs).limit(1))
    return found is not None


# --- backfill ------------------------------------------------------------------------------------


async def insert_exchange_candles(session: AsyncSession, rows: Sequence[dict[str, Any]]) -> int:
    """Store candles loaded from an exchange; a bucket already stored (live or earlier backfill) is kept."""
    written = 0
    for start in range(0, len(rows), INSERT_CHUNK):
        chunk = list(rows[start : start + INSERT_CHUNK])
        stmt = (
            insert(Candle)
            .values(chunk)
            .on_conflict_do_nothing(index_elements=[Candle.base, Candle.vs, Candle.interval, Candle.t])
        )
        result = await session.scalars(stmt.returning(Candle.t))
        written += len(result.all())
    return written


async def count_stored(session: AsyncSession, base: str, vs: str, interval: str, lo: datetime, hi: datetime) -> int:
    count = await session.scalar(
        select(func.count()).where(
            Candle.base == base, Candle.vs == vs, Candle.interval == interval, Candle.t >= lo, Candle.t < hi
        )
    )
    return int(count or 0)


async def get_progress(
    session: AsyncSession, base: str, vs: str, source: str, interval: str
) -> tuple[datetime, datetime] | None:
    row = await session.get(BackfillProgress, (base, vs, source, interval))
    if row is None or row.oldest is None or row.newest is None:
        return None
    return row.oldest, row.newest


async def set_progress(
    session: AsyncSession, base: str, vs: str, source: str, interval: str, oldest: datetime, newest: datetime
) -> None:
    values = {"base": base, "vs": vs, "source": source, "interval": interval, "oldest": oldest, "newest": newest}
    stmt = insert(BackfillProgress).values(values)
    stmt = stmt.on_conflict_do_update(
        index_elements=[BackfillProgress.base, BackfillProgress.vs, BackfillProgress.source, BackfillProgress.interval],
        set_={"oldest": oldest, "newest": newest, "updated_at": func.now()},
    )
    await session.execute(stmt)


# -- Read by other services (conversion, for conversions at a past moment): the owner's read-only functions. --


# One index probe per (coin, currency, interval): the candle with the latest start at or before the moment.
CANDLES_AT_SQL = text(
    """
    SELECT k.base, k.vs, k.interval, c.t, c.close, c.volume
    FROM unnest(CAST(:bases AS text[]), CAST(:vss AS text[]), CAST(:intervals AS text[])) AS k(base, vs, interval)
    CROSS JOIN LATERAL (
        SELECT t, close, volume FROM candles
        WHERE candles.base = k.base AND candles.vs = k.vs AND candles.interval = k.interval
          AND candles.t <= :at AND candles.t >= :earliest
        ORDER BY candles.t DESC LIMIT 1
    ) AS c
    """
)


async def candles_at(
    session: AsyncSession, keys: Sequence[tuple[str, str, str]], at: datetime, earliest: datetime
) -> list[dict[str, Any]]:
    if not keys:
        return []
    result = await session.execute(
        CANDLES_AT_SQL,
        {
            "bases": [k[0] for k in keys],
            "vss": [k[1] for k in keys],
            "intervals": [k[2] for k in keys],
            "at": at,
            "earliest": earliest,
        },
    )
    return [dict(row._mapping) for row in result.all()]


async def with_candles(session: AsyncSession, symbols: Iterable[str]) -> set[str]:
    found = set()
    for symbol in symbols:
        if await session.scalar(select(Candle.base).where(Candle.base == symbol).limit(1)) is not None:
            found.add(symbol)
    return found


async def first_candle(session: AsyncSession, base: str) -> datetime | None:
    value: datetime | None = await session.scalar(select(func.min(Candle.t)).where(Candle.base == base))
    return value
