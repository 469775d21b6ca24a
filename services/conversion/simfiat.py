"""Simulated fiat reference rates for the offline demo (``COINLYTICS_SOURCES=sim`` without ``ecb``).

The ECB cannot be reached offline, and without fiat rates the demo has no EUR, GBP or JPY prices and no
crypto-to-fiat conversion. These rates start near real levels (units per 1 EUR, as the ECB states them)
and take a small random step on every run, kept within a band around the start so they stay plausible.
They are stored and shown under the source name ``sim-ecb`` so they are never mistaken for the ECB's."""

from __future__ import annotations

import random
from decimal import Decimal

SIM_FIAT_SOURCE = "sim-ecb"

# Rough units per 1 EUR; the currencies the default vs list and common demos ask for.
SIM_FIAT_START: dict[str, Decimal] = {
    "USD": Decimal("1.08"), "GBP": Decimal("0.85"), "JPY": Decimal("162"), "CHF": Decimal("0.95"),
    "CAD": Decimal("1.47"), "AUD": Decimal("1.64"), "CNY": Decimal("7.8"), "SEK": Decimal("11.4"),
    "NOK": Decimal("11.6"), "PLN": Decimal("4.3"), "INR": Decimal("90"), "KRW": Decimal("1460"),
}  # fmt: skip
STEP = 0.002  # one run moves a rate by about 0.2%
BAND = 0.05  # and never more than 5% away from its start


def next_rates(previous: dict[str, Decimal], rng: random.Random) -> dict[str, Decimal]:
    """One random-walk step from ``previous`` (the stored rates; a missing currency starts at its level)."""
    rates: dict[str, Decimal] = {}
    for currency, start in SIM_FIAT_START.items():
        current = float(previous.get(currency, start))
        low, high = float(start) * (1 - BAND), float(start) * (1 + BAND)
        stepped = min(max(current * (1 + rng.gauss(0, STEP)), low), high)
        rates[currency] = Decimal(f"{stepped:.6g}")
    return rates
