"""Conversion: the cached rate table, live and historical conversions, rate lists and snapshots."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

import structlog
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.conversion import repository
from services.conversion.ecb import last_publication_day, published_at
from services.conversion.rates import (
    CALC,
    STABLECOINS,
    Edge,
    NoRoute,
    RateTable,
    Route,
    dumps,
    is_derived,
    measured_stablecoin_rates,
    parse_iso,
    plain,
    rounding_for,
    table_from_fields,
    utcnow,
)
from services.pricing import repository as pricing_repository
from services.pricing.coins.repository import active_coins
from services.pricing.history import repository as history_repository
from shared.db import transaction
from shared.errors import NoFreshData, NotFound, UnknownCurrency, ValidationFailed
from shared.messages import price_event
from shared.settings import Settings
from shared.timeparse import iso_z
from shared.validation import SYMBOL_RE

log = structlog.get_logger("conversion")

MAX_AMOUNT = Decimal("1e15")
MIN_AMOUNT_EXPONENT = -30
MAX_AMOUNT_CHARS = 64
HISTORY_MAX_GAP = timedelta(days=7)
SNAPSHOT_WINDOW = timedelta(minutes=15)
SNAPSHOT_MIN_INTERVAL_SECONDS = 60
STABLE_REFRESH_SECONDS = 2.0
ROUTE_MEMO_SECONDS = 5.0
# A rate change reaches requests within this delay; under load it saves a Redis round trip per request.
VERSION_CHECK_SECONDS = 0.05
CANDLE_INTERVALS = {"1m": timedelta(minutes=1), "1h": timedelta(hours=1), "1d": timedelta(days=1)}
SNAPSHOT_BASE = "USD"


class NoDataAtTime(NotFound):
    code = "no_data_at_time"


def parse_currency(raw: str, name: str) -> str:
    value = raw.strip().upper()
    if not SYMBOL_RE.match(value):
        raise ValidationFailed(f"{name}: not a currency or coin symbol: {raw[:20]!r}", details={"param": name})
    return value


def parse_amount(raw: str) -> Decimal:
    text = raw.strip()
    if len(text) > MAX_AMOUNT_CHARS:
        raise ValidationFailed(f"amount: longer than {MAX_AMOUNT_CHARS} characters")
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise ValidationFailed(f"amount: not a number: {text[:20]!r}") from None
    if not value.is_finite():
        raise ValidationFailed("amount: must be a finite number")
    if value <= 0:
        raise ValidationFailed("amount: must be greater than 0")
    if value > MAX_AMOUNT:
        raise ValidationFailed(f"amount: larger than the maximum of {plain(MAX_AMOUNT)}")
    if value.adjusted() < MIN_AMOUNT_EXPONENT:
        raise ValidationFailed(f"amount: smaller than 1e{MIN_AMOUNT_EXPONENT}")
    return value


class RateCache:
    """The latest rate table in Redis: a hash of JSON fields plus a version counter bumped on each change,
    so every conversion process reads one small key per request and reloads the table only when it changed."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.table_key = settings.key("conversion", "rates")
        self.version_key = settings.key("conversion", "rates", "version")
        self.snapshot_lock_key = settings.key("conversion", "snapshot", "lock")

    async def version(self) -> str | None:
        raw = await self.redis.get(self.version_key)
        return None if raw is None else raw.decode() if isinstance(raw, bytes) else str(raw)

    async def read(self) -> tuple[str | None, dict[str, Any]]:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.get(self.version_key)
            pipe.hgetall(self.table_key)
            raw_version, raw_fields = await pipe.execute()
        fields: dict[str, Any] = {}
        for k, v in (raw_fields or {}).items():
            try:
                fields[k.decode() if isinstance(k, bytes) else k] = json.loads(v)
            except ValueError:
                continue
        version = None if raw_version is None else raw_version.decode()
        return version, fields

    async def read_fields(self, names: list[str]) -> dict[str, Any]:
        if not names:
            return {}
        values = await self.redis.hmget(self.table_key, names)
        out: dict[str, Any] = {}
        for name, raw in zip(names, values, strict=True):
            if raw is not None:
                try:
                    out[name] = json.loads(raw)
                except ValueError:
                    continue
        return out

    async def write(self, fields: dict[str, Any], *, replace: bool = False) -> None:
        if not fields and not replace:
            return
        async with self.redis.pipeline(transaction=True) as pipe:
            if replace:
                pipe.delete(self.table_key)
            if fields:
                pipe.hset(self.table_key, mapping={k: dumps(v) for k, v in fields.items()})
            pipe.incr(self.version_key)
            await pipe.execute()

    async def snapshot_due(self) -> bool:
        """At most one change-triggered snapshot a minute across every conversion process."""
        acquired = await self.redis.set(self.snapshot_lock_key, "1", nx=True, ex=SNAPSHOT_MIN_INTERVAL_SECONDS)
        return bool(acquired)


