"""Alerts from a price on the prices stream to a delivered message, through the real alerting service (its
evaluator, its delivery worker) and gateway, with a real local webhook receiver, SMTP server and a
Twilio-shaped SMS endpoint: exactly once by event id through outages, restarts and redeliveries."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
from aiohttp import web

from services.alerting.app import create_app as alerting_app
from services.alerting.engine import Trigger
from services.alerting.evaluation import DELIVERY_QUEUE, EvaluationService, delivery_job_id
from services.gateway.app import create_app as gateway_app
from shared.jobs import JobQueue
from shared.streams import ALERT_EVENTS_STREAM, PRICES_STREAM, StreamPublisher
from tests.accounts import bearer, register, tokens
from tests.conftest import eventually, free_port, serve_app
from tests.standard_webhooks import verify_standard_webhook

FAST_RETRIES = [0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3]


@dataclass
class Receiver:
    """A webhook endpoint on 127.0.0.1 that answers ``status`` and keeps what it got, by webhook-id."""

    port: int = field(default_factory=free_port)
    status: int = 200
    hold: asyncio.Event | None = None
    received: list[dict[str, Any]] = field(default_factory=list)
    acknowledged: list[str] = field(default_factory=list)
    runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        entry = {"headers": dict(request.headers), "body": body, "id": request.headers.get("webhook-id")}
        self.received.append(entry)
        if self.hold is not None:
            await self.hold.wait()
        transport = request.transport
        if transport is None or transport.is_closing():
            return web.Response(status=499)  # the sender hung up: nothing it can have seen as delivered
        if self.status < 300:
            self.acknowledged.append(str(entry["id"]))
        return web.Response(status=self.status)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


@dataclass
class Platform:
    client: httpx.AsyncClient
    alerting: Any  # the alerting FastAPI app (its state holds the evaluator)
    publisher: StreamPublisher
    settings: Any

    async def price(
        self, value: str, *, symbol: str = "BTC", vs: str = "USD", status: str = "fresh", event_id: str | None = None
    ) -> str:
        now = datetime.now(UTC)
        event_id = event_id or uuid.uuid4().hex
        await self.publisher.publish(
            PRICES_STREAM,
            {
                "event_id": event_id,
                "base": symbol,
                "vs": vs,
                "price": value,
                "volume_24h": None,
                "status": status,
                "sources_used": 3,
                "sources_total": 3,
                "method": "median",
                "last_updated": now.isoformat().replace("+00:00", "Z"),
                "fresh_until": (now + timedelta(seconds=30)).isoformat().replace("+00:00", "Z"),
                "spread_pct": "0.1",
            },
        )
        return event_id

    async def rule_loaded(self, alert_id: str) -> None:
        evaluation: EvaluationService = self.alerting.state.evaluation

        async def loaded() -> bool:
            return evaluation.leading and alert_id in evaluation.engine.rules

        await eventually(loaded)


@contextlib.asynccontextmanager
async def running_platform(settings: Any, db: Any, redis: Any, **overrides: Any) -> AsyncIterator[Platform]:
    common = settings.model_copy(
        update={
            "internal_auth_required": True,
            "webhook_allow_private": True,
            "alert_retry_schedule": FAST_RETRIES,
            **overrides,
        }
    )
    app = alerting_app(common)
    async with serve_app(app) as alerting_url:
        gw = common.model_copy(update={"alerting_url": alerting_url})
        async with serve_app(gateway_app(gw)) as url, httpx.AsyncClient(base_url=url, timeout=20) as client:
            publisher = StreamPublisher(redis, namespace=common.redis_namespace, maxlen=10_000)
            yield Platform(client, app, publisher, common)


async def coins(db: Any) -> None:
    await db.execute(
        "INSERT INTO coins (symbol, name, active) VALUES ('BTC', 'Bitcoin', true), ('ETH', 'Ether', true) "
        "ON CONFLICT DO NOTHING"
    )


async def user(client: httpx.AsyncClient, email: str) -> dict[str, str]:
    await register(client, email)
    return bearer((await tokens(client, email))["access_token"])


async def create_alert(platform: Platform, headers: dict[str, str], **body: Any) -> dict[str, Any]:
    payload = {"symbol": "BTC", "vs": "USD", "condition": "above", "threshold": "100", "cooldown_seconds": 0}
    payload.update(body)
    response = await platform.client.post("/api/v1/alerts", json=payload, headers=headers)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    await platform.rule_loaded(created["id"])
    return created


async def events_of(platform: Platform, headers: dict[str, str], alert_id: str) -> list[dict[str, Any]]:
    response = await platform.client.get(f"/api/v1/alerts/{alert_id}/events", headers=headers)
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


async def settled_events(
    platform: Platform,
    headers: dict[str, str],
    alert_id: str,
    *,
    count: int = 1,
    status: str | None = None,
    timeout: float = 15.0,
) -> list[dict[str, Any]]:
    """The alert's events once there are ``count`` of them and (given ``status``) every first delivery has it."""

    async def ready() -> list[dict[str, Any]] | None:
        items = await events_of(platform, headers, alert_id)
        if len(items) < count:
            return None
        if status is not None and any(e["deliveries"][0]["status"] != status for e in items):
            return None
        return items

    found: list[dict[str, Any]] = await eventually(ready, timeout=timeout)
    return found


