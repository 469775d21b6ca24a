"""ECB reference rates: recorded XML files from the fixtures, served by a local replay server, parsed and
stored; failures are logged, stored and reported in source health."""

from __future__ import annotations

import re
from datetime import date
from decimal import Decimal
from pathlib import Path

import pytest

from services.conversion.ecb import EcbError, parse
from services.conversion.service import ConversionService
from services.conversion.tasks import refresh_ecb_rates
from services.ingest.consumers import source_error_consumer
from shared.db import create_engine, session_factory
from shared.streams import StreamPublisher
from tests.conftest import make_settings
from tests.replay import ReplayServer, Reply

DAILY_2025 = "eurofxref-daily_2025-05-09.xml"
DAILY_2022 = "eurofxref-daily_2022-07-08.xml"
HIST_2017 = "eurofxref-hist-90d_2016-12-05_to_2017-03-03.xml"
HIST_2013 = "eurofxref-hist-90d_2012-10-29_to_2013-01-24.xml"
XML = {"Content-Type": "text/xml"}


def expected_rates(path: Path) -> dict[tuple[str, date], Decimal]:
    """An independent reading of the file (regular expressions, not the code under test)."""
    found: dict[tuple[str, date], Decimal] = {}
    text = path.read_text()
    for block in re.finditer(r"<Cube time=['\"](\d{4}-\d{2}-\d{2})['\"]>(.*?)</Cube>", text, re.S):
        day = date.fromisoformat(block.group(1))
        for cur, rate in re.findall(r"currency=['\"]([A-Z]{3})['\"] rate=['\"]([0-9.]+)['\"]", block.group(2)):
            found[(cur, day)] = Decimal(rate)
    return found


def serve_ecb(replay: ReplayServer, fixtures: Path, daily: str = DAILY_2025, history: str = HIST_2017) -> str:
    replay.serve("/stats/eurofxref/eurofxref-daily.xml", fixtures / "ecb" / daily, headers=XML)
    replay.serve("/stats/eurofxref/eurofxref-hist-90d.xml", fixtures / "ecb" / history, headers=XML)
    return replay.base_url + "/stats/eurofxref"


@pytest.fixture
async def ecb_env(exchange_fixtures, replay, settings, redis, monkeypatch):
    monkeypatch.setenv("COINLYTICS_SOURCE_ECB_REST_URL", serve_ecb(replay, exchange_fixtures))
    conf = make_settings(settings.database_url, settings.redis_url, settings.redis_namespace, sources=["ecb"])
    engine = create_engine(conf.require_database_url())
    sessions = session_factory(engine)
    service = ConversionService(conf, sessions=sessions, redis=redis)
    try:
        yield conf, sessions, service
    finally:
        await engine.dispose()


@pytest.mark.parametrize("name", [DAILY_2025, DAILY_2022, HIST_2017, HIST_2013])
def test_recorded_files_parse_to_every_rate(exchange_fixtures, name):
    path = exchange_fixtures / "ecb" / name
    parsed = parse(path.read_bytes())
    got = {(cur, day): rate for day, rates in parsed.days.items() for cur, rate in rates.items()}
    assert got == expected_rates(path)
    assert parsed.rejected == 0


