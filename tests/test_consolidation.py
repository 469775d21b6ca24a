"""Consolidation against real PostgreSQL and Redis, fed with quotes recorded from three exchanges on the
same morning (2017-10-03, BTC/USD): Bitstamp, Coinbase (Exchange API) and Gemini."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Context, Decimal
from pathlib import Path

from shared.messages import TickMessage


def recorded_btc_usd(fixtures: Path) -> dict[str, tuple[Decimal, Decimal]]:
    """(price, 24h BTC volume) per exchange, read from the recorded responses."""
    bitstamp = json.loads((fixtures / "bitstamp" / "rec_api_v2_ticker_btcusd_2017-10-03.json").read_text())
    coinbase = json.loads((fixtures / "coinbase" / "rec_products_btc-usd_ticker_2017-10-03.json").read_text())
    gemini = json.loads((fixtures / "gemini" / "rec_v1_pubticker_BTCUSD_2017-10-03.json").read_text())
    return {
        "bitstamp": (Decimal(bitstamp["last"]), Decimal(bitstamp["volume"])),
        "coinbase": (Decimal(coinbase["price"]), Decimal(coinbase["volume"])),
        "gemini": (Decimal(gemini["last"]), Decimal(gemini["volume"]["BTC"])),
    }


def tick(source: str, price: Decimal, volume: Decimal | None, *, age: float = 0.0, quote: str = "USD",
         base: str = "BTC", exchange_ts: datetime | None = None) -> TickMessage:  # fmt: skip
    received = datetime.now(UTC) - timedelta(seconds=age)
    ts = exchange_ts or received
    return TickMessage(
        tick_id=f"{source}:{base}{quote}:{ts.timestamp()}:{price}",
        source=source,
        base=base,
        quote=quote,
        pair=f"{base}{quote}",
        price=price,
        volume_24h=volume,
        exchange_ts=ts,
        received_at=received,
    )


def vwap(quotes: list[tuple[Decimal, Decimal]]) -> Decimal:
    """Volume-weighted mean, published with 15 significant digits (half-even) as the README states."""
    mean = sum((p * v for p, v in quotes), Decimal(0)) / sum((v for _, v in quotes), Decimal(0))
    return Context(prec=15, rounding=ROUND_HALF_EVEN).plus(mean)


async def consolidated(db, base: str = "BTC", vs: str = "USD"):
    return await db.fetchrow("SELECT * FROM prices WHERE base=$1 AND vs=$2", base, vs)


async def statuses(db, base: str = "BTC") -> dict[str, str]:
    rows = await db.fetch("SELECT source, status FROM source_quotes WHERE base=$1", base)
    return {r["source"]: r["status"] for r in rows}


async def test_volume_weighted_price_of_recorded_quotes(pricing, db, exchange_fixtures):
    quotes = recorded_btc_usd(exchange_fixtures)
    service = pricing()
    await service.apply_ticks([tick(name, p, v) for name, (p, v) in quotes.items()])
    row = await consolidated(db)
    assert row["price"] == vwap(list(quotes.values()))
    assert row["status"] == "fresh"
    assert row["sources_used"] == 3
    assert set((await statuses(db)).values()) == {"used"}


async def test_price_events_carry_the_spread_between_used_sources_outliers_left_out(pricing, db, exchange_fixtures):
    quotes = recorded_btc_usd(exchange_fixtures)
    service = pricing()
    bitstamp_price, bitstamp_volume = quotes["bitstamp"]
    ticks = [tick(name, p, v) for name, (p, v) in quotes.items()]
    ticks.append(tick("okx", bitstamp_price * 10, bitstamp_volume))  # an outlier: not part of the spread
    payloads = await service.apply_ticks(ticks)
    event = next(p for p in payloads if (p["base"], p["vs"]) == ("BTC", "USD"))
    used = [p for p, _v in quotes.values()]
    expected = Context(prec=6, rounding=ROUND_HALF_EVEN).divide((max(used) - min(used)) * 100, min(used))
    assert Decimal(event["spread_pct"]) == expected


async def test_a_tenfold_outlier_does_not_move_the_price(pricing, db, exchange_fixtures):
    quotes = recorded_btc_usd(exchange_fixtures)
    service = pricing()
    bitstamp_price, bitstamp_volume = quotes["bitstamp"]
    ticks = [tick(name, p, v) for name, (p, v) in quotes.items()]
    # A misbehaving venue: the recorded Bitstamp quote with its price multiplied by ten and a huge volume.
    ticks.append(tick("okx", bitstamp_price * 10, bitstamp_volume * 100))
    await service.apply_ticks(ticks)
    row = await consolidated(db)
    assert row["price"] == vwap(list(quotes.values()))
    assert (await statuses(db))["okx"] == "outlier"
    assert row["sources_used"] == 3


async def test_an_honest_venue_close_to_two_identical_ones_is_not_an_outlier(pricing, db, exchange_fixtures):
    price, volume = recorded_btc_usd(exchange_fixtures)["coinbase"]
    service = pricing()
    # Two venues a cent apart make the MAD a cent; a third 0.1% away must still count.
    await service.apply_ticks(
        [
            tick("a", price, volume),
            tick("b", price + Decimal("0.01"), volume),
            tick("c", price * Decimal("1.001"), volume),
        ]
    )
    assert set((await statuses(db)).values()) == {"used"}
    assert (await consolidated(db))["sources_used"] == 3


async def test_equal_quotes_give_that_quote(pricing, db, exchange_fixtures):
    price, volume = recorded_btc_usd(exchange_fixtures)["coinbase"]
    service = pricing()
    await service.apply_ticks([tick(name, price, volume / n) for n, name in enumerate(["a", "b", "c", "d"], 1)])
    assert (await consolidated(db))["price"] == price


async def test_a_silent_source_drops_out_after_its_maximum_age(pricing, db, exchange_fixtures):
    quotes = recorded_btc_usd(exchange_fixtures)
    service = pricing(source_max_age_rest_seconds=30)
    (p1, v1), (p2, v2), (p3, v3) = quotes["bitstamp"], quotes["coinbase"], quotes["gemini"]
    await service.apply_ticks([tick("bitstamp", p1, v1), tick("coinbase", p2, v2), tick("gemini", p3, v3, age=45)])
    row = await consolidated(db)
    assert row["price"] == vwap([(p1, v1), (p2, v2)])
    assert (await statuses(db))["gemini"] == "stale"
    assert row["sources_used"] == 2


async def test_refresh_ages_out_sources_without_new_ticks(pricing, db, exchange_fixtures):
    quotes = recorded_btc_usd(exchange_fixtures)
    service = pricing(source_max_age_rest_seconds=30)
    # Two sources that were fresh when they arrived 20 s ago ...
    await service.apply_ticks([tick(n, p, v, age=20) for n, (p, v) in list(quotes.items())[:2]])
    assert (await consolidated(db))["status"] == "fresh"
    # ... are past their age for a service whose limit is shorter: a refresh without ticks notices.
    stricter = pricing(source_max_age_rest_seconds=10)
    changed = await stricter.refresh(["BTC"])
    assert [(c["vs"], c["status"]) for c in changed] == [("USD", "stale")]
    assert (await consolidated(db))["status"] == "stale"
    assert set((await statuses(db)).values()) == {"stale"}


async def test_below_quorum_the_price_is_stale(pricing, db, exchange_fixtures):
    price, volume = recorded_btc_usd(exchange_fixtures)["gemini"]
    service = pricing(min_fresh_sources=2)
    await service.apply_ticks([tick("gemini", price, volume)])
    row = await consolidated(db)
    assert row["status"] == "stale"
    assert row["price"] == price


async def test_out_of_order_ticks_from_one_source_are_ignored(pricing, db, exchange_fixtures):
    price, volume = recorded_btc_usd(exchange_fixtures)["bitstamp"]
    service = pricing()
    now = datetime.now(UTC)
    newer = tick("bitstamp", price, volume, exchange_ts=now)
    older = tick("bitstamp", price - 100, volume, exchange_ts=now - timedelta(seconds=5))
    await service.apply_ticks([newer])
    await service.apply_ticks([older])
    stored = await db.fetchval("SELECT price FROM source_quotes WHERE source='bitstamp'")
    assert stored == price
    assert (await consolidated(db))["price"] == price
    # The late tick is still kept as history.
    assert await db.fetchval("SELECT count(*) FROM ticks WHERE source='bitstamp'") == 2


async def test_replaying_ticks_changes_nothing(pricing, db, redis, exchange_fixtures):
    quotes = recorded_btc_usd(exchange_fixtures)
    service = pricing()
    ticks = [tick(name, p, v) for name, (p, v) in quotes.items()]
    first = await service.apply_ticks(ticks)
    again = await service.apply_ticks(ticks)
    assert first and again == []
    assert await db.fetchval("SELECT count(*) FROM ticks") == 3


def ecb_rates(fixtures: Path) -> tuple[date, dict[str, Decimal]]:
    tree = ET.parse(fixtures / "ecb" / "eurofxref-daily_2025-05-09.xml")
    day_cube = next(c for c in tree.iter() if c.get("time"))
    return date.fromisoformat(day_cube.get("time")), {c.get("currency"): Decimal(c.get("rate")) for c in day_cube}


async def test_fiat_prices_are_derived_through_ecb_rates(pricing, db, exchange_fixtures):
    day, rates = ecb_rates(exchange_fixtures)
    await db.executemany(
        "INSERT INTO fiat_rates (currency, day, per_eur) VALUES ($1, $2, $3)",
        [(cur, day, rate) for cur, rate in rates.items()],
    )
    quotes = recorded_btc_usd(exchange_fixtures)
    service = pricing(vs_currencies=["USD", "EUR", "GBP", "JPY"])
    await service.apply_ticks([tick(name, p, v) for name, (p, v) in quotes.items()])
    usd = (await consolidated(db))["price"]
    gbp = await consolidated(db, vs="GBP")
    eur = await consolidated(db, vs="EUR")
    assert abs(gbp["price"] - usd * rates["GBP"] / rates["USD"]) <= usd * Decimal("1e-14")
    assert abs(eur["price"] - usd / rates["USD"]) <= usd * Decimal("1e-14")
    assert "ECB" in gbp["method"]


async def test_stablecoin_quotes_use_the_measured_rate(pricing, db, exchange_fixtures):
    quotes = recorded_btc_usd(exchange_fixtures)
    service = pricing(min_fresh_sources=1)
    price, volume = quotes["coinbase"]
    # Without a measured USDT/USD rate, parity is assumed and said.
    await service.apply_ticks([tick("binance", price, volume, quote="USDT")])
    row = await consolidated(db)
    assert row["price"] == price
    assert "stablecoin=parity" in row["method"]
    # Once USDT/USD is measured, USDT quotes are restated at that rate.
    await service.apply_ticks([tick("kraken", Decimal("0.9985"), Decimal(1000), base="USDT")])
    await service.apply_ticks([tick("binance", price, volume, quote="USDT")])
    row = await consolidated(db)
    assert row["price"] == price * Decimal("0.9985")
    assert "parity" not in row["method"]


async def test_tampered_cache_entry_is_discarded_and_rebuilt(pricing, db, redis, exchange_fixtures):
    quotes = recorded_btc_usd(exchange_fixtures)
    service = pricing()
    await service.apply_ticks([tick(name, p, v) for name, (p, v) in quotes.items()])
    key = service.settings.key("price", "BTC")
    blob = await redis.hget(key, "USD")
    signature, _, payload = blob.partition(b".")
    forged = json.loads(payload)
    forged["price"] = "1"
    await redis.hset(key, "USD", signature + b"." + json.dumps(forged, sort_keys=True, separators=(",", ":")).encode())
    found = await service.read_prices(["BTC"], ["USD"])
    assert Decimal(found[("BTC", "USD")]["price"]) == (await consolidated(db))["price"]
    # The rebuilt entry is signed again and accepted.
    assert (await service.cache.get([("BTC", "USD")]))[("BTC", "USD")]["price"] != "1"


async def test_parity_prices_restated_through_ecb_are_stored(pricing, db, exchange_fixtures):
    day, rates = ecb_rates(exchange_fixtures)
    await db.executemany(
        "INSERT INTO fiat_rates (currency, day, per_eur) VALUES ($1, $2, $3)",
        [(cur, day, rate) for cur, rate in rates.items()],
    )
    price, volume = recorded_btc_usd(exchange_fixtures)["coinbase"]
    service = pricing(vs_currencies=["USD", "EUR"], min_fresh_sources=1)
    await service.apply_ticks([tick("binance", price, volume, quote="USDT")])
    eur = await consolidated(db, vs="EUR")
    assert eur["method"].endswith("stablecoin=parity;via=USD*ECB")
    assert abs(eur["price"] - price / rates["USD"]) <= price * Decimal("1e-14")