async def test_receiver_down_then_up_gets_each_event_once_by_id_with_a_valid_signature(settings, db, redis):
    await coins(db)
    receiver = Receiver()  # not listening yet: connections are refused
    async with running_platform(settings, db, redis) as platform:
        headers = await user(platform.client, "hook@example.com")
        created = await create_alert(platform, headers, channels=[{"type": "webhook", "url": receiver.url}])
        secret = created["channels"][0]["secret"]
        await platform.price("99")
        await platform.price("101")  # crosses 100: fires
        await platform.price("102")  # still above: nothing more
        await platform.price("99.5")  # back below by more than the band: re-armed
        await platform.price("100.5")  # fires again

        async def retrying() -> list[dict[str, Any]] | None:
            items = await events_of(platform, headers, created["id"])
            attempts = [d["attempts"] for e in items for d in e["deliveries"]]
            return items if len(items) == 2 and min(attempts) >= 2 else None

        down = await eventually(retrying)
        assert all(e["deliveries"][0]["status"] == "retrying" for e in down)
        assert all("refused" in (e["deliveries"][0]["last_error"] or "").lower() for e in down), down

        await receiver.start()
        try:
            items = await settled_events(platform, headers, created["id"], count=2, status="delivered")
            await asyncio.sleep(1.0)  # a duplicate, if any were coming, would have arrived by now
        finally:
            await receiver.stop()

    event_ids = sorted(e["id"] for e in items)
    assert sorted(receiver.acknowledged) == event_ids, "each event delivered exactly once, by its id"
    assert len(receiver.received) == 2
    for entry in receiver.received:
        body = verify_standard_webhook(secret, entry["headers"], entry["body"])
        assert body["type"] == "alert.triggered" and body["id"] == entry["id"]
        assert body["data"]["symbol"] == "BTC" and body["data"]["condition"] == "above"
        assert Decimal(body["data"]["threshold"]) == 100
    prices = sorted(Decimal(json.loads(e["body"])["data"]["price"]) for e in receiver.received)
    assert prices == [Decimal("100.5"), Decimal("101")]
    assert all(e["condition"] == "above" and Decimal(str(e["value"])) in prices for e in items)


async def test_stale_prices_never_fire_and_the_next_fresh_one_does(settings, db, redis):
    await coins(db)
    receiver = Receiver()
    await receiver.start()
    try:
        async with running_platform(settings, db, redis) as platform:
            headers = await user(platform.client, "stale@example.com")
            created = await create_alert(
                platform,
                headers,
                condition="below",
                threshold="50",
                channels=[{"type": "webhook", "url": receiver.url}],
            )
            await platform.price("60")
            await platform.price("40", status="stale")
            marker = await platform.price("61", symbol="ETH")  # a later entry, to know the stale one was read
            evaluation: EvaluationService = platform.alerting.state.evaluation
            await eventually(lambda: _consumed(redis, settings, marker))
            assert await events_of(platform, headers, created["id"]) == []
            assert evaluation.fired == 0
            await platform.price("45")  # fresh, below: the crossing counts now

            items = await settled_events(platform, headers, created["id"], status="delivered")
    finally:
        await receiver.stop()
    assert len(items) == 1 and Decimal(str(items[0]["price"])) == 45
    assert len(receiver.acknowledged) == 1


