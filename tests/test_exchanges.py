"""The exchange registry and the one-copy helpers of issue 9: every venue module is found and has its replay
test, the backoff policy and Retry-After parser every client uses, and the source-health codec all writers
share (real Redis)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
import structlog

from services.conversion.tasks import write_health
from services.ingest.exchanges import our_symbol, venues
from services.ingest.exchanges.base import Venue, WsProtocol
from services.ingest.rest import profile_for
from services.ingest.ws import protocol_for
from services.pricing.history.backfill import OhlcvSource
from shared.backoff import jittered_backoff
from shared.http import rebase_url
from shared.source_health import SourceHealth, SourceState, health_key, load_health, parse_health, save_health
from tests.replay import Reply
from tests.test_history import KUCOIN_CANDLES, serve_kucoin
from tests.test_rest_sources import SPECS
from tests.test_ws_sources import WS_SPECS


def test_every_venue_module_is_registered_with_its_replay_tests():
    found = venues()
    assert set(found) == {"binance", "kraken", "coinbase", "bitstamp", "okx", "kucoin", "gemini"}
    assert all(isinstance(v, Venue) and v.rate_limit for v in found.values())
    # Adding a venue module without its recorded replay test fails here.
    assert set(found) == set(SPECS)
    assert {name for name, v in found.items() if v.websocket is not None} == set(WS_SPECS)
    for name, venue in found.items():
        assert profile_for(name) is venue.profile
        protocol = protocol_for(name)
        assert (protocol is None) == (venue.websocket is None)
        if protocol is not None:
            assert isinstance(protocol, WsProtocol) and protocol.name == name


def test_unprofiled_ccxt_exchanges_and_unknown_names():
    assert profile_for("bybit").ccxt_id == "bybit" and protocol_for("bybit") is None
    with pytest.raises(ValueError, match="ccxt has no exchange"):
        profile_for("no-such-exchange")


def test_venue_aliases_apply_to_every_source():
    assert (our_symbol("xbt"), our_symbol("ZUSD"), our_symbol("eth")) == ("BTC", "USD", "ETH")


def test_rebase_keeps_the_endpoint_path_and_query():
    assert (
        rebase_url("https://api.x.com/v1/t?a=1", "http://127.0.0.1:9/mirror/") == "http://127.0.0.1:9/mirror/v1/t?a=1"
    )
    assert rebase_url("wss://ws.okx.com:8443/ws/v5/public", "ws://h:1") == "ws://h:1/ws/v5/public"


@pytest.mark.parametrize("jitter", ["full", "equal", "none"])
def test_jittered_backoff_bounds(jitter):
    rng_state = random.getstate()
    try:
        random.seed(7)
        for attempt in range(1, 40):
            ceiling = min(30.0, 0.5 * 2 ** (attempt - 1))
            low = {"full": 0.0, "equal": ceiling / 2, "none": ceiling}[jitter]
            delays = [jittered_backoff(attempt, base=0.5, cap=30.0, jitter=jitter) for _ in range(50)]
            assert all(low <= d <= ceiling for d in delays), (attempt, delays)
            if jitter != "none" and ceiling > 1:
                assert len(set(delays)) > 1  # jittered, not a fixed step
            floored = [jittered_backoff(attempt, base=0.5, cap=30.0, floor=5.0, jitter=jitter) for _ in range(50)]
            assert all(max(low, 5.0) <= d <= max(ceiling, 5.0) for d in floored)
    finally:
        random.setstate(rng_state)


async def test_health_codec_round_trips_through_redis(redis, settings):
    health = SourceHealth(name="binance", kind="ws", state=SourceState.BANNED, reconnects=2)
    health.failed("banned", "HTTP 418", state=SourceState.BANNED, backoff_seconds=130.0)
    health.count("malformed", 3)
    key = health_key(settings, "binance")
    await save_health(redis, key, health)
    stored = parse_health(await redis.hgetall(key))
    assert stored["state"] == "banned" and stored["backoff_seconds"] == 130.0 and stored["reconnects"] == 2
    assert stored["errors"] == {"banned": 1, "malformed": 3} and stored["last_error_kind"] == "banned"
    again = await load_health(redis, key, name="binance", kind="ws")
    assert again.state is SourceState.BANNED and again.errors == health.errors
    assert await load_health(redis, health_key(settings, "nothing"), name="nothing", kind="rest") == SourceHealth(
        name="nothing", kind="rest"
    )


async def test_the_ecb_job_writes_health_through_the_shared_codec(redis, settings):
    await write_health(redis, settings, ok=False, kind="parse", message="bad XML")
    await write_health(redis, settings, ok=False, kind="parse", message="bad XML")
    await write_health(redis, settings, ok=True, stored=30, rejected=1)
    stored = parse_health(await redis.hgetall(health_key(settings, "ecb")))
    assert stored["state"] == SourceState.CONNECTED and stored["errors"] == {"parse": 2}
    assert (stored["messages_total"], stored["rejected_total"]) == (30, 1) and stored["last_message_at"]
    # Every field the shared codec writes, the ECB's entry has too.
    assert set(await redis.hgetall(health_key(settings, "ecb"))) >= {
        k.encode() for k in SourceHealth(name="x", kind="y").as_redis()
    }


async def test_backfill_honours_a_retry_after_date(replay, exchange_fixtures):
    serve_kucoin(replay, exchange_fixtures)
    when = datetime.now(UTC) + timedelta(seconds=3)
    body = b'{"code":"429000","msg":"Too Many Requests"}'
    replay.fail_next(KUCOIN_CANDLES, Reply(body=body, status=429, headers={"Retry-After": format_datetime(when, True)}))
    source = OhlcvSource("kucoin", rest_url=replay.base_url, timeout_seconds=5, max_attempts=2, base_delay=0.01)
    try:
        await source.open()
        with structlog.testing.capture_logs() as logs:
            rows = await source.fetch("BTC/USDT", "1d", int((when - timedelta(days=5)).timestamp() * 1000), 3)
    finally:
        await source.close()
    assert isinstance(rows, list)
    (retry,) = [e for e in logs if e["event"] == "backfill_retry"]
    # Seconds-only parsing ignored the date and retried after the tiny base delay.
    assert retry["delay"] >= 1
