"""The websocket client and runner, for every venue that declares a ``WsProtocol`` (services/ingest/exchanges/),
with REST polling while the socket is down. Nothing here names an exchange.

Why hand-written clients and not ccxt's ``ccxt.pro`` watch methods
-------------------------------------------------------------------
The design asks for ccxt's watch methods. We tried ccxt 4.5.90 against a local server replaying the recorded
traffic in ../shared/fixtures/exchanges: kraken's watch methods speak websocket v2 only while the recorded
traffic is v1; binance's subscribe to ``@miniTicker``, which is not recorded (the venue modules say more).
And on all of them ccxt's receive loop dies on the first bad frame: a truncated JSON frame raises inside
``Client.handle_text_or_binary_message`` (orjson ``JSONDecodeError``) and a ``"price":"NaN"`` raises inside
``safe_ticker`` (``Precise``: ``invalid literal for int()``), both in an asyncio done-callback, so the next
``receive`` is never scheduled: the socket stays open but deaf, later good frames and even the server's
close are never read, and every further ``watch_ticker`` call just times out. The requirement that malformed
messages are skipped and counted without killing the connection cannot be met without patching ccxt's
private client methods.

So each venue module declares a small protocol class (subscribe message, frame parser, app-level ping) used
by the one aiohttp connection loop here. ccxt is still used for what it does well: loading the markets (which
pairs exist and their websocket names) and the REST fallback/backfill, through ``CcxtRestSource``.

Keep-alive: aiohttp answers server pings (autoping) and sends its own (``heartbeat``); a protocol with a
``ping_message`` also gets it when the feed has been quiet, and a feed silent for ``idle_timeout`` is
reconnected.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterable
from datetime import UTC, datetime

import aiohttp
import structlog
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.ingest.exchanges import our_symbol, venue_for
from services.ingest.exchanges.base import ExchangeNotice, MalformedMessage, WsProtocol
from services.ingest.metrics import IngestMetrics
from services.ingest.publishing import TickPublisher
from services.ingest.rest import CcxtRestSource
from services.ingest.runner import REOPEN_KINDS, Reporting
from services.ingest.sources import PREFERRED_QUOTES, SourceError
from shared.backoff import jittered_backoff
from shared.http import rebase_url
from shared.messages import TickMessage
from shared.settings import Settings
from shared.source_health import SourceHealth, SourceState
from shared.streams import StreamPublisher

log = structlog.get_logger("ingest.ws")


def protocol_for(name: str) -> WsProtocol | None:
    venue = venue_for(name)
    return venue.websocket() if venue is not None and venue.websocket is not None else None


def decode_frame(protocol: WsProtocol, text: str, received: datetime) -> list[TickMessage]:
    """One text frame to ticks; raises MalformedMessage / ExchangeNotice for frames to skip."""
    if protocol.is_control_text(text):
        return []
    try:
        message = json.loads(text)
    except ValueError as exc:
        raise MalformedMessage(f"invalid JSON ({len(text)} bytes): {exc}") from None
    return protocol.parse(message, received)


def ws_url(protocol: WsProtocol, override: str | None) -> str:
    """The feed's base URL; an override (COINLYTICS_SOURCE_<NAME>_WS_URL) replaces scheme, host and path prefix."""
    return rebase_url(protocol.default_url, override) if override else protocol.default_url


class _Throttle:
    def __init__(self, every: float) -> None:
        self.every = every
        self.last = -float("inf")

    def ready(self) -> bool:
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            return True
        return False