async def _consumed(redis: Any, settings: Any, event_id: str) -> bool:
    """True once the evaluator's group has acknowledged the entry carrying ``event_id``."""
    stream = settings.key("stream", PRICES_STREAM)
    entries = await redis.xrange(stream)
    entry_id = next((i for i, f in entries if json.loads(f[b"data"]).get("event_id") == event_id), None)
    if entry_id is None:
        return False
    groups = {g["name"].decode(): g for g in await redis.xinfo_groups(stream)}
    group = groups.get("alerting")
    if group is None:
        return False
    pending = await redis.xpending_range(stream, "alerting", min=entry_id, max=entry_id, count=1)
    return bool(group["last-delivered-id"] >= entry_id and not pending)


async def test_a_stopped_worker_mid_delivery_loses_nothing_and_is_acknowledged_once(settings, db, redis):
    await coins(db)
    receiver = Receiver(hold=asyncio.Event())
    await receiver.start()
    try:
        async with running_platform(settings, db, redis) as platform:
            headers = await user(platform.client, "crash@example.com")
            created = await create_alert(platform, headers, channels=[{"type": "webhook", "url": receiver.url}])
            await platform.price("99")
            await platform.price("101")
            # The delivery is in flight: the receiver has the request and has not answered.
            await eventually(lambda: _truthy(len(receiver.received) == 1))
        # The whole alerting service stopped mid-delivery (its worker cancelled the send); a new one starts.
        receiver.hold.set()
        receiver.hold = None
        async with running_platform(settings, db, redis) as platform:
            items = await settled_events(platform, headers, created["id"], status="delivered", timeout=30)
            await asyncio.sleep(1.0)
    finally:
        await receiver.stop()
    assert len(items) == 1
    # At least once, by one id: the cancelled attempt reached the receiver but never got its answer, the
    # retry carries the same webhook-id (receivers deduplicate on it), and only one was answered 2xx.
    assert [e["id"] for e in receiver.received] == [items[0]["id"], items[0]["id"]]
    assert receiver.acknowledged == [items[0]["id"]]
    assert items[0]["deliveries"][0]["attempts"] == 2


async def _truthy(value: bool) -> bool:
    return value


async def test_a_redelivered_price_and_a_second_replica_fire_no_second_event(settings, db, redis, sessions):
    """What a consumer that died between its commit and its ack (or before it saved its references) leaves
    behind: the same crossing seen again, by a restarted or another replica, from the same price event or a
    newer one, stores no second event and enqueues no second delivery job."""
    await coins(db)
    receiver = Receiver()
    async with running_platform(settings, db, redis) as platform:
        headers = await user(platform.client, "replica@example.com")
        created = await create_alert(platform, headers, channels=[{"type": "webhook", "url": receiver.url}])
    # The service is stopped; evaluators replay prices over the stored rules, one after another.
    common = platform.settings
    references = common.key("alerting", "evaluator", "references")
    jobs = JobQueue(common)
    publisher = StreamPublisher(redis, namespace=common.redis_namespace, maxlen=10_000)
    t0 = datetime.now(UTC).replace(microsecond=0)
    p1, p2, p3 = (
        _update(price, f"price-{n}", t0 + timedelta(seconds=n)) for n, price in ((1, "99"), (2, "101"), (3, "102"))
    )
    try:
        first = EvaluationService(common, sessions, redis, publisher, jobs, consumer_name="first")
        await redis.delete(references)
        await first.load()
        await first.evaluate([p1])
        after_p1 = await redis.hgetall(references)
        await first.evaluate([p2])  # fires, commits...
        await redis.delete(references)
        await redis.hset(references, mapping=after_p1)  # ...and dies before its references are saved
        second = EvaluationService(common, sessions, redis, publisher, jobs, consumer_name="second")
        await second.load()
        await second.evaluate([p3])  # a newer price shows the same crossing: 99 -> 102
        third = EvaluationService(common, sessions, redis, publisher, jobs, consumer_name="third")
        await redis.delete(references)
        await third.load()
        await third.evaluate([p1, p2])  # the redelivered batch
    finally:
        await jobs.close()
    rows = await db.fetch("SELECT id FROM alert_events WHERE alert_id = $1", uuid.UUID(created["id"]))
    assert len(rows) == 1
    assert (first.fired, second.fired, third.fired) == (1, 0, 0)
    queue = common.key("arq", DELIVERY_QUEUE)
    queued = [j.decode() for j in await redis.zrange(queue, 0, -1)]
    assert queued == [delivery_job_id(rows[0]["id"], 0)]
    pushed = await redis.xrange(common.key("stream", ALERT_EVENTS_STREAM))
    assert len(pushed) == 1 and json.loads(pushed[0][1][b"data"])["id"] == str(rows[0]["id"])


