"""kill -9 the alerting service (its arq delivery worker runs inside it) while webhook deliveries are in flight.

A real webhook receiver on 127.0.0.1 takes the first request of every delivery and does not answer; once every
one is held, the alerting process is killed with SIGKILL, the held requests are let go (their sender is gone,
so none of them is acknowledged) and the service is started again. arq runs a job whose worker died again once
its in-progress marker expires (the delivery job's timeout plus arq's 10 s), and the receiver finally answers.
What must hold: every request of an event carries that event's webhook-id with a valid Standard Webhooks
signature, each event is acknowledged exactly once, the database has one event per alert and its one delivery
row ``delivered``, and nothing fired twice.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from aiohttp import web

from services.alerting.tasks import DELIVERY_JOB_TIMEOUT
from shared.jobs import in_progress_expiry
from shared.streams import PRICES_STREAM, StreamPublisher
from tests.accounts import bearer, register, tokens
from tests.conftest import eventually
from tests.reliability.platform import by_scale
from tests.standard_webhooks import verify_standard_webhook
from tests.test_alert_delivery import Receiver, _truthy

THRESHOLD = "100"
# A one-shot alert made after the others, below THRESHOLD: the evaluator applies alert changes in the order they
# were made, so once the probe has fired every alert made before it is in the engine.
PROBE_THRESHOLD = "99.2"
BELOW_PROBE, ABOVE_PROBE = "99", "99.4"
# arq keeps a job "in progress" this long after a worker took it (the delivery worker's timeout, the job
# wrapper's grace and arq's own margin); a dead worker's job waits that long (less the time it already ran)
# before the restarted one may run it.
IN_PROGRESS_SECONDS = in_progress_expiry(DELIVERY_JOB_TIMEOUT)


def _peer_gone(request: web.Request) -> bool:
    """Whether the sender has closed its end: a killed process's sockets are closed by its kernel, which an
    asyncio transport does not report as closing while a handler still runs (a half-closed socket). A peek at
    the socket itself tells: end of file or a reset means no answer can reach anyone."""
    transport = request.transport
    if transport is None or transport.is_closing():
        return True
    raw = transport.get_extra_info("socket")
    if raw is None:
        return False
    probe = socket.socket(fileno=os.dup(raw.fileno()))
    try:
        probe.setblocking(False)
        return probe.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False  # open, nothing sent: the sender is waiting for our answer
    except OSError:
        return True
    finally:
        probe.close()


@dataclass
class KillAwareReceiver(Receiver):
    """The delivery tests' receiver, counting an answer as acknowledged only when its sender can still read it.
    ``held`` are the requests made to wait for ``hold``; ``held_answered`` counts those that have answered."""

    held: list[web.Request] = field(default_factory=list)
    held_answered: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        entry = {"headers": dict(request.headers), "body": body, "id": request.headers.get("webhook-id")}
        self.received.append(entry)
        hold = self.hold
        if hold is not None:
            self.held.append(request)
            await hold.wait()
        try:
            if _peer_gone(request):
                return web.Response(status=499)
            if self.status < 300:
                self.acknowledged.append(str(entry["id"]))
            return web.Response(status=self.status)
        finally:
            if hold is not None:
                self.held_answered += 1

    def held_peers_gone(self) -> list[bool]:
        return [_peer_gone(request) for request in self.held]


async def _publish_price(publisher: StreamPublisher, value: str) -> None:
    """A consolidated BTC/USD price on the prices stream, shaped as pricing publishes it."""
    now = datetime.now(UTC)
    await publisher.publish(
        PRICES_STREAM,
        {
            "event_id": uuid.uuid4().hex,
            "base": "BTC",
            "vs": "USD",
            "price": value,
            "volume_24h": None,
            "status": "fresh",
            "sources_used": 3,
            "sources_total": 3,
            "method": "median",
            "last_updated": now.isoformat().replace("+00:00", "Z"),
            "fresh_until": (now + timedelta(seconds=30)).isoformat().replace("+00:00", "Z"),
            "spread_pct": "0.1",
        },
    )


@pytest.mark.reliability
async def test_webhook_worker_kill(platform_factory, reliability_row):
    alerts_count = by_scale(25, 3)
    receiver = KillAwareReceiver(hold=asyncio.Event())
    await receiver.start()
    probe_receiver = Receiver()  # the probe alert's webhook: answered at once, kept apart from the counts
    await probe_receiver.start()
    plat = platform_factory(
        services=("alerting", "gateway"),
        coins="BTC",
        extra_env={"COINLYTICS_WEBHOOK_ALLOW_PRIVATE": "true"},
    )
    try:
        await plat.start()
        conn = await plat.db()
        redis = plat.redis_client()
        try:
            # Pricing (not run here) seeds the tracked coins; alerts may only name a tracked one.
            await conn.execute(
                "INSERT INTO coins (symbol, name, active) VALUES ('BTC', 'Bitcoin', true) ON CONFLICT DO NOTHING"
            )
            publisher = StreamPublisher(redis, namespace=plat.namespace, maxlen=10_000)
            async with httpx.AsyncClient(base_url=plat.url("gateway"), timeout=30) as client:
                await register(client, "kill9@example.com")
                headers = bearer((await tokens(client, "kill9@example.com"))["access_token"])
                secrets: dict[str, str] = {}
                for _ in range(alerts_count):
                    response = await client.post(
                        "/api/v1/alerts",
                        headers=headers,
                        json={
                            "symbol": "BTC", "vs": "USD", "condition": "above", "threshold": THRESHOLD,
                            "cooldown_seconds": 0, "channels": [{"type": "webhook", "url": receiver.url}],
                        },
                    )  # fmt: skip
                    assert response.status_code == 201, response.text
                    secrets[response.json()["id"]] = response.json()["channels"][0]["secret"]
                response = await client.post(
                    "/api/v1/alerts",
                    headers=headers,
                    json={
                        "symbol": "BTC", "vs": "USD", "condition": "above", "threshold": PROBE_THRESHOLD,
                        "one_shot": True, "channels": [{"type": "webhook", "url": probe_receiver.url}],
                    },
                )  # fmt: skip
                assert response.status_code == 201, response.text
                probe_id = uuid.UUID(response.json()["id"])

            # The rules arrive on the changes stream in batches. Prices below THRESHOLD, crossing the probe's
            # threshold upwards, until the probe has fired (its event is stored): then every rule is loaded.
            async def probe_fired() -> bool:
                await _publish_price(publisher, BELOW_PROBE)
                await _publish_price(publisher, ABOVE_PROBE)
                fired = await conn.fetchval("SELECT count(*) FROM alert_events WHERE alert_id = $1", probe_id)
                return bool(fired)

            await eventually(probe_fired, timeout=60, interval=0.5)
            # Its delivery done, so the kill below finds only the alerts' deliveries in flight.
            await eventually(lambda: _truthy(bool(probe_receiver.acknowledged)), timeout=60)
            # The last price evaluated is ABOVE_PROBE, below THRESHOLD: this one crosses it for every alert.
            await _publish_price(publisher, "101")

            async def all_held() -> bool:
                return len({e["id"] for e in receiver.received}) >= alerts_count

            await eventually(all_held, timeout=60)
            held_requests = len(receiver.received)
            killed_pid = plat.kill_service("alerting")
            killed_at = time.monotonic()
            print(f"\nkilled alerting (pid {killed_pid}) with {held_requests} webhook request(s) held open")
            assert receiver.hold is not None
            # The kernel closes the dead process's sockets: its FIN reaches every held connection.
            await eventually(lambda: _truthy(all(receiver.held_peers_gone())), timeout=30, interval=0.05)
            receiver.hold.set()  # the held handlers find their sender gone: nothing is acknowledged
            receiver.hold = None
            await eventually(lambda: _truthy(receiver.held_answered >= len(receiver.held)), timeout=30, interval=0.05)
            assert receiver.acknowledged == [], "a request whose sender was killed cannot have been acknowledged"
            plat.start_service("alerting")
            await plat.wait_ready("alerting", timeout=90)

            async def all_acknowledged() -> bool:
                return len(set(receiver.acknowledged)) >= alerts_count

            # Bounded by arq's in-progress expiry after the kill, plus a restart and a poll.
            await eventually(all_acknowledged, timeout=IN_PROGRESS_SECONDS + 90, interval=0.1)
            recovered = time.monotonic() - killed_at
            # A duplicate, if one were coming (a second job, a sweep re-enqueue), would come within a sweep.
            await asyncio.sleep(by_scale(8.0, 3.0))

            alert_ids = [uuid.UUID(a) for a in secrets]
            events = await conn.fetch(
                "SELECT id, alert_id FROM alert_events WHERE alert_id = ANY($1::uuid[])", alert_ids
            )
            deliveries = await conn.fetch(
                "SELECT d.event_id, d.status, d.attempts FROM alert_deliveries d "
                "JOIN alert_events e ON e.id = d.event_id WHERE e.alert_id = ANY($1::uuid[])",
                alert_ids,
            )
        finally:
            await conn.close()
            await redis.aclose()
    finally:
        await receiver.stop()
        await probe_receiver.stop()

    event_of_alert = {str(row["alert_id"]): str(row["id"]) for row in events}
    acknowledged = Counter(receiver.acknowledged)
    requests_per_id = Counter(str(e["id"]) for e in receiver.received)
    duplicates = sum(n - 1 for n in acknowledged.values() if n > 1)
    statuses = Counter(row["status"] for row in deliveries)
    print(
        f"alerts={alerts_count} events={len(events)} requests={len(receiver.received)} "
        f"acknowledged={sum(acknowledged.values())} distinct_ids={len(requests_per_id)} duplicates={duplicates} "
        f"deliveries={dict(statuses)} attempts={sorted(row['attempts'] for row in deliveries)} "
        f"recovered_in={recovered:.1f}s (arq in-progress expiry {IN_PROGRESS_SECONDS}s)"
    )
    reliability_row.update(
        checked=f"{alerts_count} webhook deliveries held open, alerting kill -9, restart: "
        "each delivered once by event id",
        sent=len(receiver.received),
        stored=statuses.get("delivered", 0),
        lost=alerts_count - len(acknowledged),
        duplicated=duplicates + max(0, len(events) - alerts_count),
        recover_seconds=recovered,
        notes=f"{held_requests} request(s) held at the kill; {len(receiver.received)} received, "
        f"{sum(acknowledged.values())} acknowledged, {len(requests_per_id)} distinct webhook-ids; recovery waits "
        f"for arq's in-progress expiry ({IN_PROGRESS_SECONDS}s after a job starts)",
    )

    assert len(events) == alerts_count, "one event per alert: the restarted evaluator fired nothing again"
    assert set(event_of_alert) == set(secrets)
    assert len(deliveries) == alerts_count and statuses == {"delivered": alerts_count}, dict(statuses)
    # The killed attempt was counted before it was sent, the one after the restart delivered.
    assert all(row["attempts"] == 2 for row in deliveries), [row["attempts"] for row in deliveries]
    assert sorted(acknowledged) == sorted(event_of_alert.values()), "every event acknowledged"
    assert duplicates == 0, f"acknowledged more than once: {acknowledged}"
    assert set(requests_per_id) == set(event_of_alert.values()), "no request carried an unknown webhook-id"
    assert all(n >= 2 for n in requests_per_id.values()), "each event was sent again after the kill"
    secret_of_event = {event_of_alert[a]: s for a, s in secrets.items()}
    for entry in receiver.received:
        body = verify_standard_webhook(secret_of_event[str(entry["id"])], entry["headers"], entry["body"])
        assert body["id"] == entry["id"] and body["type"] == "alert.triggered"
