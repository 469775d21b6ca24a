"""Evaluating alert rules against every consolidated price, and recording what fires.

One replica at a time evaluates: it holds a lease in Redis (renewed every few seconds, taken over by a
standby replica when it lapses), loads the rules from PostgreSQL into the in-memory engine
(services/alerting/engine.py), follows the ``alert-changes`` stream to keep them in sync, and reads the prices
stream in the ``alerting`` consumer group. The lease keeps two replicas from both firing; the event id keeps a
redelivered price from firing twice: it is derived from the alert and the price event, and stored with ON
CONFLICT DO NOTHING.

With ``alerting_shards`` N > 1 the rules are partitioned by coin (``shared.sharding.shard_of``): replica i
evaluates only the rules of its coins, in its own group ``alerting.<i>`` under its own lease
``alerting:evaluator:lease.<i>`` (so a standby of the same shard can take over), and acknowledges the other
coins' prices without evaluating them. Each shard follows every alert change and keeps only its coins' rules,
so an edit that moves a rule to another shard's coin is dropped by the one and picked up by the other.

Each trigger is stored (event, one delivery row per channel, the alert's ``last_fired_at``) in one transaction
before anything is sent; only after the commit are the delivery jobs enqueued and the event published for live
push. The last evaluated price of each pair is kept in Redis so that a restarted (or new) leader compares the
next price with the one evaluated before, and a crossing that arrived while no replica was evaluating still
fires.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter
from redis.asyncio import Redis
from sqlalchemy import Row
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.alerting import repository
from services.alerting.engine import AlertEngine, Rule, Trigger
from services.alerting.service import ALERT_CHANGES_STREAM
from services.pricing.history.repository import read_candles
from shared.db import transaction
from shared.jobs import JobQueue
from shared.models import Alert
from shared.settings import Settings
from shared.sharding import shard_of
from shared.streams import (
    ALERT_EVENTS_STREAM,
    PRICES_STREAM,
    PoisonMessage,
    StreamConsumer,
    StreamMessage,
    StreamMetrics,
    StreamPublisher,
    default_consumer_name,
)
from shared.timeparse import iso_z

log = structlog.get_logger("alerting")

EVALUATOR_GROUP = "alerting"
# Symbols whose shard is remembered (a price's coin is looked up on every price); cleared when full, as only
# a garbled stream would bring that many.
OWNED_CACHE_SIZE = 100_000
# The queue delivery jobs run in (its own worker: many concurrent sends, a short job timeout).
DELIVERY_QUEUE = "alerting-delivery"
DELIVER_JOB = "deliver_alert"
DELIVERY_JOB_EXPIRES = timedelta(days=3)
LEASE_TTL_MS = 10_000
LEASE_RENEW_SECONDS = 3.0
# Event ids: uuid5 of the alert and the price event under this namespace (any fixed uuid would do).
EVENT_NAMESPACE = uuid.UUID("6f1d3c8e-8a0b-4c59-9d0e-5a2b7c4e1f30")

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""


def evaluator_group(shards: int, shard: int) -> str:
    """The consumer group of shard ``shard`` on the prices stream: ``alerting`` unsharded (existing installs
    keep their group and its position), ``alerting.<i>`` otherwise."""
    return EVALUATOR_GROUP if shards == 1 else f"{EVALUATOR_GROUP}.{shard}"


def evaluator_shard(settings: Settings) -> int:
    """This replica's alerting shard. Unsharded, every replica is shard 0 (one leads, the others stand by),
    whatever COINLYTICS_SHARD says: a StatefulSet pod alerting-1 is then a standby, not a misconfiguration.
    Sharded, COINLYTICS_SHARD must name one of the shards (ConfigurationError otherwise)."""
    return 0 if settings.alerting_shards == 1 else settings.shard_index(settings.alerting_shards)


def lease_name(shards: int, shard: int) -> str:
    return "lease" if shards == 1 else f"lease.{shard}"


def delivery_job_id(event_id: uuid.UUID | str, channel_index: int) -> str:
    return f"alert-delivery:{event_id}:{channel_index}"


async def enqueue_delivery(jobs: JobQueue, event_id: uuid.UUID, channel_index: int) -> bool:
    """Queues the delivery job of one event's channel; a no-op while that job exists. It may live 3 days: the
    retry schedule spans about 27 hours, past arq's default of one."""
    return await jobs.enqueue(
        DELIVERY_QUEUE, DELIVER_JOB, str(event_id), channel_index,
        job_id=delivery_job_id(event_id, channel_index), expires=DELIVERY_JOB_EXPIRES,
    )  # fmt: skip


