"""``coinlytics backfill``: load past candles from an exchange's OHLCV endpoint through ccxt.

Per coin and interval the loaded range is one contiguous span [oldest, newest) kept in
``backfill_progress``. A run extends it on both sides: newer candles page forward from ``newest``, older
ones page backward from ``oldest``, and progress is saved after every page, so an interrupted run resumes
where it stopped. Pages whose candles are all stored already are not requested at all.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import ccxt.async_support as ccxt_async
import structlog
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.pricing.consolidation import USD_STABLECOINS, vs_of
from services.pricing.history import repository
from services.pricing.history.service import floor_time
from shared.backoff import jittered_backoff
from shared.ccxt_client import build_exchange, has_exchange, response_retry_after
from shared.db import transaction
from shared.messages import to_decimal
from shared.settings import Settings

log = structlog.get_logger("backfill")

BACKFILL_INTERVALS = ("1m", "1h", "1d")
STEP = {"1m": 60, "1h": 3600, "1d": 86_400}
# Candles per request each exchange accepts (ccxt does not say); others get a conservative default.
PAGE_LIMITS = {"binance": 1000, "kucoin": 1500, "okx": 100, "coinbase": 300, "bitstamp": 1000, "kraken": 720,
               "gemini": 500, "bybit": 1000}  # fmt: skip
DEFAULT_PAGE_LIMIT = 200
# Among markets counting toward a currency: the currency itself first, then stablecoins by liquidity.
STABLECOIN_PREFERENCE = ("USDT", "USDC", "FDUSD", "BUSD", "DAI", "TUSD", "USDP")


class BackfillError(Exception):
    pass


class Progress(Protocol):
    def update(self, n: float | None = 1) -> bool | None: ...

    def close(self) -> None: ...


class OhlcvSource:
    """One exchange's OHLCV endpoint through ccxt, with ccxt's rate limiter on and retries with backoff."""

    def __init__(
        self, name: str, *, rest_url: str | None, timeout_seconds: float, max_attempts: int = 5,
        base_delay: float = 1.0, max_delay: float = 60.0,
    ) -> None:  # fmt: skip
        if not has_exchange(name):
            raise BackfillError(f"unknown source {name!r}: ccxt has no exchange by that name")
        self.name = name
        self.rest_url = rest_url
        self.timeout_seconds = timeout_seconds
        self.max_attempts = max_attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.exchange: Any = None

    async def open(self) -> None:
        if self.exchange is not None:
            return
        exchange = build_exchange(self.name, timeout_seconds=self.timeout_seconds, rest_url=self.rest_url)
        self.exchange = exchange
        if not exchange.has.get("fetchOHLCV"):
            raise BackfillError(f"{self.name} offers no OHLCV history through ccxt")
        await self._call(exchange.load_markets)

    def market_for(self, base: str, vs: str) -> str | None:
        """The spot market whose quotes count toward ``vs`` (stablecoins toward USD, as pricing counts them)."""
        order = (vs, *(s for s in STABLECOIN_PREFERENCE if vs == "USD"), *sorted(USD_STABLECOINS))
        candidates: dict[str, str] = {}
        for market in self.exchange.markets.values():
            quote = market.get("quote")
            if market.get("base") != base or quote is None or vs_of(quote) != vs:
                continue
            if market.get("spot") is False or market.get("active") is False:
                continue
            candidates.setdefault(quote, market["symbol"])
        for quote in order:
            if quote in candidates:
                return candidates[quote]
        return None

    def timeframe(self, interval: str) -> str | None:
        timeframes = self.exchange.timeframes or {}
        return interval if interval in timeframes else None

    async def fetch(self, symbol: str, timeframe: str, since_ms: int, limit: int) -> list[list[Any]]:
        rows = await self._call(self.exchange.fetch_ohlcv, symbol, timeframe, since_ms, limit)
        if not isinstance(rows, list):
            raise BackfillError(f"{self.name} returned {type(rows).__name__} for candles")
        return rows

    async def _call(self, method: Callable[..., Any], *args: Any) -> Any:
        attempt = 0
        while True:
            attempt += 1
            try:
                return await method(*args)
            except (ccxt_async.RateLimitExceeded, ccxt_async.DDoSProtection) as exc:
                delay = self._retry_after() or self._backoff(attempt)
                reason = f"rate limited: {exc}"
            except (ccxt_async.NetworkError, ccxt_async.ExchangeNotAvailable) as exc:
                delay = self._backoff(attempt)
                reason = f"{type(exc).__name__}: {exc}"
            except ccxt_async.BaseError as exc:
                raise BackfillError(f"{self.name}: {type(exc).__name__}: {str(exc)[:300]}") from None
            except (ValueError, TypeError, KeyError, IndexError) as exc:
                raise BackfillError(f"{self.name}: unparseable response: {type(exc).__name__}: {exc}") from None
            if attempt >= self.max_attempts:
                raise BackfillError(f"{self.name}: gave up after {attempt} attempts: {reason[:300]}")
            log.warning("backfill_retry", source=self.name, attempt=attempt, delay=round(delay, 2), reason=reason[:300])
            await asyncio.sleep(delay)

    def _backoff(self, attempt: int) -> float:
        # Full jitter: spreads retries of several runs instead of synchronising them.
        return jittered_backoff(attempt, base=self.base_delay, cap=self.max_delay)

    def _retry_after(self) -> float | None:
        seconds = response_retry_after(self.exchange)
        return None if seconds is None else min(self.max_delay, seconds)

    async def close(self) -> None:
        if self.exchange is not None:
            await self.exchange.close()
            self.exchange = None


@dataclass
class TaskReport:
    base: str
    vs: str
    interval: str
    market: str | None = None
    requests: int = 0
    pages_skipped: int = 0
    stored: int = 0
    rejected: int = 0
    skipped: str | None = None


@dataclass
class BackfillReport:
    tasks: list[TaskReport] = field(default_factory=list)

    @property
    def stored(self) -> int:
        return sum(t.stored for t in self.tasks)

    @property
    def requests(self) -> int:
        return sum(t.requests for t in self.tasks)


def _ms(ts: datetime) -> int:
    return int(ts.timestamp() * 1000)


def _candle_row(raw: Sequence[Any], base: str, vs: str, interval: str, source: str) -> dict[str, Any] | None:
    """A ccxt OHLCV row ``[ms, open, high, low, close, volume]`` as a candle, or None when it is not sane."""
    try:
        t = datetime.fromtimestamp(int(raw[0]) / 1000, tz=UTC)
        o, h, low, c = (to_decimal(v) for v in raw[1:5])
        volume = to_decimal(raw[5]) if len(raw) > 5 else None
    except (ValueError, TypeError, IndexError, OverflowError):
        return None
    prices = (o, h, low, c)
    if any(p is None or p <= 0 for p in prices) or (volume is not None and volume < 0):
        return None
    assert o is not None and h is not None and low is not None and c is not None
    if h < max(o, c, low) or low > min(o, c):
        return None
    return {
        "base": base, "vs": vs, "interval": interval, "t": t, "open": o, "high": h, "low": low, "close": c,
        "volume": volume, "source": source, "first_ts": None, "last_ts": None,
    }  # fmt: skip


class Backfiller:
    def __init__(
        self,
        settings: Settings,
        sessions: async_sessionmaker[AsyncSession],
        *,
        source: str,
        page_limit: int | None = None,
        max_attempts: int = 5,
        base_delay: float = 1.0,
        progress_factory: Callable[[str, int], Progress] | None = None,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.source_name = source.lower()
        self.page_limit = page_limit or PAGE_LIMITS.get(self.source_name, DEFAULT_PAGE_LIMIT)
        self.exchange = OhlcvSource(
            self.source_name,
            rest_url=settings.source_url(self.source_name, "rest"),
            timeout_seconds=settings.source_timeout_seconds,
            max_attempts=max_attempts,
            base_delay=base_delay,
        )
        self.progress_factory = progress_factory

    def window(self, interval: str, days: float, end: datetime | None) -> tuple[datetime, datetime]:
        """[start, end) of complete candles; 1-minute history is not loaded past its retention."""
        step = STEP[interval]
        hi = floor_time(end or datetime.now(UTC), step)
        span = timedelta(days=days)
        if interval == "1m":
            span = min(span, timedelta(days=self.settings.retention_candles_1m_days))
        return floor_time(hi - span, step), hi

    async def run(
        self,
        coins: Sequence[str],
        *,
        vs: str = "USD",
        days: float,
        intervals: Sequence[str] = BACKFILL_INTERVALS,
        end: datetime | None = None,
    ) -> BackfillReport:
        report = BackfillReport()
        try:
            for coin in coins:
                for interval in intervals:
                    task = TaskReport(base=coin.upper(), vs=vs.upper(), interval=interval)
                    report.tasks.append(task)
                    await self._run_task(task, *self.window(interval, days, end))
        finally:
            await self.exchange.close()
        return report

    async def _run_task(self, task: TaskReport, start: datetime, end: datetime) -> None:
        step = timedelta(seconds=STEP[task.interval])
        async with transaction(self.sessions) as session:
            done = await repository.get_progress(session, task.base, task.vs, self.source_name, task.interval)
        if done is not None and (done[1] < start or done[0] > end):
            done = None  # disjoint from what is asked: start a new span (stored candles are still skipped)
        oldest, newest = done if done is not None else (end, end)
        segments: list[tuple[datetime, datetime, bool]] = []  # (lo, hi, forward)
        if newest < end:
            segments.append((newest, end, True))
        if start < oldest:
            segments.append((start, oldest, False))
        if not segments:
            task.skipped = "already loaded"
            log.info("backfill_skip", base=task.base, vs=task.vs, interval=task.interval, reason=task.skipped)
            return
        total = sum((hi - lo) // step for lo, hi, _ in segments)
        bar = self.progress_factory(f"{task.base}/{task.vs} {task.interval}", total) if self.progress_factory else None
        try:
            for lo, hi, forward in segments:
                page = step * self.page_limit
                cursor = lo if forward else hi
                while (cursor < hi) if forward else (cursor > lo):
                    page_lo, page_hi = (cursor, min(hi, cursor + page)) if forward else (max(lo, cursor - page), cursor)
                    if not await self._page(task, page_lo, page_hi, step):
                        return
                    cursor = page_hi if forward else page_lo
                    oldest, newest = min(oldest, page_lo), max(newest, page_hi)
                    async with transaction(self.sessions) as session:
                        await repository.set_progress(
                            session, task.base, task.vs, self.source_name, task.interval, oldest, newest
                        )
                    if bar is not None:
                        bar.update((page_hi - page_lo) // step)
        finally:
            if bar is not None:
                bar.close()

    async def _page(self, task: TaskReport, lo: datetime, hi: datetime, step: timedelta) -> bool:
        """Load one page [lo, hi). False when the task cannot go on (no market or timeframe)."""
        expected = (hi - lo) // step
        async with transaction(self.sessions) as session:
            stored = await repository.count_stored(session, task.base, task.vs, task.interval, lo, hi)
        if stored >= expected:
            task.pages_skipped += 1
            return True
        await self.exchange.open()
        if task.market is None:
            task.market = self.exchange.market_for(task.base, task.vs)
            if task.market is None:
                task.skipped = f"{self.source_name} lists no spot market for {task.base} in {task.vs}"
                log.warning("backfill_skip", base=task.base, vs=task.vs, interval=task.interval, reason=task.skipped)
                return False
        timeframe = self.exchange.timeframe(task.interval)
        if timeframe is None:
            task.skipped = f"{self.source_name} has no {task.interval} candles"
            log.warning("backfill_skip", base=task.base, vs=task.vs, interval=task.interval, reason=task.skipped)
            return False
        raw = await self.exchange.fetch(task.market, timeframe, _ms(lo), self.page_limit)
        task.requests += 1
        rows: dict[datetime, dict[str, Any]] = {}
        source = f"{self.source_name}:{task.market}"[:50]
        for item in raw:
            row = _candle_row(item, task.base, task.vs, task.interval, source)
            if row is None:
                task.rejected += 1
            elif lo <= row["t"] < hi:
                rows[row["t"]] = row
        async with transaction(self.sessions) as session:
            task.stored += await repository.insert_exchange_candles(session, list(rows.values()))
        return True


def parse_coins(raw: str) -> list[str]:
    return list(dict.fromkeys(part.strip().upper() for part in raw.split(",") if part.strip()))


def describe(report: BackfillReport) -> list[str]:
    lines = []
    for t in report.tasks:
        state = t.skipped or f"{t.stored} candles stored, {t.requests} requests, {t.pages_skipped} pages already stored"
        rejected = f", {t.rejected} malformed rows ignored" if t.rejected else ""
        lines.append(f"{t.base}/{t.vs} {t.interval} ({t.market or '-'}): {state}{rejected}")
    return lines


async def run_backfill(
    settings: Settings,
    *,
    coins: Sequence[str],
    vs: str,
    days: float,
    source: str,
    intervals: Sequence[str],
    end: datetime | None,
    show_progress: bool,
) -> BackfillReport:
    """Entry point of the CLI command: owns its own engine."""
    from tqdm import tqdm

    from shared.db import create_engine, session_factory

    def bar(label: str, total: int) -> Progress:
        progress: Progress = tqdm(total=total, desc=label, unit="candle", disable=not show_progress, leave=True)
        return progress

    engine = create_engine(settings.require_database_url(), pool_size=2)
    try:
        backfiller = Backfiller(settings, session_factory(engine), source=source, progress_factory=bar)
        return await backfiller.run(coins, vs=vs, days=days, intervals=intervals, end=end)
    finally:
        await engine.dispose()
