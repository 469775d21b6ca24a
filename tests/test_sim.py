"""The opt-in ``sim`` source: an offline random walk seen by three simulated venues."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from decimal import Decimal

from services.ingest.runner import build_source
from services.ingest.service import IngestService
from services.ingest.sim import SIM_SOURCES, SimSource
from shared.db import create_engine, session_factory
from shared.messages import TickMessage
from shared.source_health import health_key, parse_health
from shared.streams import TICKS_STREAM, StreamPublisher
from shared.supervisor import Supervisor
from tests.conftest import eventually, make_settings

COINS = ["BTC", "ETH"]


async def opened(seed: int | None, interval: float = 1.0) -> SimSource:
    source = SimSource("sim", seed=seed, interval_seconds=interval)
    await source.open(COINS)
    return source


def prices(ticks: list[TickMessage]) -> dict[tuple[str, str], Decimal]:
    return {(t.source, t.base): t.price for t in ticks}


async def test_each_poll_quotes_every_coin_from_three_sim_venues():
    source = await opened(seed=7)
    ticks, rejected = await source.poll()
    assert rejected == []
    assert Counter((t.source, t.base) for t in ticks) == Counter(
        {(venue, coin): 1 for venue in SIM_SOURCES for coin in COINS}
    )
    assert set(SIM_SOURCES) == {"sim-alpha", "sim-beta", "sim-gamma"}
    for tick in ticks:
        assert tick.source.startswith("sim-")
        assert tick.quote == "USD"
        assert tick.pair == f"{tick.base}-USD"
        assert tick.price > 0
        assert tick.bid is not None and tick.ask is not None
        assert 0 < tick.bid < tick.price < tick.ask
        assert tick.volume_24h is not None and tick.volume_24h > 0
        # What goes on the stream comes back as the same tick.
        assert TickMessage.from_stream(json.loads(json.dumps(tick.to_stream()))) == tick
    assert len({t.tick_id for t in ticks}) == len(ticks)
    # Plausible levels: BTC far above ETH, venues within a fraction of a percent of each other.
    btc = [t.price for t in ticks if t.base == "BTC"]
    eth = [t.price for t in ticks if t.base == "ETH"]
    assert min(btc) > 10 * max(eth)
    for group in (btc, eth):
        assert (max(group) - min(group)) / min(group) < Decimal("0.01")


async def test_prices_move_between_polls_and_stay_positive():
    source = await opened(seed=11)
    polls = [prices((await source.poll())[0]) for _ in range(20)]
    for before, after in itertools.pairwise(polls):
        assert before.keys() == after.keys()
        assert before != after
        assert all(price > 0 for price in after.values())
    # Every venue's every coin moved at some point.
    for key in polls[0]:
        assert len({poll[key] for poll in polls}) > 1


async def test_same_seed_gives_the_same_prices():
    first, second = await opened(seed=42), await opened(seed=42)
    for _ in range(5):
        assert prices((await first.poll())[0]) == prices((await second.poll())[0])
    other = await opened(seed=43)
    replay = await opened(seed=42)
    assert prices((await other.poll())[0]) != prices((await replay.poll())[0])


async def test_reopening_with_other_coins_adds_and_drops_them():
    source = await opened(seed=3)
    await source.poll()
    await source.open(["ETH", "SOL"])
    ticks, _ = await source.poll()
    assert {t.base for t in ticks} == {"ETH", "SOL"}


def test_build_source_gives_the_sim_source_for_sim():
    source = build_source("sim", rest_url=None, timeout_seconds=1, sim_seed=1, sim_interval=0.5)
    assert isinstance(source, SimSource)
    assert source.kind == "sim"


async def test_ingest_service_with_the_sim_source_publishes_ticks(settings, redis):
    configured = make_settings(
        settings.database_url,
        settings.redis_url,
        settings.redis_namespace,
        sources=["sim"],
        coins=COINS,
        sim_seed=5,
        sim_interval_seconds=0.05,
    )
    engine = create_engine(configured.require_database_url())
    publisher = StreamPublisher(redis, namespace=configured.redis_namespace, maxlen=configured.stream_maxlen)
    service = IngestService(configured, redis=redis, publisher=publisher, sessions=session_factory(engine))
    key = publisher.stream_key(TICKS_STREAM)
    per_poll = len(COINS) * len(SIM_SOURCES)
    supervisor = Supervisor("ingest")
    try:
        await service.start(supervisor)
        assert [r.source.name for r in service.runners] == ["sim"]

        async def two_polls() -> bool:
            return await redis.xlen(key) >= 2 * per_poll

        await eventually(two_polls, timeout=10, interval=0.05)
    finally:
        await supervisor.stop()
        await engine.dispose()

    entries = await redis.xrange(key)
    ticks = [TickMessage.from_stream(json.loads(fields[b"data"])) for _id, fields in entries]
    assert {t.source for t in ticks} == set(SIM_SOURCES)
    assert {t.base for t in ticks} == set(COINS)
    assert all(t.price > 0 for t in ticks)
    assert len({t.tick_id for t in ticks}) == len(ticks)
    health = parse_health(await redis.hgetall(health_key(configured, "sim")))
    assert health["kind"] == "sim"
    assert health["state"] == "connected"
    assert health["messages_total"] >= 2 * per_poll
    assert health["errors"] == {}