@dataclass
class HistoricalBasis:
    table: RateTable
    notes: list[str]
    snapshot_id: int | None = None


class ConversionService:
    def __init__(self, settings: Settings, *, sessions: async_sessionmaker[AsyncSession], redis: Redis) -> None:
        self.settings = settings
        self.sessions = sessions
        self.cache = RateCache(redis, settings)
        self._table: RateTable | None = None
        self._table_built = 0.0
        self._version_checked = 0.0
        self._rebuild_lock = asyncio.Lock()
        self._stable_at = 0.0

    # --- the cached table ---------------------------------------------------------------------------

    async def table(self) -> RateTable:
        """The current table: its version is checked in Redis at most every VERSION_CHECK_SECONDS (a burst of
        requests shares one check), and the table is rebuilt locally only when the version moved."""
        loop = asyncio.get_running_loop()
        if self._table is not None and loop.time() - self._version_checked < VERSION_CHECK_SECONDS:
            return self._table
        self._version_checked = loop.time()
        version = await self.cache.version()
        if version is None:
            await self.rebuild()
            version = await self.cache.version()
        current = self._table
        # Freshness depends on the clock too, so a table is re-derived every few seconds even unchanged.
        if current is None or current.version != version or loop.time() - self._table_built > ROUTE_MEMO_SECONDS:
            stored_version, fields = await self.cache.read()
            current = table_from_fields(fields, utcnow(), version=stored_version or "")
            self._table, self._table_built = current, loop.time()
        return current

    async def rebuild(self) -> None:
        """The whole table from PostgreSQL (at startup, after Redis lost it, and periodically)."""
        async with self._rebuild_lock:
            async with transaction(self.sessions) as session:
                prices = await pricing_repository.all_prices(session)
                quotes = await pricing_repository.stablecoin_quotes(session, STABLECOINS)
                day, fetched_at, fiat = await repository.latest_fiat(session)
                fiat_source = None if day is None else await repository.fiat_day_source(session, day)
                coins = set(await active_coins(session))
            fields: dict[str, Any] = {"coins": sorted(coins)}
            for p in prices:
                payload = price_event(p)
                if not is_derived(payload):
                    fields[f"price:{p.base}/{p.vs}"] = payload
            fields.update(self._stable_fields(prices, quotes))
            if day is not None:
                fields["fiat"] = fiat_doc(day, fetched_at, fiat, source=fiat_source)
            await self.cache.write(fields, replace=True)
            log.info("rate_table_rebuilt", prices=len(prices), fiat=len(fiat), fiat_day=str(day))

    def _stable_fields(self, prices: list[Any], quotes: list[Any]) -> dict[str, Any]:
        usd = {p.base: p for p in prices if p.vs == "USD"}
        priced = {p.base for p in prices if p.base in STABLECOINS and p.vs == "USD"}
        measured = measured_stablecoin_rates(quotes, usd, priced)
        return {f"stable:{coin}": doc for coin, doc in measured.items()}

    async def apply_prices(self, payloads: list[dict[str, Any]]) -> int:
        """Consolidation events from pricing into the cached table. Idempotent; an older event for a pair
        never replaces a newer one (redelivery, or two consumers racing)."""
        latest: dict[str, dict[str, Any]] = {}
        for p in payloads:
            base, vs = str(p.get("base", "")), str(p.get("vs", ""))
            if not (SYMBOL_RE.match(base) and SYMBOL_RE.match(vs)) or "price" not in p or "last_updated" not in p:
                continue
            name = f"price:{base}/{vs}"
            if name not in latest or str(p["last_updated"]) >= str(latest[name]["last_updated"]):
                latest[name] = p
        stored = await self.cache.read_fields(list(latest))
        changed = {
            name: doc for name, doc in latest.items() if not is_derived(doc) and _newer_or_equal(doc, stored.get(name))
        }
        loop = asyncio.get_running_loop()
        touches_stable = any(n.split(":")[1].split("/")[0] in STABLECOINS or n.endswith("/USD") for n in changed)
        if touches_stable and loop.time() - self._stable_at >= STABLE_REFRESH_SECONDS:
            self._stable_at = loop.time()
            async with transaction(self.sessions) as session:
                prices = await pricing_repository.all_prices(session)
                quotes = await pricing_repository.stablecoin_quotes(session, STABLECOINS)
            changed.update(self._stable_fields(prices, quotes))
        if changed:
            await self.cache.write(changed)
        return len(changed)

    async def set_fiat(
        self, day: date, fetched_at: datetime, rates: dict[str, Decimal], *, source: str | None = None
    ) -> None:
        await self.cache.write({"fiat": fiat_doc(day, fetched_at, rates, source=source)})

    # --- snapshots ------------------------------------------------------------------------------------

    async def take_snapshot(self, *, reason: str) -> int | None:
        """Stores the live table (its raw fields, so it rebuilds exactly) and every rate against USD."""
        version, fields = await self.cache.read()
        if not fields:
            return None
        now = utcnow()
        table = table_from_fields(fields, now, version=version or "")
        against: dict[str, str] = {}
        if table.knows(SNAPSHOT_BASE):
            for currency in sorted(table.kinds):
                if currency == SNAPSHOT_BASE:
                    continue
                try:
                    against[currency] = str(table.route(SNAPSHOT_BASE, currency).rate)
                except NoRoute:
                    continue
        async with transaction(self.sessions) as session:
            snapshot_id = await repository.insert_snapshot(
                session, now, SNAPSHOT_BASE, {"rates": against, "fields": fields, "version": version, "reason": reason}
            )
        log.info("rate_snapshot_taken", id=snapshot_id, reason=reason, currencies=len(against))
        return snapshot_id

    async def maybe_snapshot_on_change(self) -> None:
        if await self.cache.snapshot_due():
            await self.take_snapshot(reason="change")

    # --- conversions ----------------------------------------------------------------------------------

    async def convert(
        self, src: str, dst: str, amount: Decimal, *, at: datetime | None = None, precision: int | None = None
    ) -> dict[str, Any]:
        if at is not None:
            return await self._convert_at(src, dst, amount, at, precision)
        table = await self.table()
        await self._require_known(table, [src, dst], historical=False)
        if src == dst:
            return self._identity(src, amount, table, at=None)
        try:
            route = table.route(src, dst)
        except NoRoute as exc:
            raise self._no_fresh(src, dst, exc) from None
        return self._render(src, dst, amount, route, table, precision, at=None, notes=[], basis="live")

    async def _convert_at(
        self, src: str, dst: str, amount: Decimal, at: datetime, precision: int | None
    ) -> dict[str, Any]:
        now = utcnow()
        if at > now + timedelta(minutes=5):
            raise ValidationFailed(f"at: {iso_z(at)} is in the future; past moments only")
        live = await self.table()
        await self._require_known(live, [src, dst], historical=True)
        if src == dst:
            return self._identity(src, amount, live, at=at)
        async with transaction(self.sessions) as session:
            snapshot = await repository.snapshot_at(session, at, SNAPSHOT_WINDOW)
        if snapshot is not None and isinstance(snapshot.rates.get("fields"), dict):
            table = table_from_fields(snapshot.rates["fields"], snapshot.taken_at)
            try:
                route = table.route(src, dst)
            except NoRoute:
                pass
            else:
                note = f"rates as stored in snapshot {snapshot.id} taken at {iso_z(snapshot.taken_at)}"
                body = self._render(src, dst, amount, route, table, precision, at=at, notes=[note], basis="snapshot")
                body["snapshot_id"] = snapshot.id
                return body
        basis = await self._historical_table(live, src, dst, at)
        try:
            route = basis.table.route(src, dst)
        except NoRoute:
            raise await self._no_history(live, src, dst, at) from None
        notes = basis.notes + _weekend_notes(route, at)
        return self._render(src, dst, amount, route, basis.table, precision, at=at, notes=notes, basis="history")

    async def _historical_table(self, live: RateTable, src: str, dst: str, at: datetime) -> HistoricalBasis:
        table = RateTable()
        cutoff = last_publication_day(at)
        crypto = [c for c in (src, dst) if live.kind(c) != "fiat" and c != "EUR"]
        async with transaction(self.sessions) as session:
            fiat = await repository.fiat_on_or_before(session, cutoff, cutoff - HISTORY_MAX_GAP)
            pairs = await pricing_repository.candle_currencies(session, crypto) if crypto else set()
            for base in crypto:
                for vs in self.settings.vs_currencies:
                    pairs.add((base, vs))
            keys = [(b, v, iv) for b, v in sorted(pairs) for iv in CANDLE_INTERVALS]
            rows = await history_repository.candles_at(session, keys, at, at - HISTORY_MAX_GAP - timedelta(days=1))
        if fiat:
            table.add_node("EUR", "fiat")
        for currency, (day, rate, source) in fiat.items():
            table.add_node(currency, "fiat")
            table.add_edge(
                Edge("EUR", currency, rate, published_at(day), source, True, 0.05, (("ecb_day", day.isoformat()),))
            )
        chosen: dict[tuple[str, str], tuple[tuple[int, float], dict[str, Any], datetime, bool]] = {}
        for row in rows:
            interval = CANDLE_INTERVALS[row["interval"]]
            end = row["t"] + interval
            containing = row["t"] <= at < end
            if not containing and at - end > HISTORY_MAX_GAP:
                continue
            # The finest candle that contains the moment, else the latest close before it.
            rank = (0, interval.total_seconds()) if containing else (1, -end.timestamp())
            key = (row["base"], row["vs"])
            current = chosen.get(key)
            if current is None or rank < current[0]:
                chosen[key] = (rank, row, end, containing)
        for (base, vs), (_, row, end, containing) in sorted(chosen.items()):
            close = Decimal(row["close"])
            if not close.is_finite() or close <= 0:
                continue
            detail = (
                ("candle_interval", row["interval"]),
                ("candle_start", iso_z(row["t"])),
                ("candle_basis", "containing_candle_close" if containing else "nearest_earlier_close"),
            )
            table.add_node(base, "stablecoin" if base in STABLECOINS else live.kind(base))
            table.add_node(vs, live.kind(vs) if live.knows(vs) else "fiat")
            table.add_edge(Edge(base, vs, close, end, "candle", True, 0.1, detail))
        return HistoricalBasis(table=table, notes=[])

    async def _require_known(self, table: RateTable, currencies: list[str], *, historical: bool) -> None:
        unknown = [c for c in dict.fromkeys(currencies) if not table.knows(c)]
        if not unknown:
            return
        async with transaction(self.sessions) as session:
            coins = set(await active_coins(session))
            fiat = await repository.fiat_currencies(session)
            candles = await history_repository.with_candles(session, unknown) if historical else set()
        still = [c for c in unknown if c not in coins and c not in fiat and c not in candles and c != "EUR"]
        if still:
            raise UnknownCurrency(f"unknown currency or coin: {', '.join(still)}", details={"unknown": still})
        if not historical:
            dropped = [c for c in unknown if c in fiat and c not in coins]
            if dropped:
                raise UnknownCurrency(
                    f"no current ECB rate for {', '.join(dropped)} (no longer published); use at= for a past moment",
                    details={"unknown": dropped},
                )

    def _no_fresh(self, src: str, dst: str, exc: NoRoute) -> NoFreshData:
        reason = "every rate connecting them is stale" if exc.stale_route else "no rate connects them yet"
        return NoFreshData(
            f"no fresh rate from {src} to {dst}: {reason}; sources may be starting or down",
            retry_after=10,
            details={"from": src, "to": dst, "stale_route": exc.stale_route},
        )

    async def _no_history(self, live: RateTable, src: str, dst: str, at: datetime) -> NoDataAtTime:
        earliest: dict[str, datetime] = {}
        async with transaction(self.sessions) as session:
            for currency in (src, dst):
                if currency == "EUR":
                    first_day = await repository.fiat_first_day(session)
                    if first_day is not None:
                        earliest[currency] = published_at(first_day)
                elif live.kind(currency) == "fiat":
                    first_day = await repository.fiat_first_day(session, currency)
                    if first_day is not None:
                        earliest[currency] = published_at(first_day)
                else:
                    first = await history_repository.first_candle(session, currency)
                    if first is not None:
                        earliest[currency] = first
        before = {c: t for c, t in earliest.items() if at < t}
        missing = [c for c in (src, dst) if c not in earliest]
        if before or missing:
            parts = [f"{c}: the earliest stored data is {iso_z(t)}" for c, t in before.items()]
            parts += [f"{c}: no stored history at all" for c in missing]
            return NoDataAtTime(
                f"no rate from {src} to {dst} at {iso_z(at)}, which is before the earliest data ({'; '.join(parts)})",
                details={"at": iso_z(at), "earliest": {c: iso_z(t) for c, t in earliest.items()}, "missing": missing},
            )
        return NoDataAtTime(
            f"no stored rate connects {src} to {dst} within {HISTORY_MAX_GAP.days} days before {iso_z(at)}",
            details={"at": iso_z(at), "earliest": {c: iso_z(t) for c, t in earliest.items()}},
        )

    def _identity(self, currency: str, amount: Decimal, table: RateTable, *, at: datetime | None) -> dict[str, Any]:
        return {
            "from": currency,
            "to": currency,
            "amount": amount,
            "result": amount,
            "rate": Decimal(1),
            "path": [currency],
            "legs": [],
            "as_of": iso_z(at or utcnow()),
            "at": None if at is None else iso_z(at),
            "basis": "identity",
            "rounding": None,
            "notes": ["from and to are the same currency: the amount is returned unchanged"],
        }

    def _render(
        self,
        src: str,
        dst: str,
        amount: Decimal,
        route: Route,
        table: RateTable,
        precision: int | None,
        *,
        at: datetime | None,
        notes: list[str],
        basis: str,
    ) -> dict[str, Any]:
        exact = CALC.multiply(amount, route.rate)
        rounding = rounding_for(dst, table.kind(dst), precision)
        result, unit = rounding.apply(exact)
        return {
            "from": src,
            "to": dst,
            "amount": amount,
            "result": plain(result),
            "rate": route.rate_shown(),
            "path": route.path,
            "legs": route.leg_dicts(),
            "as_of": iso_z(route.as_of),
            "at": None if at is None else iso_z(at),
            "basis": basis,
            "rounding": rounding.describe(unit),
            "notes": notes,
        }

    async def rates(self, base: str) -> dict[str, Any]:
        table = await self.table()
        await self._require_known(table, [base], historical=False)
        rates: dict[str, Any] = {}
        unavailable: list[str] = []
        for currency in sorted(table.kinds):
            if currency == base:
                continue
            try:
                route = table.route(base, currency)
            except NoRoute:
                unavailable.append(currency)
                continue
            rates[currency] = {
                "rate": route.rate_shown(),
                "kind": table.kind(currency),
                "path": route.path,
                "as_of": iso_z(route.as_of),
            }
        if not rates:
            raise NoFreshData(f"no fresh rate against {base} yet; sources may be starting or down", retry_after=10)
        return {
            "base": base,
            "as_of": iso_z(table.updated_at or utcnow()),
            "fiat_day": None if table.fiat_day is None else table.fiat_day.isoformat(),
            "fiat_source": table.fiat_source,
            "rates": rates,
            "unavailable": unavailable,
        }