class _SocketEnded(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class WebsocketSource:
    """The identity IngestService reports (name, kind "ws") plus the protocol and its REST companion."""

    kind = "ws"

    def __init__(self, protocol: WsProtocol, *, url: str, rest: CcxtRestSource) -> None:
        self.name = protocol.name
        self.protocol = protocol
        self.url = url
        self.rest = rest

    async def close(self) -> None:
        await self.rest.close()


class WebsocketRunner(Reporting):
    """Keeps one exchange's socket open: subscribe, publish ticks, reconnect with capped jittered backoff,
    poll REST while the socket is down, and backfill the gap over REST once after each reconnect."""

    def __init__(
        self,
        source: WebsocketSource,
        *,
        settings: Settings,
        redis: Redis,
        publisher: StreamPublisher,
        sessions: async_sessionmaker[AsyncSession],
        health: SourceHealth,
        health_key: str,
        backoff_base: float = 1.0,
        backoff_cap: float = 60.0,
        idle_timeout: float = 60.0,
        heartbeat: float = 20.0,
        ping_after: float | None = None,
        metrics: IngestMetrics | None = None,
    ) -> None:
        super().__init__(source.name, redis=redis, sessions=sessions, health=health, key=health_key, metrics=metrics)
        self.source = source
        self.protocol = source.protocol
        self.settings = settings
        self.publisher = publisher
        # Each tick goes to its coin's pricing shard's stream (docs/scaling.md).
        self.ticks = TickPublisher(publisher, source.name, metrics=metrics, shards=settings.pricing_shards)
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.idle_timeout = idle_timeout
        self.heartbeat = heartbeat
        self.ping_after = ping_after if ping_after is not None else self.protocol.ping_after
        self.failures = 0
        self.connections = 0
        self.backfills = 0
        self.rest_open = False
        self._health_throttle = _Throttle(1.0)
        self._error_throttle = _Throttle(10.0)
        self._unrecorded_malformed = 0
        self._delivered = False
        self.coins: list[str] = list(settings.coins)
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._resubscribing = False
        self._dirty = False

    def set_coins(self, coins: list[str]) -> None:
        """Track a new coin list: markets are re-selected and the socket re-subscribes by reconnecting."""
        if coins == self.coins:
            return
        self.coins = list(coins)
        self.rest_open = False
        if self._ws is not None and not self._ws.closed:
            self._resubscribing = True
            asyncio.get_running_loop().create_task(self._ws.close())

    # -- the loop -------------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        await self._save_health(force=True)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.settings.source_timeout_seconds)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            try:
                while not stop.is_set():
                    stream = asyncio.create_task(self._connect_and_stream(session))
                    stopper = asyncio.create_task(stop.wait())
                    await asyncio.wait({stream, stopper}, return_when=asyncio.FIRST_COMPLETED)
                    stopper.cancel()
                    if not stream.done():
                        stream.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await stream
                        break
                    ended = stream.result()
                    if stop.is_set():
                        break
                    if ended.kind == "resubscribe":
                        continue
                    delay = self._backoff()
                    await self._went_down(ended, delay)
                    await self._fallback_until(stop, delay)
            finally:
                self._link_closed()
                await self.source.close()

    async def _connect_and_stream(self, session: aiohttp.ClientSession) -> _SocketEnded:
        """Runs one connection until it ends; returns why (never raises, except on cancellation)."""
        try:
            pairs = await self._pairs()
            url = self.protocol.endpoint(self.source.url, pairs)
            async with session.ws_connect(url, autoping=True, heartbeat=self.heartbeat, max_msg_size=2**22) as ws:
                self.protocol.reset()
                self._delivered = False
                self._ws = ws
                for message in self.protocol.subscribe_messages(pairs):
                    await ws.send_str(message)
                self.connections += 1
                self.health.connected()
                self._link_connected("ws", url=url.split("?")[0], pairs=len(pairs))
                if self.connections > 1:
                    self.health.reconnects += 1
                    # Quotes that changed while the socket was down: one REST poll before reading on.
                    await self._rest_poll("backfill")
                    self.backfills += 1
                await self._save_health(force=True)
                try:
                    return await self._read(ws)
                finally:
                    self._ws = None
        except asyncio.CancelledError:
            raise
        except SourceError as exc:
            return _SocketEnded(exc.kind, str(exc))
        except aiohttp.WSServerHandshakeError as exc:
            return _SocketEnded("handshake", f"handshake refused: {exc.status} {exc.message}")
        except (aiohttp.ClientError, OSError) as exc:
            return _SocketEnded("network", f"{type(exc).__name__}: {exc}")
        except TimeoutError:
            return _SocketEnded("timeout", "connection timed out")
        except Exception as exc:  # a feed must never take the service down
            log.exception("ws_unexpected_error", source=self.source.name)
            return _SocketEnded("unexpected", f"{type(exc).__name__}: {exc}")

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> _SocketEnded:
        quiet_since = time.monotonic()
        pinged = False
        while True:
            wait = self.idle_timeout - (time.monotonic() - quiet_since)
            if self.ping_after is not None and not pinged:
                wait = min(wait, self.ping_after - (time.monotonic() - quiet_since))
            try:
                # Wake at least every second so throttled health counters reach Redis on a quiet feed too.
                msg = await ws.receive(timeout=min(max(wait, 0.01), 1.0))
            except TimeoutError:
                if self._dirty:
                    await self._save_health(force=True)
                quiet = time.monotonic() - quiet_since
                if quiet >= self.idle_timeout:
                    await ws.close()
                    return _SocketEnded("stale", f"no message for {quiet:.0f}s")
                if self.protocol.ping_message is not None and not pinged:
                    await ws.send_str(self.protocol.ping_message)
                    pinged = True
                continue
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
                if self._resubscribing:
                    self._resubscribing = False
                    return _SocketEnded("resubscribe", "tracked coins changed")
                return _SocketEnded("disconnected", f"server closed the socket (code {ws.close_code})")
            if msg.type == aiohttp.WSMsgType.ERROR:
                return _SocketEnded("network", f"socket error: {ws.exception()}")
            if msg.type == aiohttp.WSMsgType.BINARY:
                text = msg.data.decode("utf-8", errors="replace")
            elif msg.type == aiohttp.WSMsgType.TEXT:
                text = msg.data
            else:
                continue
            quiet_since = time.monotonic()
            pinged = False
            await self._frame(text)

    async def _frame(self, text: str) -> None:
        received = datetime.now(UTC)
        try:
            ticks = decode_frame(self.protocol, text, received)
        except MalformedMessage as exc:
            await self._malformed(str(exc), text)
            return
        except ExchangeNotice as exc:
            log.warning("ws_exchange_error", source=self.source.name, reason=str(exc))
            self._count("exchange_error")
            await self._record_error("exchange_error", str(exc))
            return
        self.health.last_message_at = received.isoformat()
        self._delivered = True
        wanted = set(self.coins)
        ticks = [t for t in ticks if t.base in wanted and t.quote in PREFERRED_QUOTES]
        published = await self._publish(ticks)
        if published is not None:
            self.health.rate_window.append((time.monotonic(), published))
        await self._save_health()

    async def _publish(self, ticks: list[TickMessage]) -> int | None:
        """Publishes ``ticks`` (and any held back earlier); None when nothing went out."""
        if not ticks and not self.ticks.held:
            return None
        published = await self.ticks.publish(ticks)
        if published is None:
            self._count("publish_failed")
        else:
            self.health.messages_total += published
        return published

    async def _malformed(self, reason: str, text: str) -> None:
        log.warning("ws_message_skipped", source=self.source.name, reason=reason, frame=text[:200])
        self.health.rejected_total += 1
        self._count("malformed")
        self._unrecorded_malformed += 1
        # A broken feed can send thousands of bad frames: the error log gets a summary at most every 10 s.
        if self._error_throttle.ready():
            count, self._unrecorded_malformed = self._unrecorded_malformed, 0
            await self._record_error("malformed", f"{count} message(s) skipped; latest: {reason}")
        await self._save_health()

    # -- down time ------------------------------------------------------------------------------------------

    def _backoff(self) -> float:
        self.failures += 1
        # Equal jitter: never less than half the step, so a refusing server is not hammered.
        return jittered_backoff(self.failures, base=self.backoff_base, cap=self.backoff_cap, jitter="equal")

    async def _went_down(self, ended: _SocketEnded, delay: float) -> None:
        if self._delivered:
            # A socket that delivered and then ended is a normal event on exchanges: start the backoff over.
            self.failures = 1
            delay = min(delay, self.backoff_base)
        self.health.failed(ended.kind, str(ended), state=SourceState.DOWN, backoff_seconds=delay)
        self._link_failed("ws", str(ended), error_kind=ended.kind, retry_in=round(delay, 2))
        await self._record_error(f"ws_{ended.kind}", str(ended))
        await self._save_health(force=True)

    async def _fallback_until(self, stop: asyncio.Event, delay: float) -> None:
        """Waits ``delay`` before reconnecting, polling REST every poll interval meanwhile."""
        deadline = time.monotonic() + delay
        interval = self.settings.poll_interval_seconds
        while not stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=min(interval, remaining))
            if not stop.is_set() and deadline - time.monotonic() > 0:
                await self._rest_poll("fallback")

    async def _rest_poll(self, why: str) -> None:
        rest = self.source.rest
        try:
            if not self.rest_open:
                await rest.open(self.coins)
                self.rest_open = True
            ticks, rejected = await rest.poll()
        except SourceError as exc:
            if exc.kind in REOPEN_KINDS:
                self.rest_open = False
            self._count(f"rest_{exc.kind}")
            # Not a change of the link (the socket's state is what source_connected/disconnected follow).
            log.warning("source_error", source=self.source.name, kind="rest", reason=str(exc), why=why,
                        error_kind=exc.kind)  # fmt: skip
            await self._record_error(f"rest_{exc.kind}", f"{why}: {exc}")
            return
        except Exception as exc:
            log.exception("source_error", source=self.source.name, kind="rest", reason=f"{type(exc).__name__}: {exc}",
                          why=why, error_kind="unexpected")  # fmt: skip
            await self._record_error("rest_unexpected", f"{why}: {type(exc).__name__}: {exc}")
            return
        if await self._publish(ticks) is not None:
            self.health.last_message_at = datetime.now(UTC).isoformat()
        self.health.rejected_total += len(rejected)
        log.info("rest_poll", source=self.source.name, why=why, ticks=len(ticks), rejected=len(rejected))

    # -- subscriptions --------------------------------------------------------------------------------------

    async def _pairs(self) -> list[str]:
        """The exchange's pair names for the tracked coins: from its market list (loaded through ccxt by the
        REST companion) when that loads, else spelled from the coins and preferred quotes."""
        protocol = self.protocol
        protocol.known = {}
        try:
            if not self.rest_open:
                await self.source.rest.open(self.coins)
                self.rest_open = True
            exchange = self.source.rest.exchange
            pairs: list[str] = []
            for symbol in self.source.rest.symbols:
                market = exchange.markets.get(symbol, {})
                pair = protocol.ws_pair(market)
                if pair:
                    pairs.append(pair)
                    protocol.known[pair] = (our_symbol(str(market["base"])), our_symbol(str(market["quote"])))
            if pairs:
                return pairs
        except SourceError as exc:
            log.warning("ws_markets_unavailable", source=self.source.name, reason=str(exc))
        return self._candidates(self.coins)

    def _candidates(self, coins: Iterable[str]) -> list[str]:
        pairs = []
        for base in coins:
            for quote in PREFERRED_QUOTES:
                if base != quote:
                    pair = self.protocol.candidate_pair(base, quote)
                    self.protocol.known[pair] = (base, quote)
                    pairs.append(pair)
        return pairs

    # -- health ---------------------------------------------------------------------------------------------

    async def _save_health(self, *, force: bool = False) -> None:
        if not force and not self._health_throttle.ready():
            self._dirty = True
            return
        self._dirty = False
        await self._store_health()


def build_ws_source(settings: Settings, name: str) -> WebsocketSource | None:
    """A websocket source for ``name`` when it has one and it should be used; None means REST polling only.

    A REST URL override without a websocket override means the exchange is reached through a mirror or a
    replay server; opening the real exchange's socket then would mix two feeds under one source name."""
    protocol = protocol_for(name)
    if protocol is None:
        return None
    ws_override = settings.source_url(name, "ws")
    rest_override = settings.source_url(name, "rest")
    if rest_override and not ws_override:
        return None
    rest = CcxtRestSource(name, rest_url=rest_override, timeout_seconds=settings.source_timeout_seconds)
    return WebsocketSource(protocol, url=ws_url(protocol, ws_override), rest=rest)