def _update(price: str, event_id: str, at: datetime) -> Any:
    from services.alerting.evaluation import PriceUpdate
    from shared.streams import StreamMessage, encode

    payload = {
        "event_id": event_id, "base": "BTC", "vs": "USD", "price": price, "status": "fresh",
        "last_updated": at.isoformat(),
    }  # fmt: skip
    return PriceUpdate(StreamMessage(id="1-0", fields=encode(payload)))


async def test_only_one_replica_evaluates_and_a_standby_takes_over(settings, db, redis, sessions):
    await coins(db)
    jobs = JobQueue(settings)
    publisher = StreamPublisher(redis, namespace=settings.redis_namespace, maxlen=10_000)
    replicas = [EvaluationService(settings, sessions, redis, publisher, jobs, consumer_name=n) for n in "ab"]
    stops = [asyncio.Event(), asyncio.Event()]
    runs = [asyncio.create_task(r.run(s)) for r, s in zip(replicas, stops, strict=True)]
    try:
        await eventually(lambda: _truthy(any(r.leading for r in replicas)))
        await asyncio.sleep(0.5)
        assert [r.leading for r in replicas].count(True) == 1
        leader = next(i for i, r in enumerate(replicas) if r.leading)
        stops[leader].set()  # the leader stops (and gives up its lease)
        await runs[leader]
        other = replicas[1 - leader]
        await eventually(lambda: _truthy(other.leading), timeout=15)
    finally:
        for stop in stops:
            stop.set()
        await asyncio.gather(*runs, return_exceptions=True)
        await jobs.close()


async def test_a_410_disables_the_webhook_and_429_retry_after_is_honoured(settings, db, redis):
    await coins(db)
    gone = Receiver(status=410)
    await gone.start()
    try:
        async with running_platform(settings, db, redis) as platform:
            headers = await user(platform.client, "gone@example.com")
            created = await create_alert(platform, headers, channels=[{"type": "webhook", "url": gone.url}])
            await platform.price("99")
            await platform.price("101")

            items = await settled_events(platform, headers, created["id"], status="disabled")
            assert items[0]["deliveries"][0]["attempts"] == 1
            alert = (await platform.client.get(f"/api/v1/alerts/{created['id']}", headers=headers)).json()
            assert alert["channels"][0]["disabled"] is True and "410" in alert["channels"][0]["disabled_reason"]
            await platform.price("99")
            await platform.price("101")

            items = await settled_events(platform, headers, created["id"], count=2)
            assert items[0]["deliveries"][0]["status"] == "skipped"
    finally:
        await gone.stop()
    assert len(gone.received) == 1, "a disabled endpoint is not called again"


