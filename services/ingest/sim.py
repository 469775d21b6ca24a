"""``sim``: the opt-in offline generator for the demo and the benchmarks (never a market)."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime
from decimal import Decimal

from services.ingest.sources import Rejected, tick_id
from shared.messages import TickMessage

SIM_SOURCES = ("sim-alpha", "sim-beta", "sim-gamma")

# Rough reference levels so simulated prices look plausible; unknown coins start at 1.
SIM_START_PRICES = {
    "BTC": 65000.0, "ETH": 3400.0, "SOL": 150.0, "XRP": 0.6, "ADA": 0.45, "DOGE": 0.15,
    "LTC": 80.0, "DOT": 6.5, "LINK": 15.0, "AVAX": 30.0,
}  # fmt: skip


class SimSource:
    """Offline demo and benchmark feed: a geometric random walk per coin, seen by three simulated
    venues, each with its own small bias and noise. Named ``sim-*`` so it is never mistaken for a market."""

    kind = "sim"

    def __init__(self, name: str, *, seed: int | None, interval_seconds: float) -> None:
        self.name = name
        self.rng = random.Random(seed)
        self.interval_seconds = interval_seconds
        self.mid: dict[str, float] = {}
        self.venue_bias = {venue: self.rng.uniform(-0.0015, 0.0015) for venue in SIM_SOURCES}

    async def open(self, coins: list[str]) -> None:
        for coin in coins:
            self.mid.setdefault(coin, SIM_START_PRICES.get(coin, 1.0) * self.rng.uniform(0.97, 1.03))
        for coin in list(self.mid):
            if coin not in coins:
                del self.mid[coin]

    async def poll(self) -> tuple[list[TickMessage], list[Rejected]]:
        now = datetime.now(UTC)
        # Annualised volatility of ~80% scaled to one step.
        step_sigma = 0.8 * math.sqrt(self.interval_seconds / (365 * 24 * 3600))
        ticks = []
        for coin, mid in self.mid.items():
            mid *= math.exp(self.rng.gauss(0, step_sigma))
            self.mid[coin] = mid
            for venue in SIM_SOURCES:
                price = mid * (1 + self.venue_bias[venue] + self.rng.gauss(0, 0.0004))
                spread = price * 0.0005
                price_d = _sim_decimal(price)
                pair = f"{coin}-USD"
                ticks.append(
                    TickMessage(
                        tick_id=tick_id(venue, pair, now, price_d),
                        source=venue,
                        base=coin,
                        quote="USD",
                        pair=pair,
                        price=price_d,
                        bid=_sim_decimal(price - spread / 2),
                        ask=_sim_decimal(price + spread / 2),
                        volume_24h=_sim_decimal(self.rng.uniform(1e5, 5e6) / mid),
                        quote_volume_24h=None,
                        exchange_ts=now,
                        received_at=now,
                        transport="sim",
                    )
                )
        return ticks, []

    async def close(self) -> None:
        return None


def _sim_decimal(value: float) -> Decimal:
    return Decimal(f"{value:.10g}")
