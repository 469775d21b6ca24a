"""Analytics: comparisons of coins, one coin's statistics, and charts, from the stored candles.

Each request reads every coin it needs in one query, aggregated to the interval inside PostgreSQL
(pricing's ``read_candle_floats``), computes in float64 with pandas (services/analytics/stats.py) and caches
the result in Redis under the normalised request. The cache key carries a version per coin and currency,
which the prices-stream consumer (services/analytics/consumers.py) bumps each time a new 1-minute candle
for it begins: a result never outlives the candles it was computed from by more than that, and
``COINLYTICS_ANALYTICS_CACHE_SECONDS`` bounds it in any case (a backfill writes candles without a price
event).
"""

from __future__ import annotations

import functools
import hashlib
import json
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pandas as pd
import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.analytics import charts, export, repository, stats
from services.analytics.anomalies import detect_anomalies
from services.pricing.coins.repository import active_coins
from services.pricing.consolidation import USD_STABLECOINS
from services.pricing.history.repository import read_candle_floats
from services.pricing.history.service import ceil_time, floor_time, plan_query
from services.pricing.repository import source_prices
from shared.db import transaction
from shared.errors import Conflict, NotFound, UnknownCurrency, UnknownSymbol, ValidationFailed
from shared.settings import Settings
from shared.timeparse import iso_z
from shared.validation import parse_symbols

log = structlog.get_logger("analytics")

DEFAULT_RANGE = timedelta(days=30)
COMPARE_MIN, COMPARE_MAX = 2, 20
MAX_COMPARISONS_PER_USER = 100
PERIODS = {"1d": timedelta(days=1), "7d": timedelta(days=7), "30d": timedelta(days=30), "90d": timedelta(days=90),
           "1y": timedelta(days=365), "3y": timedelta(days=3 * 365)}  # fmt: skip
CHART_KINDS = ("history", "candles", "compare", "correlation", "sources")
# Raw ticks are kept two days by default: the sources chart covers at most that.
SOURCES_MAX_RANGE = timedelta(days=2)
COLUMNS = ("open", "high", "low", "close", "volume")


@dataclass(frozen=True, slots=True)
class Window:
    start: datetime
    end: datetime
    interval: str
    step: int

    @property
    def lo(self) -> datetime:
        return floor_time(self.start, self.step)

    @property
    def hi(self) -> datetime:
        return ceil_time(self.end, self.step)

    def index(self) -> pd.DatetimeIndex:
        return stats.expected_index(self.start, self.end, self.step)

    def describe(self) -> dict[str, Any]:
        return {"start": iso_z(self.start), "end": iso_z(self.end), "interval": self.interval}


@dataclass(slots=True)
class Cached:
    body: bytes
    media_type: str
    hit: bool


def _frames(rows: Sequence[Sequence[Any]], symbols: Sequence[str]) -> dict[str, pd.DataFrame]:
    """One DataFrame per coin (bucket start -> OHLCV floats), from the rows of one query."""
    frames: dict[str, pd.DataFrame] = {}
    if rows:
        table = pd.DataFrame.from_records(rows, columns=["base", "t", *COLUMNS])
        table["t"] = pd.to_datetime(table["t"], utc=True)
        for column in COLUMNS:
            table[column] = pd.to_numeric(table[column], errors="coerce").astype("float64")
        for base, group in table.groupby("base", sort=False):
            frames[str(base)] = group.set_index("t")[list(COLUMNS)]
    empty = pd.DataFrame({c: pd.Series(dtype="float64") for c in COLUMNS}, index=pd.DatetimeIndex([], tz=UTC))
    return {symbol: frames.get(symbol, empty) for symbol in symbols}


def symbols_of(raw: str | Sequence[str], *, name: str = "symbols") -> list[str]:
    try:
        return parse_symbols(raw)
    except ValueError as exc:
        raise ValidationFailed(f"{name}: {exc}") from None