@pytest.mark.parametrize("channel", ["email", "sms"])
async def test_email_and_sms_alerts_arrive_and_the_unsubscribe_link_works(settings, db, redis, smtp, channel):
    await coins(db)
    sms_calls: list[dict[str, str]] = []

    async def twilio(request: web.Request) -> web.Response:
        sms_calls.append(dict(await request.post()))
        return web.json_response({"sid": "SM" + uuid.uuid4().hex, "status": "queued"}, status=201)

    sms_app = web.Application()
    sms_app.router.add_post("/2010-04-01/Accounts/AC123/Messages.json", twilio)
    runner = web.AppRunner(sms_app)
    await runner.setup()
    sms_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", sms_port).start()
    sms_url = f"http://AC123:secret-token@127.0.0.1:{sms_port}/2010-04-01/Accounts/AC123/Messages.json"
    try:
        async with running_platform(settings, db, redis, smtp_url=smtp.url, sms_url=sms_url) as platform:
            headers = await user(platform.client, f"{channel}@example.com")
            target = (
                {"type": "email", "to": "trader@example.com"}
                if channel == "email"
                else {"type": "sms", "to": "+15005550006"}
            )
            created = await create_alert(platform, headers, channels=[target])
            await platform.price("99")
            await platform.price("101")

            await settled_events(platform, headers, created["id"], status="delivered")
            if channel == "sms":
                assert len(sms_calls) == 1 and sms_calls[0]["To"] == "+15005550006"
                assert "BTC" in sms_calls[0]["Body"] and "100" in sms_calls[0]["Body"]
                return
            message = await smtp.wait_for("trader@example.com", "BTC")
            link = message["List-Unsubscribe"].strip("<>")
            path = link[link.index("/api/v1/") :]
            page = await platform.client.get(path)
            assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
            assert 'method="post"' in page.text, "opening the link only asks; the button acts"
            alert = (await platform.client.get(f"/api/v1/alerts/{created['id']}", headers=headers)).json()
            assert not alert["channels"][0].get("disabled")
            tampered = await platform.client.post(path[:-3] + ("aaa" if not path.endswith("aaa") else "bbb"))
            assert tampered.status_code == 422
            answer = await platform.client.post(path)
            assert answer.status_code == 200, answer.text
            assert answer.json()["unsubscribed"] is True and answer.json()["to"] == "trader@example.com"
            alert = (await platform.client.get(f"/api/v1/alerts/{created['id']}", headers=headers)).json()
            assert alert["channels"][0]["disabled"] is True
            # The link was made for that address: once the channel sends elsewhere, it stops nothing.
            moved = await platform.client.patch(
                f"/api/v1/alerts/{created['id']}",
                json={"channels": [{"type": "email", "to": "desk@example.com"}]},
                headers=headers,
            )
            assert moved.status_code == 200, moved.text
            stale = await platform.client.post(path)
            assert stale.status_code == 422
    finally:
        await runner.cleanup()


def test_trigger_event_payload_is_the_documented_webhook_envelope():
    from services.alerting.evaluation import event_payload, webhook_body

    class _Alert:
        id = uuid.uuid4()
        user_id = uuid.uuid4()
        window_minutes = None

    at = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    trigger = Trigger(str(_Alert.id), "BTC", "USD", "above", Decimal(100), Decimal(101), Decimal(99), Decimal(101), at)
    payload = event_payload(uuid.uuid4(), _Alert(), trigger, at)  # type: ignore[arg-type]
    envelope = json.loads(webhook_body(payload))
    assert set(envelope) == {"type", "id", "created_at", "data"}
    assert envelope["type"] == "alert.triggered" and envelope["id"] == payload["id"]
    assert "user_id" not in envelope["data"] and envelope["data"]["price"] == "101"


async def test_percent_change_rules_take_the_window_start_from_stored_candles(settings, db, redis):
    """A percent-change rule needs the price a window ago; the evaluator reads it from the 1-minute candles
    instead of waiting a whole window of live prices (after a restart, or for a new rule)."""
    await coins(db)
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    for minutes in range(45, 0, -1):
        await db.execute(
            "INSERT INTO candles (base, vs, interval, t, open, high, low, close) "
            "VALUES ('BTC', 'USD', '1m', $1, 100, 100, 100, 100)",
            now - timedelta(minutes=minutes),
        )
    receiver = Receiver()
    await receiver.start()
    try:
        async with running_platform(settings, db, redis) as platform:
            headers = await user(platform.client, "pct@example.com")
            created = await create_alert(
                platform,
                headers,
                condition="pct_change_up",
                threshold="5",
                window_minutes=30,
                channels=[{"type": "webhook", "url": receiver.url}],
            )
            await platform.price("102")  # +2% on the price 30 minutes ago
            await platform.price("106")  # +6%: crosses 5%

            items = await settled_events(platform, headers, created["id"])
    finally:
        await receiver.stop()
    assert len(items) == 1 and items[0]["condition"] == "pct_change_up"
    assert Decimal(str(items[0]["value"])) == Decimal(6)
