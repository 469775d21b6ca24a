"""Alert evaluation cost per price update (services/alerting/engine.py) with 1,000 and with 1,000,000
active rules on one coin, beside a naive scan of the same million rules measured in the same run.

Targets (issue 10): the million-rule cost at most 3x the thousand-rule cost, and at least 100x faster than
the scan. The price walks up and down across the near rules' thresholds, so updates fire (and re-arm) real
rules: the cost measured includes the work of firing.

Sharded evaluation (issue 14): rules on 16 coins and a feed of their prices as stream entries, through what a
replica does per entry without I/O (decode, the shard check, the engine): one shard holding every rule beside
the busiest of two shards, each holding its coins' rules and skipping the other's entries. Each shard is its
own process, on its own core when there is one: the figure is per entry of the whole feed, so the ratio is
what a second replica buys (no target: the gain depends on how evenly the coins hash)."""

from __future__ import annotations

import dataclasses
import os
import random
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from bench.common import Figure
from services.alerting.engine import AlertEngine, Rule
from services.alerting.evaluation import OwnedCoins, PriceUpdate
from shared.streams import StreamMessage, encode

START = datetime(2026, 11, 1, tzinfo=UTC)


def _rules(count: int, rng: random.Random) -> list[Rule]:
    """``count`` rules: the same 1,000 near the price (which the walk crosses, fires and re-arms), and the rest
    spread far from it (more users, other levels). Both runs then fire the same rules, so the figures
    compare what a million rules cost the index, not how many more of them a dense book happens to fire."""
    near = [
        Rule(f"n{i}", "BTC", "USD", "above" if i % 2 else "below", Decimal(rng.randrange(9_900_000, 10_100_000)) / 100,
             cooldown_seconds=0)
        for i in range(1_000)
    ]  # fmt: skip
    far = [
        Rule(f"f{i}", "BTC", "USD", "above" if i % 2 else "below",
             Decimal(rng.choice((rng.randrange(1_000_000, 8_000_000), rng.randrange(12_000_000, 30_000_000)))) / 100,
             cooldown_seconds=0)
        for i in range(max(count - len(near), 0))
    ]  # fmt: skip
    return near + far


def _walk(updates: int, rng: random.Random) -> list[Decimal]:
    price, path = 100_000.0, []
    for _ in range(updates):
        # About 20 dollars a step, pulled back towards 100,000 so the walk stays among the near rules.
        price += rng.gauss(0, 20) + (100_000 - price) * 0.01
        path.append(Decimal(f"{price:.2f}"))
    return path


def _engine_cost(rules: list[Rule], prices: list[Decimal]) -> tuple[float, int]:
    engine = AlertEngine()
    engine.load(rules)
    engine.on_price("BTC", "USD", prices[0], "fresh", START)
    fired = 0
    started = time.perf_counter()
    for i, price in enumerate(prices[1:], start=1):
        fired += len(engine.on_price("BTC", "USD", price, "fresh", START + timedelta(seconds=i)))
    return (time.perf_counter() - started) / (len(prices) - 1), fired


def _scan_cost(rules: list[Rule], prices: list[Decimal]) -> float:
    """What evaluating without an index costs: every rule's crossing test on every update."""
    previous = prices[0]
    started = time.perf_counter()
    for price in prices[1:]:
        for rule in rules:
            up = rule.condition == "above"
            _ = (previous < rule.threshold <= price) if up else (previous > rule.threshold >= price)
        previous = price
    return (time.perf_counter() - started) / (len(prices) - 1)


SHARD_COINS = (
    "BTC", "ETH", "SOL", "ADA", "XRP", "DOGE", "DOT", "LTC", "AVAX", "LINK", "ATOM", "XLM", "TRX", "BCH", "UNI", "NEAR",
)  # fmt: skip


def _coin_rules(per_coin: int, rng: random.Random) -> list[Rule]:
    """``per_coin`` rules on each coin, laid out as _rules lays out one coin's."""
    return [
        dataclasses.replace(rule, id=f"{coin}-{rule.id}", symbol=coin)
        for coin in SHARD_COINS
        for rule in _rules(per_coin, rng)
    ]


