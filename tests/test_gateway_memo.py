"""The gateway's read memo (services/gateway/memo.py), against real PostgreSQL, Redis and a served pricing app:
a repeated price read is answered by the gateway, yet a new price shows as soon as its event is on the prices
stream, a forged stream entry never puts a price in an answer, and an answer is never kept past the moment its
fresh price turns stale or when an event overtook the request."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import httpx
import pytest

from services.gateway import memo as memo_module
from services.gateway.app import create_app as gateway_app
from services.gateway.memo import ReadMemo
from services.pricing import service as pricing_service
from services.pricing.app import create_app as pricing_app
from services.pricing.service import PricingService
from shared.responses import MEMO_HEADER, MemoHint
from shared.streams import PRICES_STREAM, encode
from tests.conftest import eventually, free_port, serve_app
from tests.test_consolidation import recorded_btc_usd, tick

PRICE_READ = "/api/v1/prices?symbols=BTC&vs=USD"


@dataclass
class Stack:
    gateway: httpx.AsyncClient
    pricing: httpx.AsyncClient
    owner: PricingService  # consolidates, as the pricing shard that owns BTC would
    memo: ReadMemo


@pytest.fixture
async def stack(settings, pricing, monkeypatch) -> AsyncIterator[Stack]:
    # Answers never expire on their own here: only the stream can make the gateway show a new price.
    monkeypatch.setattr(pricing_service, "MEMO_SECONDS", 30.0)
    owner = pricing()
    absent = {f"{name}_url": f"http://127.0.0.1:{free_port()}" for name in ("conversion", "analytics", "alerting")}
    async with serve_app(pricing_app(settings)) as pricing_url:
        gateway = gateway_app(settings.model_copy(update={"pricing_url": pricing_url, **absent}))
        async with (
            serve_app(gateway) as gateway_url,
            httpx.AsyncClient(base_url=gateway_url, timeout=20) as gw,
            httpx.AsyncClient(base_url=pricing_url, timeout=20) as pr,
        ):
            memo: ReadMemo = gateway.state.upstreams.memo
            await eventually(lambda: _true(memo.live()))
            yield Stack(gw, pr, owner, memo)


async def _true(value: bool) -> bool:
    return value


def _price(response: httpx.Response) -> Decimal:
    assert response.status_code == 200, response.text
    return Decimal(str(json.loads(response.text, parse_float=Decimal)["BTC"]["USD"]["price"]))


async def _hits(client: httpx.AsyncClient) -> float:
    text = (await client.get("/metrics")).text
    found = re.search(r'^gateway_read_memo_total\{result="hit"\} (\S+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


async def _consolidate(owner: PricingService, quotes: dict[str, tuple[Decimal, Decimal]], factor: str) -> set[str]:
    results = await owner.apply_ticks([tick(name, p * Decimal(factor), v) for name, (p, v) in quotes.items()])
    return {str(p["price"]) for p in results if p["vs"] == "USD"}


async def test_a_repeated_price_read_is_answered_by_the_gateway_until_its_pair_has_news(
    stack: Stack, exchange_fixtures
) -> None:
    quotes = recorded_btc_usd(exchange_fixtures)
    first = await _consolidate(stack.owner, quotes, "1")
    assert len(first) == 1
    before = await _hits(stack.gateway)
    answers = [await stack.gateway.get(PRICE_READ) for _ in range(5)]
    assert {str(_price(a)) for a in answers} == first
    assert await _hits(stack.gateway) >= before + 4  # the first was forwarded, the rest came from the memo
    # The memo's own header stays between the gateway and pricing; pricing does send it.
    assert all(MEMO_HEADER not in a.headers for a in answers)
    assert MEMO_HEADER in (await stack.pricing.get(PRICE_READ)).headers
    # Every memoised answer still carries the gateway's own headers.
    assert all(a.headers.get("x-correlation-id") for a in answers)

    moved = await _consolidate(stack.owner, quotes, "1.01")
    assert moved and moved != first

    async def gateway_shows_the_new_price() -> bool:
        return str(_price(await stack.gateway.get(PRICE_READ))) in moved

    # With answers kept for 30 s, only the prices stream can have dropped the old one this soon.
    await eventually(gateway_shows_the_new_price, timeout=10)
    for _ in range(10):
        assert str(_price(await stack.gateway.get(PRICE_READ))) in moved


async def test_a_forged_stream_entry_only_drops_the_answer(stack: Stack, redis, settings, exchange_fixtures) -> None:
    true_price = await _consolidate(stack.owner, recorded_btc_usd(exchange_fixtures), "1")
    assert str(_price(await stack.gateway.get(PRICE_READ))) in true_price
    await eventually(lambda: _true(bool(stack.memo.copies)))
    forged = {"base": "BTC", "vs": "USD", "price": "1", "status": "fresh", "event_id": "forged",
              "last_updated": datetime.now(UTC).isoformat(), "sources_used": 9,
              "fresh_until": (datetime.now(UTC) + timedelta(hours=1)).isoformat()}  # fmt: skip
    await redis.xadd(settings.key("stream", PRICES_STREAM), encode(forged))
    await eventually(lambda: _true(not stack.memo.copies))
    # The next answers are pricing's (the true price), and the memo does not keep them under the forged
    # event's name: an answer naming another event than the last one heard is refused.
    for _ in range(3):
        assert str(_price(await stack.gateway.get(PRICE_READ))) in true_price
    assert not stack.memo.copies
    # An unreadable entry drops everything too.
    await _consolidate(stack.owner, recorded_btc_usd(exchange_fixtures), "1.02")
    await eventually(lambda: _memoised(stack))
    await redis.xadd(settings.key("stream", PRICES_STREAM), {"data": "not json"})
    await eventually(lambda: _true(not stack.memo.copies))


async def test_a_memoised_answer_still_goes_through_the_guard(stack: Stack, settings, exchange_fixtures) -> None:
    await _consolidate(stack.owner, recorded_btc_usd(exchange_fixtures), "1")
    await eventually(lambda: _memoised(stack))
    # A bad token is refused before the memo is asked, as for any forwarded request.
    refused = await stack.gateway.get(PRICE_READ, headers={"Authorization": "Bearer not-a-token"})
    assert refused.status_code == 401, refused.text
    # And every answer from the memo counts against the caller's rate limit.
    limit = settings.rate_limit_anonymous
    statuses = [(await stack.gateway.get(PRICE_READ)).status_code for _ in range(limit + 20)]
    assert 429 in statuses, statuses


async def _memoised(stack: Stack) -> bool:
    await stack.gateway.get(PRICE_READ)
    return bool(stack.memo.copies)


async def test_an_answer_is_kept_no_longer_than_its_fresh_price_stays_fresh(
    settings, redis, pricing, exchange_fixtures, monkeypatch
) -> None:
    monkeypatch.setattr(pricing_service, "MEMO_SECONDS", 30.0)
    service = pricing()
    payloads = await service.apply_ticks([tick(n, p, v) for n, (p, v) in recorded_btc_usd(exchange_fixtures).items()])
    event = next(p["event_id"] for p in payloads if p["vs"] == "USD")
    body, hint = await service.price_table(["BTC"], ["USD", "EUR"], [])
    assert body["BTC"]["USD"]["status"] == "fresh"
    # Both pairs are named, the gap (no EUR rate here) too, so either one's first price drops the answer.
    assert hint.pairs == {("BTC", "USD"): event, ("BTC", "EUR"): None}
    assert hint.ttl == 30.0  # test settings keep recorded prices fresh for years: the cap applies
    # A fresh price whose quorum runs out in 2 s: the answer may be reused for 2 s at most.
    key = settings.key("price", "BTC")
    signature, _, blob = (await redis.hget(key, "USD")).partition(b".")
    assert signature and blob
    stored = json.loads(blob)
    stored["fresh_until"] = (datetime.now(UTC) + timedelta(seconds=2)).isoformat()
    await service.cache.put([stored])
    _, hint = await service.price_table(["BTC"], ["USD"], [])
    assert 0 < hint.ttl <= 2.0
    parsed = MemoHint.parse(hint.header()[1])  # type: ignore[index]
    assert parsed is not None and parsed.pairs == hint.pairs and 0 < parsed.ttl <= 2.0


def _hint(**pairs: str | None) -> MemoHint:
    return MemoHint(ttl=30.0, pairs={tuple(name.split("_")): event for name, event in pairs.items()})  # type: ignore[misc]


def test_an_answer_overtaken_by_an_event_is_not_kept(monkeypatch) -> None:
    memo = ReadMemo()
    keep = {"status": 200, "body": b"{}", "headers": [], "template": None}
    assert not memo.store("k", memo.ticket(), _hint(BTC_USD="e1"), **keep)  # the reader has not reported in
    memo.heard()
    memo.price_event(("BTC", "USD"), "e2")
    # A replica that has not caught up answers with e1 after the gateway heard e2: not kept.
    assert not memo.store("k", memo.ticket(), _hint(BTC_USD="e1"), **keep)
    assert memo.store("k", memo.ticket(), _hint(BTC_USD="e2"), **keep)
    assert memo.lookup("k") is not None
    # News for another pair leaves it; news for its own drops it.
    memo.price_event(("ETH", "USD"), "e3")
    assert memo.lookup("k") is not None
    memo.price_event(("BTC", "USD"), "e4")
    assert memo.lookup("k") is None
    # A conversion's answer goes with any event, and is not kept if one came after it was asked for.
    any_pair = MemoHint(ttl=30.0, pairs={}, any_pair=True)
    monkeypatch.setattr(memo_module, "SETTLE_SECONDS", 0.1)
    time.sleep(0.15)
    ticket = memo.ticket()
    memo.price_event(("XRP", "USD"), "e5")
    assert not memo.store("c", ticket, any_pair, **keep)
    # Asked right after an event: the service may not have applied it yet.
    assert not memo.store("c", memo.ticket(), any_pair, **keep)
    time.sleep(0.15)
    assert memo.store("c", memo.ticket(), any_pair, **keep)
    memo.price_event(("XRP", "USD"), "e6")
    assert memo.lookup("c") is None
    # Asked before everything was dropped (an unreadable entry, an outage): not kept.
    ticket = memo.ticket()
    memo.clear()
    assert not memo.store("k", ticket, _hint(BTC_USD="e4"), **keep)
    # An id heard again (a replay, or a forgery naming a genuine older event) does not become the last one: an
    # answer from a replica still at that older event is not kept.
    memo.price_event(("BTC", "USD"), "e7")
    memo.price_event(("BTC", "USD"), "e4")
    assert not memo.store("k", memo.ticket(), _hint(BTC_USD="e4"), **keep)
    assert memo.store("k", memo.ticket(), _hint(BTC_USD="e7"), **keep)
    # The reader lost Redis: nothing is used or kept until it hears from Redis again.
    memo.clear(outage=True)
    assert memo.lookup("k") is None
    assert not memo.store("k", memo.ticket(), _hint(BTC_USD="e7"), **keep)
    memo.heard()
    assert memo.store("k", memo.ticket(), _hint(BTC_USD="e7"), **keep)


def test_the_copies_stay_within_their_byte_budget(monkeypatch) -> None:
    monkeypatch.setattr(memo_module, "MAX_TOTAL_BYTES", 10_000)
    memo = ReadMemo()
    memo.heard()
    for i in range(30):
        hint = MemoHint(ttl=30.0, pairs={(f"C{i}", "USD"): None})
        assert memo.store(f"k{i}", memo.ticket(), hint, status=200, body=b"x" * 1000, headers=[], template=None)
    assert sum(len(c.body) for c in memo.copies.values()) <= 10_000
    assert "k29" in memo.copies and "k0" not in memo.copies  # the oldest went first
    memo.price_event(("C29", "USD"), "e")  # a drop gives its bytes back
    assert "k29" not in memo.copies


async def test_answers_expire_and_are_not_used_once_the_reader_falls_silent(monkeypatch) -> None:
    memo = ReadMemo()
    memo.heard()
    keep = {"status": 200, "body": b"{}", "headers": [], "template": None}
    assert memo.store("k", memo.ticket(), MemoHint(ttl=0.2, pairs={("BTC", "USD"): None}), **keep)
    assert memo.lookup("k") is not None
    await asyncio.sleep(0.3)
    assert memo.lookup("k") is None
    assert memo.store("k", memo.ticket(), MemoHint(ttl=30, pairs={("BTC", "USD"): None}), **keep)
    monkeypatch.setattr(memo_module, "LIVE_SECONDS", 0.1)
    await asyncio.sleep(0.2)
    assert memo.lookup("k") is None


def test_the_hint_header_refuses_what_it_did_not_write() -> None:
    for value in ["", "x BTC/USD=-", "0 BTC/USD=-", "61 BTC/USD=-", "1 BTCUSD=-", "1 BTC/USD", "1 /USD=e", "1"]:
        assert MemoHint.parse(value) is None, value
    assert MemoHint.parse("0.5 *") == MemoHint(ttl=0.5, pairs={}, any_pair=True)
    wide = MemoHint(ttl=1, pairs={(f"C{i}", "USD"): None for i in range(51)})
    assert wide.header() is None  # too many pairs to be worth marking
