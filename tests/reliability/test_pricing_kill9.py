"""kill -9 the pricing service while ticks are in flight: after its restart every tick is applied exactly once.

100,000 ticks (20,000 at ci scale) with known volumes go onto the ticks stream the way ingest publishes them
(``TickMessage.to_stream`` through ``StreamPublisher.publish_many``). Once pricing has read part of them it is
killed with SIGKILL (a batch mid-transaction, entries delivered and not acknowledged), started again, and left
to drain the stream: the new process claims the dead one's pending entries and reads the rest. Then, per
source, pair and minute, the stored ticks' count and volume must equal what was sent, and the minutes' candles
must exist and lie within the prices sent.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from shared.messages import TickMessage
from shared.streams import TICKS_STREAM, StreamPublisher
from tests.reliability.platform import by_scale
from tests.reliability.ticks import Ledger, candle_problems, minute, reconcile

pytestmark = pytest.mark.reliability

SOURCES = ("rel-alpha", "rel-beta", "rel-gamma")
PAIRS = {"BTC": Decimal("65000"), "ETH": Decimal("3400")}
BATCH = 1000


def make_tick(prefix: str, i: int, now: datetime) -> TickMessage:
    source = SOURCES[i % len(SOURCES)]
    base = tuple(PAIRS)[(i // len(SOURCES)) % len(PAIRS)]
    # Prices within 0.1% of a level, volumes with two decimals: every sum is exact.
    price = PAIRS[base] * (1 + Decimal((i * 7919) % 1000 - 500) / Decimal(500_000))
    volume = Decimal((i * 104_729) % 100_000 + 1) / 100
    return TickMessage(
        tick_id=f"{prefix}{i}", source=source, base=base, quote="USD", pair=f"{base}-USD", price=price,
        volume_24h=volume, exchange_ts=now, received_at=now, transport="rest",
    )  # fmt: skip


async def test_every_tick_is_applied_exactly_once_across_a_kill_9(platform_factory, reliability_row):
    total = by_scale(100_000, 20_000)
    plat = platform_factory(
        services=("pricing",),
        vs_currencies="USD",
        # Room for every tick: a trimmed entry would be a loss the harness caused, not pricing.
        extra_env={"COINLYTICS_STREAM_MAXLEN": str(total * 4)},
    )
    await plat.start()
    prefix = f"kill9-{uuid.uuid4().hex[:6]}-"
    ledger = Ledger()
    redis = plat.redis_client()
    publisher = StreamPublisher(redis, namespace=plat.namespace, maxlen=plat.settings.stream_maxlen)
    conn = await plat.db()
    try:

        async def publish_all() -> None:
            for start in range(0, total, BATCH):
                now = datetime.now(UTC)
                ticks = [make_tick(prefix, i, now) for i in range(start, min(start + BATCH, total))]
                for tick in ticks:
                    ledger.add(tick)
                await publisher.publish_many(TICKS_STREAM, [t.to_stream() for t in ticks])

        publishing = asyncio.create_task(publish_all())
        # Kill once pricing has read a good part of the ticks but not all of them.
        kill_after = total * 2 // 5
        deadline = time.monotonic() + 120
        while True:
            info = await plat.group_info("ticks", "pricing") or {}
            if int(info.get("entries-read") or 0) >= kill_after:
                break
            assert time.monotonic() < deadline, f"pricing read too little within 120 s: {info}"
            await asyncio.sleep(0.05)
        killed_pid = plat.kill_service("pricing")
        killed_at = time.monotonic()
        stored_at_kill = await conn.fetchval("SELECT count(*) FROM ticks WHERE tick_id LIKE $1", prefix + "%")
        await publishing
        pending = await redis.xpending(plat.stream_key("ticks"), "pricing")
        pending_at_kill = int(pending["pending"])
        print(
            f"\nkilled pricing (pid {killed_pid}) after it read {info.get('entries-read')} of {total:,} entries: "
            f"{stored_at_kill:,} ticks stored, {pending_at_kill:,} delivered and unacknowledged"
        )
        assert stored_at_kill < total, "every tick was stored before the kill: nothing was in flight"

        plat.start_service("pricing")
        ready_seconds = await plat.wait_ready("pricing", timeout=60)
        drain_seconds = await plat.wait_drained("ticks", "pricing", timeout=by_scale(300, 60))
        recovered = time.monotonic() - killed_at

        result = await reconcile(conn, ledger, prefix)
        minutes = {minute(bucket[3]) for bucket, _v in ledger.ticks.values()}
        candles, candle_issues = await candle_problems(conn, ledger, "USD", minutes)
        dead = await redis.xlen(plat.stream_key("ticks") + ":dlq")
        print(
            f"after restart: ready in {ready_seconds:.1f}s, stream drained {drain_seconds:.1f}s later "
            f"({recovered:.1f}s after the kill)\n{result.summary()}\n"
            f"{candles} one-minute candles over {len(minutes)} minutes x {len(PAIRS)} coins; dead-lettered {dead}"
        )
        reliability_row.update(
            checked="stored ticks per source/pair/minute: count and volume sum equal what was sent",
            sent=result.sent, stored=result.stored, lost=result.lost, duplicated=result.duplicated,
            recover_seconds=recovered,
            notes=f"killed with {pending_at_kill:,} entries delivered but unacknowledged and {stored_at_kill:,} "
            f"of {total:,} stored; volume sent {result.sent_volume}, stored {result.stored_volume}",
        )  # fmt: skip
        assert result.lost == 0, f"lost ticks, e.g. {result.missing_ids}"
        assert result.duplicated == 0
        assert not result.mismatched, result.mismatched[:5]
        assert result.stored_volume == result.sent_volume
        assert dead == 0, "ticks were dead-lettered"
        assert candles >= 1, "no candle was built from the ticks"
        assert not candle_issues, candle_issues[:5]
        assert plat.unexpected_exits() == [], plat.unexpected_exits()
    finally:
        await conn.close()
        await redis.aclose()