def event_id_for(trigger: Trigger, price_event_id: str) -> uuid.UUID:
    """The event's id, from the alert and the crossing: the moment of the price before it (the reference).
    Whichever price event shows the same crossing (redelivered, or a newer one seen first by a new leader
    after a crash) yields the same id. Without a reference time, the price event names it."""
    crossing = iso_z(trigger.previous_at) if trigger.previous_at is not None else f"event:{price_event_id}"
    return uuid.uuid5(EVENT_NAMESPACE, f"{trigger.rule_id}/{crossing}")


def rule_of(alert: Alert | Row[Any]) -> Rule:
    return Rule(
        id=str(alert.id),
        symbol=alert.symbol,
        vs=alert.vs,
        condition=alert.condition,
        threshold=Decimal(alert.threshold),
        cooldown_seconds=alert.cooldown_seconds,
        one_shot=alert.one_shot,
        window_minutes=alert.window_minutes,
        expires_at=alert.expires_at,
        paused=alert.paused,
        last_fired_at=alert.last_fired_at,
    )


def evaluable(alert: Alert | None, now: datetime) -> bool:
    if alert is None or alert.paused:
        return False
    if alert.expires_at is not None and alert.expires_at <= now:
        return False
    return not (alert.one_shot and alert.last_fired_at is not None)


def event_payload(event_id: uuid.UUID, alert: Alert, trigger: Trigger, created_at: datetime) -> dict[str, Any]:
    """An alert event as stored, published for live push and sent (inside the webhook envelope)."""
    return {
        "id": str(event_id),
        "type": "alert.triggered",
        "alert_id": str(alert.id),
        "user_id": str(alert.user_id),
        "symbol": trigger.symbol,
        "vs": trigger.vs,
        "condition": trigger.condition,
        "threshold": str(trigger.threshold),
        "window_minutes": alert.window_minutes,
        "value": str(trigger.value),
        "previous": str(trigger.previous),
        "price": str(trigger.price),
        "price_at": iso_z(trigger.at),
        "created_at": iso_z(created_at),
    }


def webhook_body(payload: dict[str, Any]) -> bytes:
    """The Standard Webhooks envelope of ../shared/API.md; the same bytes on every attempt."""
    data = {k: v for k, v in payload.items() if k not in ("id", "type", "user_id", "created_at")}
    envelope = {"type": "alert.triggered", "id": payload["id"], "created_at": payload["created_at"], "data": data}
    return json.dumps(envelope, separators=(",", ":"), sort_keys=True).encode()


class OwnedCoins:
    """Whether a coin is one shard's, remembered per symbol: every price entry asks, and the answer for a
    symbol never changes while the process runs."""

    __slots__ = ("_known", "shard", "shards")

    def __init__(self, shards: int, shard: int) -> None:
        self.shards = shards
        self.shard = shard
        self._known: dict[str, bool] = {}

    def __call__(self, symbol: str) -> bool:
        if self.shards == 1:
            return True
        owned = self._known.get(symbol)
        if owned is None:
            if len(self._known) >= OWNED_CACHE_SIZE:
                self._known.clear()
            owned = self._known[symbol] = shard_of(symbol, self.shards) == self.shard
        return owned


class PriceUpdate:
    """One price event as the engine needs it; PoisonMessage when it isn't one."""

    __slots__ = ("at", "event_id", "price", "spread_pct", "status", "symbol", "vs")

    def __init__(self, message: StreamMessage) -> None:
        payload = message.payload()
        try:
            self.symbol = str(payload["base"])
            self.vs = str(payload["vs"])
            self.price = Decimal(str(payload["price"]))
            self.status = str(payload.get("status"))
            spread = payload.get("spread_pct")
            self.spread_pct = None if spread in (None, "") else Decimal(str(spread))
            at = datetime.fromisoformat(str(payload["last_updated"]).replace("Z", "+00:00"))
        except (KeyError, InvalidOperation, ValueError, TypeError) as exc:
            raise PoisonMessage(f"not a price event: {type(exc).__name__}: {exc}") from None
        self.at = at if at.tzinfo else at.replace(tzinfo=UTC)
        # Pricing's outbox gives every event an id; an older producer without one still gets a stable id.
        self.event_id = str(payload.get("event_id") or message.id)