def _newer_or_equal(doc: dict[str, Any], stored: Any) -> bool:
    if not isinstance(stored, dict) or "last_updated" not in stored:
        return True
    try:
        return parse_iso(str(doc["last_updated"])) >= parse_iso(str(stored["last_updated"]))
    except ValueError:
        return True


def _weekend_notes(route: Route, at: datetime) -> list[str]:
    notes = []
    for edge, _ in route.legs:
        day_text = dict(edge.detail).get("ecb_day")
        if not day_text:
            continue
        day = date.fromisoformat(day_text)
        if day == at.date():
            continue
        if at.date().weekday() >= 5:
            why = f"{at.date().isoformat()} is a {at.strftime('%A')}"
        elif day == at.date() - timedelta(days=1) and at < published_at(at.date()):
            why = f"{iso_z(at)} is before that day's 16:00 CET publication"
        else:
            why = f"the ECB published no rates on {at.date().isoformat()} (a TARGET holiday or not yet published)"
        notes.append(
            f"ECB publishes on working days only: {why}, so the rates of {day.isoformat()}, "
            "the last published day on or before that moment, were used"
        )
        break
    return notes


def fiat_doc(
    day: date, fetched_at: datetime | None, rates: dict[str, Decimal], *, source: str | None = None
) -> dict[str, Any]:
    return {
        "day": day.isoformat(),
        "source": source or "ecb",
        "fetched_at": None if fetched_at is None else iso_z(fetched_at),
        "rates": {c: str(r) for c, r in sorted(rates.items())},
    }