def _feed(steps: int, rng: random.Random) -> list[dict[str, str]]:
    """Every coin's walk, interleaved, as the fields of prices stream entries."""
    walks = {coin: _walk(steps, rng) for coin in SHARD_COINS}
    entries = []
    for step in range(steps):
        for offset, coin in enumerate(SHARD_COINS):
            at = START + timedelta(seconds=step, milliseconds=offset)
            payload = {"event_id": f"{coin}-{step}", "base": coin, "vs": "USD", "price": str(walks[coin][step]),
                       "status": "fresh", "last_updated": at.isoformat(), "spread_pct": "0.1"}  # fmt: skip
            entries.append(encode(payload, correlation_id="bench"))
    return entries


def _shard_cost(rules: list[Rule], feed: list[dict[str, str]], shards: int, shard: int) -> tuple[float, int]:
    """CPU seconds per feed entry for one shard (decode, skip or evaluate), and the triggers it fired. CPU
    time of this process, not wall time: on a machine that other work keeps busy, wall time measures the
    neighbours."""
    owns = OwnedCoins(shards, shard)
    engine = AlertEngine()
    # Copies: the engine keeps a rule's firing state on it (last_fired_at), and each run starts afresh.
    engine.load([dataclasses.replace(r) for r in rules if owns(r.symbol)])
    messages = [StreamMessage(id=f"{n}-0", fields=fields) for n, fields in enumerate(feed)]
    fired = 0
    started = time.process_time()
    for message in messages:
        base = message.payload().get("base")
        if not isinstance(base, str) or not owns(base):
            continue
        update = PriceUpdate(message)
        fired += len(engine.on_price(update.symbol, update.vs, update.price, update.status, update.at))
    return (time.process_time() - started) / len(messages), fired


def _best_shard_cost(rules: list[Rule], feed: list[dict[str, str]], shards: int, shard: int) -> tuple[float, int]:
    """The least of three runs: what the work costs, with less of what happened to interrupt it."""
    runs = [_shard_cost(rules, feed, shards, shard) for _ in range(3)]
    return min(cost for cost, _ in runs), runs[0][1]


async def run(*, database_url: str, redis_url: str, quick: bool, **_: Any) -> list[Figure]:
    rng = random.Random(7)
    updates = 2_000 if quick else 20_000
    prices = _walk(updates, rng)
    thousand = _rules(1_000, random.Random(11))
    million = _rules(100_000 if quick else 1_000_000, random.Random(11))
    small, fired_small = _engine_cost(thousand, prices)
    large, fired_large = _engine_cost(million, prices)
    scan = _scan_cost(million, prices[:6] if not quick else prices[:11])
    label = f"{len(million):,}"
    coin_rules = _coin_rules(1_000 if quick else 6_000, random.Random(13))
    feed = _feed(100 if quick else 1_000, random.Random(17))
    one_shard, fired_one = _best_shard_cost(coin_rules, feed, 1, 0)
    per_shard = [_best_shard_cost(coin_rules, feed, 2, shard) for shard in range(2)]
    busiest = max(cost for cost, _ in per_shard)
    fired_two = sum(fired for _, fired in per_shard)
    if fired_two != fired_one:
        raise AssertionError(f"two shards fired {fired_two} triggers, one shard {fired_one}: they must agree")
    owned = [sum(1 for c in SHARD_COINS if OwnedCoins(2, shard)(c)) for shard in range(2)]
    sharded = f"{len(coin_rules):,} rules on {len(SHARD_COINS)} coins"
    return [
        Figure("alert evaluation, 1,000 rules", small * 1e6, "us/update"),
        Figure(
            f"alert evaluation, {label} rules", large * 1e6, "us/update",
            baseline_name="1,000 rules, same engine", baseline_value=small * 1e6, target="<= 3x the 1,000-rule cost",
        ),
        Figure(
            f"naive scan, {label} rules", scan * 1e6, "us/update",
            baseline_name=f"the engine, {label} rules", baseline_value=large * 1e6, target=">= 100x the engine",
        ),
        Figure(
            f"alerts fired over {updates:,} updates, {label} rules", float(fired_large), "triggers",
            baseline_name="the same updates, 1,000 rules", baseline_value=float(fired_small),
        ),
        Figure(f"alert evaluation, 1 shard, {sharded}", one_shard * 1e6, "us/entry"),
        Figure(
            f"alert evaluation, busiest of 2 shards ({owned[0]}+{owned[1]} coins)", busiest * 1e6, "us/entry",
            baseline_name=f"1 shard, {sharded}; {os.cpu_count()} cores here, one per shard at best",
            baseline_value=one_shard * 1e6,
        ),
    ]  # fmt: skip