def test_broken_documents_are_refused(exchange_fixtures):
    body = (exchange_fixtures / "ecb" / DAILY_2025).read_bytes()
    with pytest.raises(EcbError) as truncated:
        parse(body[: len(body) // 2])
    assert truncated.value.kind == "parse"
    with pytest.raises(EcbError):
        parse(b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><x>&a;</x>')
    # One bad entry is skipped and counted, the rest of the day is kept.
    damaged = body.replace(b"rate='163.36'", b"rate='-163.36'").replace(b"rate='1.9558'", b"rate='NaN'")
    parsed = parse(damaged)
    assert parsed.rejected == 2
    assert "JPY" not in parsed.days[date(2025, 5, 9)] and "BGN" not in parsed.days[date(2025, 5, 9)]
    assert parsed.days[date(2025, 5, 9)]["USD"] == Decimal("1.1252")


async def test_daily_and_history_are_stored_and_cached(ecb_env, exchange_fixtures, db, redis, replay):
    conf, sessions, service = ecb_env
    result = await refresh_ecb_rates(conf, sessions, redis, service)
    expected = expected_rates(exchange_fixtures / "ecb" / DAILY_2025)
    expected.update(expected_rates(exchange_fixtures / "ecb" / HIST_2017))
    rows = await db.fetch("SELECT currency, day, per_eur, source FROM fiat_rates")
    assert {(r["currency"], r["day"]): r["per_eur"] for r in rows} == expected
    assert {r["source"] for r in rows} == {"ecb"}
    assert result["latest_day"] == "2025-05-09"
    assert replay.count("/stats/eurofxref/eurofxref-hist-90d.xml") == 1
    health = {k.decode(): v.decode() for k, v in (await redis.hgetall(conf.key("source", "ecb"))).items()}
    assert health["state"] == "connected" and health["name"] == "ecb"
    assert int(health["messages_total"]) == len(expected)
    assert {"last_message_at", "last_error", "backoff_seconds", "errors", "messages_per_second"} <= set(health)
    table = await service.table()
    assert table.fiat_day == date(2025, 5, 9)
    assert table.edges[("EUR", "USD")].rate == Decimal("1.1252")
    # Legacy currencies of 2017 (RUB, HRK) are history, not current rates.
    assert not table.knows("RUB")

    # Idempotent: a second run stores the same rows, nothing more.
    await refresh_ecb_rates(conf, sessions, redis, service)
    again = await db.fetch("SELECT currency, day, per_eur FROM fiat_rates")
    assert {(r["currency"], r["day"]): r["per_eur"] for r in again} == expected


async def test_failures_are_logged_and_stored_rates_stay(ecb_env, exchange_fixtures, db, redis, replay):
    conf, sessions, service = ecb_env
    await refresh_ecb_rates(conf, sessions, redis, service)
    before = await db.fetchval("SELECT count(*) FROM fiat_rates")
    body = (exchange_fixtures / "ecb" / DAILY_2025).read_bytes()
    replay.fail_next("/stats/eurofxref/eurofxref-daily.xml", Reply(body=b"busy", status=503))
    replay.fail_next("/stats/eurofxref/eurofxref-daily.xml", Reply(body=body[:700], headers=XML))
    first = await refresh_ecb_rates(conf, sessions, redis, service)
    second = await refresh_ecb_rates(conf, sessions, redis, service)
    assert first["error"] == "http_status" and second["error"] == "parse"
    # The failures reach ingest's error log through the source-errors stream, once each however often the
    # reports are delivered.
    errors_consumer = source_error_consumer(redis, conf, sessions)
    await errors_consumer.ensure_group()
    await errors_consumer.step()
    await redis.xgroup_setid(f"{conf.redis_namespace}:stream:source-errors", "ingest-errors", id="0")
    await errors_consumer.step()
    errors = await db.fetch("SELECT source, kind, message FROM error_log ORDER BY id")
    assert [(e["source"], e["kind"]) for e in errors] == [("ecb", "http_status"), ("ecb", "parse")]
    assert "503" in errors[0]["message"]
    health = {k.decode(): v.decode() for k, v in (await redis.hgetall(conf.key("source", "ecb"))).items()}
    assert health["state"] == "error" and health["last_error_kind"] == "parse"
    assert health["errors"] == "http_status=1,parse=1"
    assert await db.fetchval("SELECT count(*) FROM fiat_rates") == before
    assert (await service.table()).edges[("EUR", "JPY")].rate == Decimal("163.36")


async def test_disabled_when_not_a_source(ecb_env, db, redis, replay):
    conf, sessions, service = ecb_env
    result = await refresh_ecb_rates(conf.model_copy(update={"sources": ["binance"]}), sessions, redis, service)
    assert "skipped" in result
    assert replay.requests == []
    assert await db.fetchval("SELECT count(*) FROM fiat_rates") == 0


async def test_a_malformed_source_error_report_is_dead_lettered_not_stored(ecb_env, redis, db):
    conf, sessions, _service = ecb_env
    publisher = StreamPublisher(redis, namespace=conf.redis_namespace, maxlen=conf.stream_maxlen)
    await publisher.publish("source-errors", {"id": "r1", "source": "ecb", "kind": "parse"})  # no message, no at
    await publisher.publish(
        "source-errors", {"id": "r2", "source": "ecb", "kind": "parse", "message": "x", "at": "yesterday"}
    )
    consumer = source_error_consumer(redis, conf, sessions)
    await consumer.ensure_group()
    await consumer.step()
    assert consumer.dead_lettered == 2
    assert await db.fetchval("SELECT count(*) FROM error_log") == 0