class AnalyticsService:
    def __init__(self, settings: Settings, sessions: async_sessionmaker[AsyncSession], redis: Redis) -> None:
        self.settings = settings
        self.sessions = sessions
        self.redis = redis

    # --- requests ------------------------------------------------------------------------------

    def window(
        self, start: datetime | None, end: datetime | None, interval: str, *, now: datetime | None = None
    ) -> Window:
        """The planned range. An open end is the end of the current minute, so repeated requests share a
        cache entry until the next candle begins."""
        now = now or datetime.now(UTC)
        end = end or ceil_time(now, 60)
        query = plan_query(
            "X", "X", start, end, interval, now=now,
            max_points=self.settings.analytics_max_points, default_range=DEFAULT_RANGE,
        )  # fmt: skip
        return Window(query.start, query.end, query.interval, query.step)

    async def _check_market(self, session: AsyncSession, symbols: Sequence[str], vs: str) -> None:
        tracked = set(await active_coins(session))
        unknown = [s for s in symbols if s not in tracked]
        if unknown:
            raise UnknownSymbol(f"unknown coin: {', '.join(unknown)} (not tracked)", details={"unknown": unknown})
        if vs not in self.settings.vs_currencies:
            known = ", ".join(self.settings.vs_currencies)
            raise UnknownCurrency(
                f"unknown currency: {vs} (prices are published in {known})", details={"unknown": [vs]}
            )

    async def _read(
        self, symbols: Sequence[str], vs: str, window: Window, *, optional: Sequence[str] = ()
    ) -> dict[str, pd.DataFrame]:
        """Every coin's candles in one query; an untracked coin is a 404, except those in ``optional``, which
        are left out instead."""
        async with self.sessions() as session:
            if optional:
                tracked = set(await active_coins(session))
                symbols = [s for s in symbols if s not in optional or s in tracked]
            await self._check_market(session, symbols, vs)
            rows = await read_candle_floats(session, symbols, vs, window.interval, window.lo, window.hi)
        return _frames(rows, symbols)

    # --- the cache -----------------------------------------------------------------------------

    def version_key(self, symbol: str, vs: str) -> str:
        return self.settings.key("analytics", "version", symbol, vs)

    async def _cache_key(self, request: dict[str, Any], pairs: Sequence[tuple[str, str]]) -> str | None:
        try:
            versions = await self.redis.mget([self.version_key(s, v) for s, v in pairs]) if pairs else []
        except RedisError as exc:
            log.warning("analytics_cache_unavailable", error=str(exc))
            return None
        normalised = json.dumps(
            {"request": request, "versions": [v.decode() if v else "0" for v in versions]}, sort_keys=True
        )
        return self.settings.key("analytics", "cache", hashlib.sha256(normalised.encode()).hexdigest())

    async def cached(
        self,
        request: dict[str, Any],
        pairs: Sequence[tuple[str, str]],
        compute: Callable[[], Awaitable[tuple[bytes, str]]],
    ) -> Cached:
        """``compute()`` (body, media type), or the cached result of the same request over the same candles."""
        key = await self._cache_key(request, pairs)
        if key is not None:
            try:
                found = await self.redis.hmget(key, ["media_type", "body"])  # type: ignore[misc]
            except RedisError:
                found = [None, None]
            if found[0] is not None and found[1] is not None:
                return Cached(found[1], found[0].decode(), hit=True)
        body, media_type = await compute()
        ttl = self.settings.analytics_cache_seconds
        if key is not None and ttl > 0:
            try:
                async with self.redis.pipeline(transaction=True) as pipe:
                    pipe.hset(key, mapping={"media_type": media_type, "body": body})
                    pipe.expire(key, max(1, int(ttl)))
                    await pipe.execute()
            except RedisError as exc:
                log.warning("analytics_cache_not_written", error=str(exc))
        return Cached(body, media_type, hit=False)

    async def new_candles(self, pairs: Sequence[tuple[str, str, datetime]]) -> int:
        """Called for each price event: a pair whose minute changed has a new candle, so its cached results
        are stale. Returns how many versions moved."""
        moved = 0
        for symbol, vs, at in pairs:
            minute = str(int(floor_time(at, 60).timestamp()))
            marker = self.settings.key("analytics", "minute", symbol, vs)
            previous = await self.redis.set(marker, minute, get=True, ex=86_400)
            if previous is None or previous.decode() != minute:
                await self.redis.incr(self.version_key(symbol, vs))
                moved += 1
        return moved

    # --- compare -------------------------------------------------------------------------------

    def _compare_request(
        self, symbols: Sequence[str], vs: str, window: Window, benchmark: str | None, risk_free_rate: float
    ) -> dict[str, Any]:
        if not COMPARE_MIN <= len(symbols) <= COMPARE_MAX:
            raise ValidationFailed(
                f"symbols: compare takes {COMPARE_MIN} to {COMPARE_MAX} coins, got {len(symbols)}",
                details={"count": len(symbols), "min": COMPARE_MIN, "max": COMPARE_MAX},
            )
        if not -1 < risk_free_rate < 1:
            raise ValidationFailed("risk_free_rate: an annual rate as a fraction, between -1 and 1 (0.04 is 4%)")
        return {
            "what": "compare", "symbols": list(symbols), "vs": vs, **window.describe(),
            "benchmark": benchmark or "BTC", "benchmark_given": benchmark is not None,
            "risk_free_rate": risk_free_rate,
        }  # fmt: skip

    async def _compare_result(self, request: dict[str, Any], window: Window) -> dict[str, Any]:
        symbols, benchmark = request["symbols"], request["benchmark"]
        # The benchmark is read in the same query even when it is not one of the coins compared. The default
        # (BTC) is left out where BTC isn't tracked: each beta is then null, with the reason.
        extra = [] if benchmark in symbols else [benchmark]
        optional = not request.get("benchmark_given")
        frames = await self._read([*symbols, *extra], request["vs"], window, optional=extra if optional else [])
        if extra and extra[0] not in frames:
            extra = []
        result = stats.compare(
            {s: frames[s] for s in symbols},
            window.index(),
            window.step,
            risk_free_rate=request["risk_free_rate"],
            benchmark=benchmark,
            benchmark_candles=frames[benchmark] if extra else None,
        )
        return {"vs": request["vs"], **window.describe(), **result}

    async def compare(
        self,
        symbols: Sequence[str],
        vs: str,
        start: datetime | None,
        end: datetime | None,
        interval: str,
        *,
        benchmark: str | None = None,
        risk_free_rate: float = 0.0,
        fmt: str = "json",
    ) -> Cached:
        window = self.window(start, end, interval)
        bench = benchmark.upper() if benchmark else None
        request = self._compare_request(symbols, vs, window, bench, risk_free_rate)
        request["format"] = fmt

        async def compute() -> tuple[bytes, str]:
            result = await self._compare_result(request, window)
            if fmt == "csv":
                return export.compare_csv(result).encode(), "text/csv; charset=utf-8"
            return _json(result), "application/json"

        watched = [*symbols, *([request["benchmark"]] if request["benchmark"] not in symbols else [])]
        return await self.cached(request, [(s, vs) for s in watched], compute)

    # --- one coin ------------------------------------------------------------------------------

    async def analysis(
        self, symbol: str, vs: str, start: datetime | None, end: datetime | None, interval: str
    ) -> Cached:
        window = self.window(start, end, interval)
        request = {"what": "analysis", "symbol": symbol, "vs": vs, **window.describe()}

        async def compute() -> tuple[bytes, str]:
            frames = await self._read([symbol], vs, window)
            result = stats.analyze(frames[symbol], window.index(), window.step)
            return _json({"symbol": symbol, "vs": vs, **window.describe(), **result}), "application/json"

        return await self.cached(request, [(symbol, vs)], compute)

    # --- charts --------------------------------------------------------------------------------

    async def chart(
        self,
        kind: str,
        *,
        symbol: str | None,
        symbols: Sequence[str] | None,
        vs: str,
        start: datetime | None,
        end: datetime | None,
        interval: str,
        fmt: str,
        benchmark: str | None = None,
        outlier_pct: float = 1.0,
        assets_url: str,
    ) -> Cached:
        if kind not in CHART_KINDS:
            raise ValidationFailed(f"kind: one of {', '.join(CHART_KINDS)}", details={"allowed": list(CHART_KINDS)})
        if fmt == "csv" and kind not in ("history", "compare"):
            raise ValidationFailed("format=csv is offered for the history and compare charts")
        multi = kind in ("compare", "correlation")
        if multi:
            coins = list(symbols or [])
        else:
            if not symbol and symbols and len(symbols) == 1:
                symbol = symbols[0]
            if not symbol:
                raise ValidationFailed(f"symbol: the {kind} chart is of one coin (symbol=BTC)")
            coins = [symbol]
        if kind == "sources":
            end = end or datetime.now(UTC)
            start = start or end - timedelta(hours=6)
            if end - start > SOURCES_MAX_RANGE:
                raise ValidationFailed(
                    "the sources chart covers at most 2 days (raw per-exchange ticks are kept that long); "
                    "use a shorter range",
                    details={"max_hours": SOURCES_MAX_RANGE.total_seconds() / 3600},
                )
        window = self.window(start, end, interval)
        request: dict[str, Any] = {
            "what": "chart", "kind": kind, "symbols": coins, "vs": vs, **window.describe(), "format": fmt,
            "assets": assets_url, "benchmark": (benchmark or "BTC").upper(), "outlier_pct": outlier_pct,
        }  # fmt: skip
        if multi:
            self._compare_request(coins, vs, window, request["benchmark"], 0.0)

        async def compute() -> tuple[bytes, str]:
            figure, title = await self._figure(kind, coins, vs, window, request, fmt)
            if fmt == "csv":
                return figure, "text/csv; charset=utf-8"
            if fmt == "html":
                page = charts.standalone_html(
                    figure,
                    title=title,
                    plotly_js_url=f"{assets_url}/plotly.min.js",
                    renderer_js_url=f"{assets_url}/chart.js",
                )
                return page.encode(), "text/html; charset=utf-8"
            return _json(charts.figure_json(figure)), "application/json"

        watched = [*coins, *([request["benchmark"]] if multi and request["benchmark"] not in coins else [])]
        return await self.cached(request, [(c, vs) for c in watched], compute)

    async def _figure(
        self, kind: str, coins: list[str], vs: str, window: Window, request: dict[str, Any], fmt: str
    ) -> tuple[Any, str]:
        if kind in ("compare", "correlation"):
            result = await self._compare_result({**request, "risk_free_rate": 0.0}, window)
            if fmt == "csv":
                return export.compare_csv(result).encode(), ""
            if kind == "compare":
                return charts.compare_figure(result, vs), f"{', '.join(coins)} in {vs}: normalised performance"
            return charts.correlation_figure(result), f"{', '.join(coins)}: correlation of returns"
        symbol = coins[0]
        if kind == "sources":
            return await self._sources_figure(symbol, vs, window, float(request["outlier_pct"]))
        frames = await self._read([symbol], vs, window)
        candles = frames[symbol]
        if fmt == "csv":
            return export.history_csv(symbol, vs, candles).encode(), ""
        if kind == "history":
            anomalies = detect_anomalies(candles, window.index())
            return charts.history_figure(symbol, vs, candles, anomalies), f"{symbol} in {vs}"
        return charts.candles_figure(symbol, vs, candles), f"{symbol} in {vs}: candles"

    async def _sources_figure(self, symbol: str, vs: str, window: Window, outlier_pct: float) -> tuple[Any, str]:
        quotes = [vs, *sorted(USD_STABLECOINS)] if vs == "USD" else [vs]
        async with self.sessions() as session:
            await self._check_market(session, [symbol], vs)
            ticks = await source_prices(session, symbol, quotes, window.step, window.lo, window.hi)
            rows = await read_candle_floats(session, [symbol], vs, window.interval, window.lo, window.hi)
        consolidated = _frames(rows, [symbol])[symbol]["close"]
        points: dict[str, list[tuple[datetime, float]]] = {}
        for tick in ticks:
            name = tick["source"] if tick["quote"] == vs else f"{tick['source']} ({tick['quote']})"
            points.setdefault(name, []).append((tick["t"], float(tick["price"])))
        frames = {name: _price_frame(series) for name, series in points.items()}
        figure = charts.sources_figure(symbol, vs, frames, consolidated, outlier_pct=outlier_pct)
        return figure, f"{symbol} in {vs}: each exchange around the consolidated price"

    # --- saved comparisons ---------------------------------------------------------------------

    async def save_comparison(self, user_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """``body``: name, symbols, vs, and either ``period`` (relative: 30d is the last 30 days at each run) or
        ``start`` (and optionally ``end``; without it a run goes up to its own now); interval, benchmark,
        risk_free_rate."""
        owner = uuid.UUID(user_id)
        symbols = symbols_of(body["symbols"])
        vs = str(body.get("vs") or "USD").upper()
        period, start, end = body.get("period"), body.get("start"), body.get("end")
        if period is not None and (start is not None or end is not None):
            raise ValidationFailed("give either period (a relative range such as 30d) or start and end, not both")
        if period is None and start is None:
            period = "30d"
        if period is not None and period not in PERIODS:
            raise ValidationFailed(f"period: one of {', '.join(PERIODS)}", details={"allowed": list(PERIODS)})
        interval = body.get("interval") or "auto"
        # Planned now, as a run would: a range or interval that can never run is refused at once.
        window = self.window(datetime.now(UTC) - PERIODS[period] if period else start, end, interval)
        bench = str(body["benchmark"]).upper() if body.get("benchmark") else None
        risk_free_rate = float(body.get("risk_free_rate") or 0.0)
        self._compare_request(symbols, vs, window, bench, risk_free_rate)
        async with transaction(self.sessions) as session:
            await self._check_market(session, symbols, vs)
            if await repository.count_comparisons(session, owner) >= MAX_COMPARISONS_PER_USER:
                raise ValidationFailed(
                    f"you already have {MAX_COMPARISONS_PER_USER} saved comparisons; delete one first"
                )
            if await repository.name_taken(session, owner, body["name"]):
                raise Conflict(f"you already have a comparison named {body['name']!r}")
            saved = await repository.add_comparison_once(
                session,
                id=uuid.uuid4(),
                user_id=owner,
                name=body["name"],
                symbols=symbols,
                vs=vs,
                period=period,
                start=None if period else start,
                end=None if period else end,
                interval=interval,
                benchmark=bench,
                risk_free_rate=Decimal(str(risk_free_rate)),
                created_at=datetime.now(UTC),
            )
            if saved is None:  # the same name saved by a concurrent request since the check above
                raise Conflict(f"you already have a comparison named {body['name']!r}")
        return _comparison_body(saved)

    async def list_comparisons(self, user_id: str) -> dict[str, Any]:
        async with self.sessions() as session:
            rows = await repository.user_comparisons(session, uuid.UUID(user_id))
        return {"items": [_comparison_body(c) for c in rows]}

    async def get_comparison(self, user_id: str, comparison_id: uuid.UUID) -> dict[str, Any]:
        async with self.sessions() as session:
            found = await repository.user_comparison(session, uuid.UUID(user_id), comparison_id)
        if found is None:
            raise NotFound(f"no such comparison: {comparison_id}")
        return _comparison_body(found)

    async def delete_comparison(self, user_id: str, comparison_id: uuid.UUID) -> None:
        async with transaction(self.sessions) as session:
            if not await repository.delete_comparison(session, uuid.UUID(user_id), comparison_id):
                raise NotFound(f"no such comparison: {comparison_id}")

    async def run_comparison(self, user_id: str, comparison_id: uuid.UUID, *, fmt: str = "json") -> Cached:
        saved = await self.get_comparison(user_id, comparison_id)
        if saved["period"]:
            end = None
            start = datetime.now(UTC) - PERIODS[saved["period"]]
        else:
            start = datetime.fromisoformat(saved["start"])
            end = datetime.fromisoformat(saved["end"]) if saved["end"] else None
        return await self.compare(
            saved["symbols"], saved["vs"], start, end, saved["interval"],
            benchmark=saved["benchmark"], risk_free_rate=float(saved["risk_free_rate"]), fmt=fmt,
        )  # fmt: skip


def _comparison_body(saved: Any) -> dict[str, Any]:
    return {
        "id": str(saved.id),
        "name": saved.name,
        "symbols": list(saved.symbols),
        "vs": saved.vs,
        "period": saved.period,
        "start": iso_z(saved.start),
        "end": iso_z(saved.end),
        "interval": saved.interval,
        "benchmark": saved.benchmark,
        "risk_free_rate": str(saved.risk_free_rate),
        "created_at": iso_z(saved.created_at),
    }


STATIC = Path(__file__).parent / "static"


ASSETS = ("plotly.min.js", charts.RENDERER_FILE)


def chart_asset(name: str) -> tuple[bytes, str, str] | None:
    """(body, media type, ETag) of a script the chart pages load: Plotly from the installed package, or our
    renderer from services/analytics/static/. Any other name is None (and nothing is kept for it)."""
    return _asset(name) if name in ASSETS else None


@functools.cache
def _asset(name: str) -> tuple[bytes, str, str]:
    if name == "plotly.min.js":
        return charts.plotly_js(), "text/javascript; charset=utf-8", charts.plotly_js_etag()
    body = (STATIC / name).read_bytes()
    media_type = "text/javascript; charset=utf-8" if name.endswith(".js") else "text/css; charset=utf-8"
    return body, media_type, '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def _price_frame(points: list[tuple[datetime, float]]) -> pd.DataFrame:
    frame = pd.DataFrame(points, columns=["t", "price"])
    frame["t"] = pd.to_datetime(frame["t"], utc=True)
    return frame.set_index("t")


def _json(value: Any) -> bytes:
    # orjson: a year of hourly statistics for 20 coins is some 350,000 numbers, which the standard encoder
    # takes longer to write than the statistics take to compute. It writes NaN as null, never as NaN.
    return orjson.dumps(value, default=_default, option=orjson.OPT_SERIALIZE_NUMPY)


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