class EvaluationService:
    def __init__(
        self,
        settings: Settings,
        sessions: async_sessionmaker[AsyncSession],
        redis: Redis,
        publisher: StreamPublisher,
        jobs: JobQueue,
        *,
        consumer_name: str | None = None,
        registry: CollectorRegistry | None = None,
        stream_metrics: StreamMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.redis = redis
        self.publisher = publisher
        self.jobs = jobs
        self.evaluations = Counter(
            "alert_evaluations_total", "Consolidated prices evaluated against the alert rules", registry=registry
        )
        self.fired_total = Counter(
            "alert_fired_total", "Alert events fired (stored once per event id)", registry=registry
        )
        self.shards = settings.alerting_shards
        self.shard = evaluator_shard(settings)
        self.group = evaluator_group(self.shards, self.shard)
        self._owned = OwnedCoins(self.shards, self.shard)
        self.name = consumer_name or default_consumer_name(self.group)
        self.engine = AlertEngine()
        self.lease_key = settings.key("alerting", "evaluator", lease_name(self.shards, self.shard))
        # One hash for every shard (each reads and writes only its own pairs' fields): after the shard count
        # changes, a pair's new owner still finds the last price evaluated for it, so prices the old owner
        # evaluated are not evaluated again and a crossing in between still fires.
        self.references_key = settings.key("alerting", "evaluator", "references")
        self.changes_stream = settings.key("stream", ALERT_CHANGES_STREAM)
        self.leading = False
        self.loaded_at: float | None = None
        # Loading every rule and applying a change must not interleave: a change applied between the load's
        # read and its swap into the engine would be lost.
        self._rules_lock = asyncio.Lock()
        self._dirty = False
        self.fired = 0
        self.consumer = StreamConsumer.configured(
            redis,
            settings,
            stream=PRICES_STREAM,
            group=self.group,
            consumer=self.name,
            handle_one=self.handle_one,
            handle_batch=self.handle_batch,
            metrics=stream_metrics,
        )

    # --- shard --------------------------------------------------------------------------------

    def owns(self, symbol: str) -> bool:
        """Whether this replica's shard evaluates the rules of ``symbol``."""
        return self._owned(symbol)

    def _wanted(self, message: StreamMessage) -> bool:
        """False for a price of another shard's coin: acknowledged without being parsed further. An entry
        without a readable coin is kept, so that parsing it dead-letters it as before."""
        if self.shards == 1:
            return True
        base = message.payload().get("base")
        return not isinstance(base, str) or self.owns(base)

    # --- leadership ----------------------------------------------------------------------------

    async def _acquire(self) -> bool:
        return bool(await self.redis.set(self.lease_key, self.name, nx=True, px=LEASE_TTL_MS))

    async def _renew(self) -> bool:
        return bool(await self.redis.eval(_RENEW, 1, self.lease_key, self.name, LEASE_TTL_MS))  # type: ignore[misc]

    async def _release(self) -> None:
        with contextlib.suppress(Exception):
            await self.redis.eval(_RELEASE, 1, self.lease_key, self.name)  # type: ignore[misc]

    async def run(self, stop: asyncio.Event) -> None:
        """The supervised loop: wait for the lease, evaluate while holding it, stand by when it is lost."""
        standby_logged = False
        while not stop.is_set():
            if not await self._acquire():
                if not standby_logged:
                    holder = await self.redis.get(self.lease_key)
                    log.info(
                        "alert_evaluator_standby",
                        consumer=self.name,
                        shard=self.shard,
                        leader=holder and holder.decode(),
                    )
                    standby_logged = True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=LEASE_RENEW_SECONDS)
                continue
            standby_logged = False
            try:
                await self._lead(stop)
            finally:
                self.leading = False
                await self._release()

    async def _lead(self, stop: asyncio.Event) -> None:
        lost = asyncio.Event()
        # Changes from this moment on are replayed over the loaded rules (re-reading an alert is idempotent).
        newest = await self.redis.xrevrange(self.changes_stream, count=1)
        cursor = newest[0][0].decode() if newest else "0-0"

        async def keep_lease() -> None:
            while not lost.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=LEASE_RENEW_SECONDS)
                if stop.is_set():
                    lost.set()
                    return
                try:
                    held = await self._renew()
                except Exception as exc:
                    log.warning("alert_evaluator_lease_renewal_failed", error=f"{type(exc).__name__}: {exc}")
                    held = False
                if not held:
                    log.warning("alert_evaluator_lease_lost", consumer=self.name)
                    lost.set()

        async def follow_changes() -> None:
            nonlocal cursor
            while not lost.is_set():
                try:
                    reply = await self.redis.xread({self.changes_stream: cursor}, count=500, block=1000)
                    for _stream, entries in reply or []:
                        await self.apply_changes([StreamMessage(id=i.decode(), fields=_fields(f)) for i, f in entries])
                        cursor = entries[-1][0].decode()
                except Exception as exc:
                    # Redis or PostgreSQL away: try again; the entries are still in the stream.
                    log.warning("alert_changes_not_followed", error=f"{type(exc).__name__}: {exc}")
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lost.wait(), timeout=1.0)

        # The lease is kept from the start: loading a million rules takes seconds.
        tasks = [asyncio.create_task(keep_lease(), name="alert-lease")]
        try:
            await self.load()
            if lost.is_set():
                return  # the lease lapsed while loading: another replica leads now
            self.leading = True
            log.info("alert_evaluator_leading", consumer=self.name, shard=self.shard, **self.engine.counts())
            tasks += [
                asyncio.create_task(follow_changes(), name="alert-changes"),
                asyncio.create_task(self.consumer.run(lost), name="alert-prices"),
            ]
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                if task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            lost.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def stall_reason(self) -> str | None:
        if not self.leading:
            return None  # a standby replica is healthy by waiting
        return await self.consumer.stall_reason()

    # --- rules ---------------------------------------------------------------------------------

    async def load(self) -> None:
        """Every evaluable rule of this shard's coins from PostgreSQL, and the last evaluated price of each of
        their pairs from Redis."""
        async with self._rules_lock:
            await self._load()

    async def _load(self) -> None:
        started = time.monotonic()
        now = datetime.now(UTC)
        async with self.sessions() as session:
            symbols = None
            if self.shards > 1:
                # The coins first (a few thousand at most), then only their rules: a shard never reads the
                # other shards' million rows.
                symbols = [s for s in await repository.alert_symbols(session) if self.owns(s)]
            alerts = await repository.armed_alerts(session, now, symbols=symbols)
            rules = [rule_of(a) for a in alerts]
        self.engine.load(rules)
        await self._seed_windows(now)
        references = await self.redis.hgetall(self.references_key)
        # Other shards' pairs have no book here and are skipped.
        for field, blob in references.items():
            symbol, _, vs = field.decode().partition(":")
            book = self.engine.books.get((symbol, vs))
            if book is None:
                continue
            try:
                reference = json.loads(blob)
                book.last_price = Decimal(reference["price"]) if reference.get("price") else None
                book.last_spread = Decimal(reference["spread"]) if reference.get("spread") else None
                book.last_at = (
                    datetime.fromisoformat(reference["at"].replace("Z", "+00:00")) if reference.get("at") else None
                )
            except (ValueError, KeyError, TypeError, InvalidOperation):
                log.warning("alert_reference_unreadable", pair=field.decode())
        self._dirty = False
        self.loaded_at = time.monotonic()
        log.info("alert_rules_loaded", rules=len(rules), shard=self.shard, seconds=round(time.monotonic() - started, 3))

    async def _window_samples(
        self, needed: dict[tuple[str, str], int], now: datetime
    ) -> dict[tuple[str, str], list[tuple[datetime, Decimal]]]:
        """Prices before now for percent-change windows (pair -> longest window in minutes), from pricing's
        1-minute candles (read through pricing's repository: it owns them). A candle's close is the price at
        the end of its minute."""
        found: dict[tuple[str, str], list[tuple[datetime, Decimal]]] = {}
        if not needed:
            return found
        async with self.sessions() as session:
            for (symbol, vs), minutes in needed.items():
                # Two minutes more than the window: the candle that ends at or before the window's start.
                since = now - timedelta(minutes=minutes + 2)
                candles = await read_candles(session, symbol, vs, "1m", since, now)
                samples = [(c["t"] + timedelta(minutes=1), Decimal(c["close"])) for c in candles if c.get("close")]
                found[(symbol, vs)] = [s for s in samples if s[0] <= now]
        log.info("alert_window_history", pairs={f"{p[0]}/{p[1]}": len(v) for p, v in found.items()})
        return found

    async def _seed_windows(self, now: datetime) -> None:
        for (symbol, vs), samples in (await self._window_samples(self.engine.windows_needed(), now)).items():
            self.engine.seed_history(symbol, vs, samples)

    async def apply_changes(self, messages: Sequence[StreamMessage]) -> None:
        async with self._rules_lock:
            await self._apply_changes(messages)

    async def _apply_changes(self, messages: Sequence[StreamMessage]) -> None:
        ids: list[uuid.UUID] = []
        for message in messages:
            try:
                payload = message.payload()
                alert_id = uuid.UUID(str(payload["id"]))
            except (KeyError, ValueError, TypeError, PoisonMessage):
                log.warning("alert_change_unreadable", entry_id=message.id)
                continue
            # The change names the alert's coin after it: another shard's coin concerns this shard only if
            # the rule is here (it moved away, and is removed below). Anything else is read from PostgreSQL.
            symbol = payload.get("symbol")
            if isinstance(symbol, str) and not self.owns(symbol) and str(alert_id) not in self.engine.rules:
                continue
            ids.append(alert_id)
        if not ids:
            return
        now = datetime.now(UTC)
        async with self.sessions() as session:
            found = {a.id: a for a in await repository.alerts_by_ids(session, ids)}
        # A rule of another shard's coin is removed here like a deleted one; its shard adds it.
        rules = {alert_id: rule_of(a) for alert_id, a in found.items() if evaluable(a, now) and self.owns(a.symbol)}
        # Windows that get longer need earlier prices; fetched before the rules change, so no price is
        # evaluated between a new rule's arrival and its window's history.
        current = self.engine.windows_needed()
        wanted: dict[tuple[str, str], int] = {}
        for rule in rules.values():
            pair = (rule.symbol, rule.vs)
            if rule.window_minutes and rule.window_minutes > max(current.get(pair, 0), wanted.get(pair, 0)):
                wanted[pair] = rule.window_minutes
        samples = await self._window_samples(wanted, now)
        for alert_id in dict.fromkeys(ids):
            changed = rules.get(alert_id)
            if changed is not None:
                self.engine.upsert(changed)
            else:
                self.engine.remove(str(alert_id))
        for (symbol, vs), history in samples.items():
            self.engine.seed_history(symbol, vs, history)

    # --- prices --------------------------------------------------------------------------------

    async def handle_one(self, message: StreamMessage) -> None:
        await self.evaluate([PriceUpdate(message)] if self._wanted(message) else [])

    async def handle_batch(self, messages: list[StreamMessage]) -> None:
        # Parsed first: a malformed entry fails the batch before the engine has seen any of it, and the
        # consumer retries the entries one by one (dead-lettering that one).
        await self.evaluate([PriceUpdate(m) for m in messages if self._wanted(m)])

    async def evaluate(self, updates: Iterable[PriceUpdate]) -> None:
        if self._dirty:
            await self.load()
        fired: list[tuple[Trigger, str]] = []
        touched: dict[tuple[str, str], None] = {}
        evaluated = 0
        for update in updates:
            if not self.owns(update.symbol):
                continue  # counted by the shard that owns it
            evaluated += 1
            triggers = self.engine.on_price(
                update.symbol, update.vs, update.price, update.status, update.at, spread_pct=update.spread_pct
            )
            fired += [(t, update.event_id) for t in triggers]
            if (update.symbol, update.vs) in self.engine.books:
                touched[(update.symbol, update.vs)] = None
        self.evaluations.inc(evaluated)
        try:
            if fired:
                await self.record(fired)
            await self._save_references(touched)
        except BaseException:
            # The engine moved on (rules disarmed, references advanced) for a batch that will be redelivered:
            # start it over from what was stored, so the redelivery fires the same triggers (same event ids).
            self._dirty = True
            raise

    async def _save_references(self, pairs: Iterable[tuple[str, str]]) -> None:
        mapping: dict[str, str] = {}
        for pair in pairs:
            book = self.engine.books[pair]
            if book.last_price is None:
                continue
            mapping[f"{pair[0]}:{pair[1]}"] = json.dumps(
                {
                    "price": str(book.last_price),
                    "spread": None if book.last_spread is None else str(book.last_spread),
                    "at": iso_z(book.last_at),
                }
            )
        if mapping:
            await self.redis.hset(self.references_key, mapping=mapping)  # type: ignore[misc]

    async def record(self, fired: list[tuple[Trigger, str]]) -> None:
        """Stores the triggers' events and deliveries (once per event id), then enqueues and publishes."""
        now = datetime.now(UTC)
        alert_ids = list(dict.fromkeys(uuid.UUID(t.rule_id) for t, _ in fired))
        async with transaction(self.sessions) as session:
            alerts = {a.id: a for a in await repository.alerts_by_ids(session, alert_ids)}
            events: list[dict[str, Any]] = []
            deliveries: list[dict[str, Any]] = []
            payloads: dict[uuid.UUID, dict[str, Any]] = {}
            fired_at: dict[uuid.UUID, datetime] = {}
            for trigger, price_event_id in fired:
                alert = alerts.get(uuid.UUID(trigger.rule_id))
                if alert is None or alert.paused:
                    continue  # deleted or paused since the engine last heard of it
                event_id = event_id_for(trigger, price_event_id)
                payload = event_payload(event_id, alert, trigger, now)
                payloads[event_id] = payload
                events.append(
                    {
                        "id": event_id,
                        "alert_id": alert.id,
                        "user_id": alert.user_id,
                        "created_at": now,
                        "price": trigger.price,
                        "payload": payload,
                    }
                )
                for index, channel in enumerate(alert.channels):
                    disabled = bool(channel.get("disabled"))
                    deliveries.append(
                        {
                            "event_id": event_id,
                            "channel_index": index,
                            "type": channel["type"],
                            "status": "skipped" if disabled else "pending",
                            "attempts": 0,
                            "last_error": f"channel disabled: {channel.get('disabled_reason')}" if disabled else None,
                            "updated_at": now,
                        }
                    )
                fired_at[alert.id] = max(fired_at.get(alert.id, trigger.at), trigger.at)
            new = await repository.add_events(session, events, deliveries)
            await repository.mark_fired(session, fired_at)
            # Deliveries of events stored before (a redelivered batch) that never finished: enqueue them again
            # (the job id makes that a no-op while the first job still exists).
            unfinished = await repository.deliveries_of(session, [e for e in payloads if e not in new])
        self.fired += len(new)
        self.fired_total.inc(len(new))
        for event_id in new:
            log.info(
                "alert_fired",
                event_id=str(event_id),
                alert_id=payloads[event_id]["alert_id"],
                symbol=payloads[event_id]["symbol"],
                vs=payloads[event_id]["vs"],
                condition=payloads[event_id]["condition"],
                value=payloads[event_id]["value"],
            )
        pending = [
            (d["event_id"], d["channel_index"]) for d in deliveries if d["event_id"] in new and d["status"] == "pending"
        ]
        pending += [(d.event_id, d.channel_index) for d in unfinished if d.status in ("pending", "retrying")]
        for event_id, index in pending:
            await enqueue_delivery(self.jobs, event_id, index)
        if new:
            try:
                await self.publisher.publish_many(ALERT_EVENTS_STREAM, [payloads[e] for e in new])
            except Exception as exc:
                # Live push is best effort: the event and its deliveries are stored and queued.
                log.warning("alert_event_not_pushed", count=len(new), error=f"{type(exc).__name__}: {exc}")


def _fields(raw: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in raw.items()}
