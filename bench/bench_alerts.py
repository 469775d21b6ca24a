"""Alert evaluation cost per price update (services/alerting/engine.py) with 1,000 and with 1,000,000
active rules on one coin, beside a naive scan of the same million rules measured in the same run.

Targets (issue 10): the million-rule cost at most 3x the thousand-rule cost, and at least 100x faster than
the scan. The price walks up and down across the near rules' thresholds, so updates fire (and re-arm) real
rules: the cost measured includes the work of firing."""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from bench.common import Figure
from services.alerting.engine import AlertEngine, Rule

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
    ]  # fmt: skip
