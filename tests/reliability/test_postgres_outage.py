"""Stop PostgreSQL for 30 s (10 s at ci scale) while ingest collects: nothing collected meanwhile is lost.

Ingest (on the offline ``sim`` source) and pricing run on their private servers. PostgreSQL is stopped while
ticks flow; ingest must keep publishing them to the ticks stream for the whole outage (the stream grows and
pricing's group falls behind), and once PostgreSQL is back pricing must drain the backlog (group lag and
pending back to 0). Every tick published during the outage, read back from the stream by entry time, must
then be stored by pricing: count and volume per source, pair and minute.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest
from redis.asyncio import Redis

from shared.messages import TickMessage
from tests.reliability.platform import by_scale
from tests.reliability.ticks import Ledger, minute, reconcile

pytestmark = pytest.mark.reliability


async def redis_ms(redis: Redis) -> int:
    """Redis's own clock in ms: what the stream's entry ids are made of."""
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def test_ingest_keeps_collecting_and_nothing_is_lost_across_a_postgres_outage(platform_factory, reliability_row):
    outage = by_scale(30.0, 10.0)
    plat = platform_factory(
        services=("pricing", "ingest"), sources="sim", extra_env={"COINLYTICS_SIM_INTERVAL_SECONDS": "0.25"}
    )
    await plat.start()
    stream = plat.stream_key("ticks")
    redis = plat.redis_client()
    try:
        # Flowing before the fault: pricing has read and acknowledged ticks.
        deadline = time.monotonic() + 60
        while int((await plat.group_info("ticks", "pricing") or {}).get("entries-read") or 0) < 20:
            assert time.monotonic() < deadline, "no ticks flowed before the outage"
            await asyncio.sleep(0.2)

        length_before = await redis.xlen(stream)
        # Entry ids are the ms at which Redis added them: the outage's entries are those between these two
        # (from the moment PostgreSQL starts shutting down).
        down_ms = await redis_ms(redis)
        await asyncio.to_thread(plat.stop_postgres)
        lengths: list[int] = []
        # Entries pricing has not applied: unread (lag) plus read and not acknowledged (pending: each batch it
        # reads while PostgreSQL is down fails and stays pending, unpenalised, for a retry).
        backlog: list[int] = []
        ready_during: set[int] = set()
        started = time.monotonic()
        while time.monotonic() - started < outage:
            lengths.append(await redis.xlen(stream))
            group = await plat.group_info("ticks", "pricing") or {}
            backlog.append(int(group.get("lag") or 0) + int(group.get("pending") or 0))
            ready_during.add((await plat.readyz("ingest", timeout=4))[0])
            await asyncio.sleep(1)
        up_ms = await redis_ms(redis)
        await asyncio.to_thread(plat.start_postgres)
        back = time.monotonic()
        drained = await plat.wait_drained("ticks", "pricing", timeout=by_scale(180, 60))
        recovered = time.monotonic() - back

        entries = await redis.xrange(stream, min=f"{down_ms}-0", max=f"{up_ms}-99999999")
        ledger = Ledger()
        for _entry_id, fields in entries:
            ledger.add(TickMessage.from_json(fields[b"data"]))
        republished = len(entries) - len(ledger.ticks)
        dead = await redis.xlen(f"{stream}:dlq")
        last_entry_ms = int(entries[-1][0].decode().split("-")[0]) if entries else down_ms
        conn = await plat.db()
        try:
            result = await reconcile(conn, ledger)
        finally:
            await conn.close()
        per_source = Counter(bucket[0] for bucket, _v in ledger.ticks.values())
        outage_minutes = sorted({minute(bucket[3]) for bucket, _v in ledger.ticks.values()})
        print(
            f"\nPostgreSQL down {(up_ms - down_ms) / 1000:.1f}s; ticks stream {length_before:,} -> "
            f"{max(lengths, default=0):,} entries while down (sampled {lengths}); pricing backlog while "
            f"down up to {max(backlog, default=0):,}; ingest /readyz codes while down {sorted(ready_during)}\n"
            f"published during the outage: {len(entries):,} entries ({republished} repeated ids), per source "
            f"{dict(per_source)}, last one {(up_ms - last_entry_ms) / 1000:.1f}s before PostgreSQL was back\n"
            f"backlog drained {drained:.1f}s after PostgreSQL was back; dead-lettered {dead}\n{result.summary()}"
        )
        reliability_row.update(
            checked=f"{outage:.0f}s outage: ingest published throughout; every tick of the outage stored once "
            "(count and volume per source/pair/minute); backlog drained",
            sent=result.sent, stored=result.stored, lost=result.lost, duplicated=result.duplicated,
            recover_seconds=recovered,
            notes=f"stream grew by {len(entries):,} entries during the outage; pricing backlog up to "
            f"{max(backlog, default=0):,}; {len(outage_minutes)} minutes covered; volume sent "
            f"{result.sent_volume}, stored {result.stored_volume}",
        )  # fmt: skip
        assert plat.unexpected_exits() == [], plat.unexpected_exits()
        assert len(entries) > 0, "ingest published nothing while PostgreSQL was down"
        assert lengths == sorted(lengths) and lengths[-1] > length_before, f"the stream did not grow: {lengths}"
        # Published to the end, not just at first: the last outage entry is in its final quarter.
        assert up_ms - last_entry_ms < (up_ms - down_ms) / 4, "ingest stopped publishing during the outage"
        assert max(backlog, default=0) > 0, "pricing kept up with PostgreSQL down: the fault did not happen"
        assert result.lost == 0, f"ticks of the outage not stored ({dead} dead-lettered), e.g. {result.missing_ids}"
        assert dead == 0, "ticks were dead-lettered during the outage"
        assert result.duplicated == 0
        assert not result.mismatched, result.mismatched[:5]
        assert result.stored_volume == result.sent_volume
    finally:
        await redis.aclose()
