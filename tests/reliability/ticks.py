"""Tick bookkeeping shared by the scenarios that count ticks: what was sent against what pricing stored.

Pricing's live candles carry no volume (sources only report a rolling 24h volume, see
services/pricing/history/service.py), so "every tick reflected exactly once" is checked where pricing keeps
each tick it applied: the ``ticks`` table, per source, pair and minute bucket, by count and by the sum of the
volumes the ticks carried; and the candles of those minutes are checked to exist and stay within the prices sent.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal

import asyncpg

from shared.messages import TickMessage

Bucket = tuple[str, str, str, datetime]  # source, base, quote, minute


def minute(ts: datetime) -> datetime:
    return ts.astimezone(UTC).replace(second=0, microsecond=0)


@dataclass
class Ledger:
    """What was sent: per tick id its bucket and volume."""

    ticks: dict[str, tuple[Bucket, Decimal]] = field(default_factory=dict)
    prices: dict[str, list[Decimal]] = field(default_factory=lambda: defaultdict(list))

    def add(self, tick: TickMessage) -> None:
        bucket = (tick.source, tick.base, tick.quote, minute(tick.exchange_ts))
        self.ticks[tick.tick_id] = (bucket, tick.volume_24h or Decimal(0))
        self.prices[tick.base].append(tick.price)

    def per_bucket(self) -> tuple[Counter[Bucket], dict[Bucket, Decimal]]:
        counts: Counter[Bucket] = Counter()
        volumes: dict[Bucket, Decimal] = defaultdict(Decimal)
        for bucket, volume in self.ticks.values():
            counts[bucket] += 1
            volumes[bucket] += volume
        return counts, volumes


@dataclass
class Reconciliation:
    sent: int
    stored: int
    lost: int
    duplicated: int
    sent_volume: Decimal
    stored_volume: Decimal
    # Buckets whose stored count or volume differs from what was sent: (bucket, sent n, stored n, sent v, stored v)
    mismatched: list[tuple[Bucket, int, int, Decimal, Decimal]]
    missing_ids: list[str]

    def summary(self) -> str:
        return (
            f"sent {self.sent:,} ticks (volume {self.sent_volume}), stored {self.stored:,} "
            f"(volume {self.stored_volume}), lost {self.lost:,}, duplicated {self.duplicated:,}, "
            f"{len(self.mismatched)} mismatched buckets"
        )


async def reconcile(conn: asyncpg.Connection, ledger: Ledger, id_prefix: str | None = None) -> Reconciliation:
    """Compare the ledger with the ``ticks`` rows whose id starts with ``id_prefix`` (every row of those ids
    sent by the test), or with the rows of the ledger's ids (ticks made by a source: nothing else can be told
    apart from other ticks, so only losses and count/volume differences show)."""
    columns = "SELECT tick_id, source, base, quote, exchange_ts, volume_24h FROM ticks"
    if id_prefix is not None:
        pattern = id_prefix.replace("%", r"\%").replace("_", r"\_") + "%"
        rows = await conn.fetch(f"{columns} WHERE tick_id LIKE $1", pattern)
    else:
        rows = await conn.fetch(f"{columns} WHERE tick_id = ANY($1::text[])", list(ledger.ticks))
    stored_ids = Counter(r["tick_id"] for r in rows)
    counts: Counter[Bucket] = Counter()
    volumes: dict[Bucket, Decimal] = defaultdict(Decimal)
    for r in rows:
        bucket = (r["source"], r["base"], r["quote"], minute(r["exchange_ts"]))
        counts[bucket] += 1
        volumes[bucket] += r["volume_24h"] or Decimal(0)
    sent_counts, sent_volumes = ledger.per_bucket()
    zero = Decimal(0)
    mismatched = [
        (bucket, sent_counts[bucket], counts[bucket], sent_volumes.get(bucket, zero), volumes.get(bucket, zero))
        for bucket in sorted(set(sent_counts) | set(counts))
        if sent_counts[bucket] != counts[bucket] or sent_volumes.get(bucket, zero) != volumes.get(bucket, zero)
    ]
    missing = [tick_id for tick_id in ledger.ticks if tick_id not in stored_ids]
    # A tick applied twice shows as a second row of its id or as a row nobody sent.
    duplicated = sum(n - 1 for n in stored_ids.values() if n > 1) + sum(
        1 for tick_id in stored_ids if tick_id not in ledger.ticks
    )
    return Reconciliation(
        sent=len(ledger.ticks),
        stored=len(rows),
        lost=len(missing),
        duplicated=duplicated,
        sent_volume=sum(sent_volumes.values(), Decimal(0)),
        stored_volume=sum(volumes.values(), Decimal(0)),
        mismatched=mismatched,
        missing_ids=missing[:10],
    )


async def candle_problems(
    conn: asyncpg.Connection, ledger: Ledger, vs: str, minutes: Iterable[datetime]
) -> tuple[int, list[str]]:
    """How many 1-minute candles of ``vs`` the given minutes have, and any that lie outside the prices sent."""
    wanted = sorted(set(minutes))
    problems: list[str] = []
    found = 0
    for base, prices in ledger.prices.items():
        lo, hi = min(prices), max(prices)
        rows = await conn.fetch(
            "SELECT t, open, high, low, close FROM candles WHERE base = $1 AND vs = $2 AND interval = '1m' "
            "AND t = ANY($3::timestamptz[])",
            base, vs, wanted,
        )  # fmt: skip
        found += len(rows)
        for r in rows:
            if not (lo <= r["low"] <= r["high"] <= hi) or not (lo <= r["open"] <= hi and lo <= r["close"] <= hi):
                problems.append(f"{base}/{vs} candle {r['t']:%H:%M} {dict(r)} outside sent prices [{lo}, {hi}]")
    return found, problems
