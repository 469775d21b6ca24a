"""The live hub: one reader of the prices and alert-events streams per gateway process, fanned out to the
open websockets, and the life of each socket.

Live push, not durable delivery: the hub reads with a plain XREAD from where the streams ended when it
started (no consumer group, nothing acknowledged); a client that was away asks the REST API. Entries are
indexed on arrival by (base, vs) and by user, so one price costs O(sockets subscribed to that pair).

Each socket has its own writer task and bounded queues, so a slow client only ever delays itself: its
prices coalesce to the latest per pair, and a client that lets alert or reply frames pile up past
``live_queue_frames``, or whose send does not complete within ``live_send_timeout_seconds``, is
disconnected (4408). One clock for all sockets (not a timer each) sends heartbeats, re-checks tokens
(expiry, revocation) and watches for sends that do not complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.websockets import WebSocket, WebSocketDisconnect

from services.gateway.auth.service import AuthService
from services.gateway.live import schemas
from services.gateway.live.schemas import (
    CLOSE_FORBIDDEN,
    CLOSE_POLICY,
    CLOSE_TOO_SLOW,
    CLOSE_TRY_LATER,
    CLOSE_UNAUTHORIZED,
    CLOSE_UNAVAILABLE,
    COOKIE_NAME,
    SUBPROTOCOL,
    TOO_SLOW_REASON,
    BadEntry,
    Pair,
)
from services.gateway.memo import ReadMemo
from services.gateway.ratelimit import SlidingWindowLimiter
from services.pricing.coins.repository import active_coins
from shared.auth import Authenticator, Principal, bearer_token
from shared.backoff import jittered_backoff
from shared.errors import AppError, RateLimited, store_unavailable
from shared.settings import Settings
from shared.streams import ALERT_EVENTS_STREAM, PRICES_STREAM, PoisonMessage, StreamMessage, decode_text
from shared.validation import SYMBOL_RE

log = structlog.get_logger("live")

# XREAD: entries per stream per read, and how long one read waits for new ones.
READ_COUNT = 1000
READ_BLOCK_MS = 1000
# No read completed for this long: the supervisor's health check reports the hub as stalled.
STALL_SECONDS = 30.0
# A new socket waits at most this long for the hub's first read position, so nothing published after its
# welcome frame is missed; past it (Redis unreachable) the socket opens anyway and prices follow later.
READY_WAIT_SECONDS = 5.0
# Signed-in sockets whose revocation is checked at once (concurrent Redis calls, each holding a pooled
# connection) at a heartbeat.
REVOCATION_BATCH = 20
EXPIRED_REASON = "access token expired: reconnect with a new one"
# How long a closing frame may wait behind a full buffer before the connection is dropped without it.
CLOSE_GRACE_SECONDS = 5.0
CLOSE_REASON_BYTES = 123  # RFC 6455: a close frame's payload is at most 125 bytes, two of them the code


class Refused(Exception):
    """The socket cannot open: an error frame with ``code`` and ``message``, then close ``close_code``."""

    def __init__(self, close_code: int, code: str, message: str) -> None:
        super().__init__(message)
        self.close_code = close_code
        self.code = code
        self.message = message


def _reason(message: str) -> str:
    encoded = message.encode()
    if len(encoded) <= CLOSE_REASON_BYTES:
        return message
    return encoded[: CLOSE_REASON_BYTES - 3].decode(errors="ignore") + "..."


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class LiveSocket:
    """One open websocket: what it is subscribed to, who it is, and what waits to be sent."""

    def __init__(
        self, websocket: WebSocket, vs: str, principal: Principal | None, queue_frames: int, next_beat: float
    ) -> None:
        self.websocket = websocket
        self.vs = vs
        self.symbols: list[str] = []
        self.principal = principal
        self.queue_frames = queue_frames
        # The latest price frame per pair not sent yet; a newer one replaces it in place (coalescing).
        self.prices: dict[Pair, str] = {}
        self.alerts: deque[str] = deque()
        self.control: deque[str] = deque()
        self.wake = asyncio.Event()
        # Set once: why the server closes this socket (code, reason); or gone when the client left.
        self.closing: tuple[int, str] | None = None
        self.gone = False
        # When the drain in progress started (loop time), for the hub's watchdog; None between drains.
        self.sending_since: float | None = None
        self.next_beat = next_beat
        self.writer: asyncio.Task[None] | None = None

    @property
    def user_id(self) -> str | None:
        return self.principal.user_id if self.principal else None

    def pending(self) -> bool:
        return bool(self.control or self.alerts or self.prices)

    def offer_price(self, pair: Pair, frame: str) -> bool:
        """Queue a price frame; True when it replaced one not sent yet."""
        replaced = pair in self.prices
        self.prices[pair] = frame
        self.wake.set()
        return replaced

    def offer_alert(self, frame: str) -> None:
        if len(self.alerts) >= self.queue_frames:
            self.close(CLOSE_TOO_SLOW, TOO_SLOW_REASON)
            return
        self.alerts.append(frame)
        self.wake.set()

    def reply(self, frame: str) -> None:
        if len(self.control) >= self.queue_frames:
            self.close(CLOSE_TOO_SLOW, TOO_SLOW_REASON)
            return
        self.control.append(frame)
        self.wake.set()

    def close(self, code: int, reason: str) -> None:
        if self.closing is None:
            self.closing = (code, reason)
        if self.sending_since is not None and self.writer is not None:
            self.writer.cancel()  # it may be stuck behind a full buffer; nothing of a frame is written yet
        self.wake.set()

    def take(self) -> list[str]:
        frames = [*self.control, *self.alerts, *self.prices.values()]
        self.control.clear()
        self.alerts.clear()
        self.prices = {}
        return frames


class _Metrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.sockets = Gauge("live_sockets", "Open live websockets of this gateway process", registry=registry)
        self.refused = Counter(
            "live_refused_total", "Live websockets refused at connect, by error code", ["code"], registry=registry
        )
        self.closed = Counter(
            "live_closed_total", "Live websockets closed by the server, by close code", ["code"], registry=registry
        )
        self.coalesced = Counter(
            "live_prices_coalesced_total", "Price frames replaced by a newer one before they were sent",
            registry=registry,
        )  # fmt: skip
        self.entries = Counter("live_entries_total", "Stream entries read by the hub", ["stream"], registry=registry)
        self.bad_entries = Counter(
            "live_bad_entries_total", "Stream entries skipped as unreadable", ["stream"], registry=registry
        )


class LiveHub:
    def __init__(
        self,
        settings: Settings,
        redis: Redis,
        sessions: async_sessionmaker[AsyncSession],
        authenticator: Authenticator,
        limiter: SlidingWindowLimiter,
        auth: AuthService,
        registry: CollectorRegistry | None = None,
        memo: ReadMemo | None = None,
    ) -> None:
        self.settings = settings
        self.redis = redis
        # The gateway's read memo (services/gateway/memo.py) hears the prices stream through this reader.
        self.memo = memo
        self.sessions = sessions
        self.authenticator = authenticator
        self.limiter = limiter
        self.auth = auth
        self.metrics = _Metrics(registry)
        self.prices_key = settings.key("stream", PRICES_STREAM)
        self.alerts_key = settings.key("stream", ALERT_EVENTS_STREAM)
        self.by_pair: dict[Pair, set[LiveSocket]] = {}
        self.by_user: dict[str, set[LiveSocket]] = {}
        self.sockets: set[LiveSocket] = set()
        # Sockets from accept to close, counted against live_max_sockets (handshakes included).
        self.admitted = 0
        self.ready = asyncio.Event()
        self._positions: dict[str, str] = {}
        self._last_read_at = time.monotonic()
        self._last_error: str | None = None
        self._tracked: frozenset[str] = frozenset()
        self._tracked_at: float | None = None
        self._tracked_lock = asyncio.Lock()

    # --- the reader ------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Reads both streams, and keeps the sockets' clocks, until ``stop``."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._read_streams(stop))
            group.create_task(self._keep_time(stop))

    async def _read_streams(self, stop: asyncio.Event) -> None:
        """Redis outages are waited out with a backoff; an unreadable entry is skipped with a warning."""
        outages = 0
        self._last_read_at = time.monotonic()
        while not stop.is_set():
            try:
                if outages or not self._positions:
                    self._positions = await self._start_positions()
                    self.ready.set()
                response = await self.redis.xread(self._positions, count=READ_COUNT, block=READ_BLOCK_MS)
            except (RedisError, OSError) as exc:
                outages += 1
                if self.memo is not None:
                    self.memo.clear(outage=True)
                self._last_error = f"{type(exc).__name__}: {exc}"
                delay = jittered_backoff(outages, base=0.5, cap=10.0, jitter="equal")
                log.warning("live_redis_unavailable", error=self._last_error, retry_in=round(delay, 2))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=delay)
                continue
            if outages:
                log.info("live_redis_back", after_failures=outages)
            outages = 0
            self._last_error = None
            self._last_read_at = time.monotonic()
            self._dispatch(response)
            if self.memo is not None:
                self.memo.heard()

    async def _start_positions(self) -> dict[str, str]:
        """Where to read from: each stream's last entry at the first start, so only new entries are pushed.
        After an outage the reader goes on where it stopped, unless the stream now ends before that (it was
        deleted or the server lost its data)."""
        positions = {}
        for key in (self.prices_key, self.alerts_key):
            last = await self.redis.xrevrange(key, count=1)
            current = decode_text(last[0][0]) if last else "0-0"
            saved = self._positions.get(key)
            positions[key] = saved if saved is not None and _id_key(saved) <= _id_key(current) else current
        return positions

    def _dispatch(self, response: Any) -> None:
        streams: Iterable[Any] = response.items() if isinstance(response, dict) else response or []
        for raw_key, entries in streams:
            key = decode_text(raw_key)
            stream = PRICES_STREAM if key == self.prices_key else ALERT_EVENTS_STREAM
            for raw_id, fields in entries:
                entry_id = decode_text(raw_id)
                self._positions[key] = entry_id
                self.metrics.entries.labels(stream).inc()
                try:
                    payload = self._payload(fields)
                    if stream == PRICES_STREAM:
                        self._fan_out_price(payload, entry_id)
                    else:
                        self._fan_out_alert(payload)
                except BadEntry as exc:
                    self.metrics.bad_entries.labels(stream).inc()
                    self._unreadable(stream)
                    log.warning("live_entry_skipped", stream=stream, entry_id=entry_id, reason=str(exc))
                except Exception as exc:
                    # A payload shape nobody foresaw: one entry lost, never the reader.
                    self.metrics.bad_entries.labels(stream).inc()
                    self._unreadable(stream)
                    log.exception("live_entry_failed", stream=stream, entry_id=entry_id, error=type(exc).__name__)

    @staticmethod
    def _payload(fields: Any) -> dict[str, Any]:
        # The one decoding of a stream entry (shared/streams.py StreamMessage.payload), its refusals as BadEntry.
        if not isinstance(fields, dict):
            raise BadEntry("the entry has no fields")
        try:
            text = {decode_text(k): decode_text(v) for k, v in fields.items()}
            return StreamMessage(id="", fields=text).payload()
        except PoisonMessage as exc:  # bytes that are not UTF-8 were replaced: they fail as JSON here
            raise BadEntry(str(exc)) from None

    def _unreadable(self, stream: str) -> None:
        # An unreadable price entry may have been news for any pair: no memoised answer is vouched for.
        if stream == PRICES_STREAM and self.memo is not None:
            self.memo.clear()

    def _fan_out_price(self, payload: dict[str, Any], entry_id: str) -> None:
        pair, frame = schemas.price_frame(payload, entry_id)
        if self.memo is not None:
            event_id = payload.get("event_id")
            self.memo.price_event(pair, event_id if isinstance(event_id, str) else None)
        coalesced = 0
        for socket in self.by_pair.get(pair, ()):
            coalesced += socket.offer_price(pair, frame)
        if coalesced:
            self.metrics.coalesced.inc(coalesced)

    def _fan_out_alert(self, payload: dict[str, Any]) -> None:
        user_id, frame = schemas.alert_frame(payload)
        for socket in self.by_user.get(user_id, ()):
            socket.offer_alert(frame)

    async def _keep_time(self, stop: asyncio.Event) -> None:
        """One clock for every socket (instead of a timer each): heartbeats with the token checks, expiry,
        and the watchdog that disconnects a client whose send has not completed in time."""
        settings = self.settings
        tick = min(1.0, settings.live_heartbeat_seconds / 2, settings.live_send_timeout_seconds / 2)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=tick)
            try:
                await self._tick()
            except Exception as exc:
                log.exception("live_tick_failed", error=f"{type(exc).__name__}: {exc}")

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        now, wall = loop.time(), time.time()
        late = now - self.settings.live_send_timeout_seconds
        beating: list[LiveSocket] = []
        for socket in list(self.sockets):
            if socket.closing is not None or socket.gone:
                continue
            if socket.sending_since is not None and socket.sending_since < late:
                socket.close(CLOSE_TOO_SLOW, TOO_SLOW_REASON)
            elif socket.principal is not None and _expired(socket.principal, wall):
                socket.close(CLOSE_UNAUTHORIZED, EXPIRED_REASON)
            elif now >= socket.next_beat:
                socket.next_beat = now + self.settings.live_heartbeat_seconds
                beating.append(socket)
        if not beating:
            return
        signed_in = [s for s in beating if s.principal is not None]
        for start in range(0, len(signed_in), REVOCATION_BATCH):
            batch = signed_in[start : start + REVOCATION_BATCH]
            await asyncio.gather(*(self._revoked(s) for s in batch))
        frame = schemas.heartbeat(datetime.now(UTC))
        for socket in beating:
            if socket.closing is None:
                socket.reply(frame)

    async def stall_reason(self) -> str | None:
        """For the supervisor: why the hub is not pushing (no read completed for a while), else None."""
        idle = time.monotonic() - self._last_read_at
        if idle <= STALL_SECONDS:
            return None
        cause = f" (last error: {self._last_error})" if self._last_error else ""
        return f"live push completed no stream read for {idle:.0f}s{cause}"

    # --- one socket ------------------------------------------------------------------------------

    async def serve(self, websocket: WebSocket) -> None:
        """The whole life of one websocket, from the handshake to its close."""
        self.admitted += 1
        try:
            offered = websocket.scope.get("subprotocols") or []
            await websocket.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)
            try:
                socket = await self._open(websocket)
            except Exception as exc:
                refusal = exc if isinstance(exc, Refused) else self._unexpected(exc)
                self.metrics.refused.labels(refusal.code).inc()
                log.info("live_refused", code=refusal.code, close_code=refusal.close_code, reason=refusal.message)
                with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError, TimeoutError):
                    async with asyncio.timeout(CLOSE_GRACE_SECONDS):
                        await websocket.send_text(schemas.error(refusal.code, refusal.message))
                        await websocket.close(refusal.close_code, _reason(refusal.message))
                return
            await self._run(socket)
        except WebSocketDisconnect:
            pass  # the client left during the handshake
        finally:
            self.admitted -= 1

    @staticmethod
    def _unexpected(exc: Exception) -> Refused:
        if isinstance(exc, WebSocketDisconnect):
            raise exc
        store = store_unavailable(exc)
        if store is not None:
            log.warning("live_store_unavailable", store=store, error=f"{type(exc).__name__}: {exc}")
            return Refused(CLOSE_UNAVAILABLE, "service_unavailable", f"{store} is unavailable; retry shortly")
        log.exception("live_open_failed", error=f"{type(exc).__name__}: {exc}")
        return Refused(CLOSE_UNAVAILABLE, "internal_error", "the socket could not be opened; retry shortly")

    async def _open(self, websocket: WebSocket) -> LiveSocket:
        settings = self.settings
        if self.admitted > settings.live_max_sockets:
            raise Refused(CLOSE_TRY_LATER, "server_full", "this server has no room for more live sockets; retry later")
        if settings.https_only and websocket.scope.get("scheme") == "ws":
            raise Refused(CLOSE_POLICY, "https_required", "this server accepts only wss:// connections")
        token = self._token(websocket)
        principal = await self._authenticate(token) if token else None
        await self._rate_limit(websocket, principal)
        symbols, vs = await self._query(websocket, principal)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(READY_WAIT_SECONDS):
                await self.ready.wait()
        next_beat = asyncio.get_running_loop().time() + settings.live_heartbeat_seconds
        socket = LiveSocket(websocket, vs, principal, settings.live_queue_frames, next_beat)
        socket.reply(
            schemas.welcome(
                symbols, vs, authenticated=principal is not None, heartbeat_seconds=settings.live_heartbeat_seconds
            )
        )
        self._register(socket)
        self._set_symbols(socket, symbols)
        return socket

    def _token(self, websocket: WebSocket) -> str | None:
        """The access token, from the Authorization header, the ``bearer`` subprotocol, or the dashboard's
        cookie (that one only from a page of our own origin: a cookie rides along with any site's request)."""
        header = websocket.headers.get("authorization")
        if header:
            try:
                return bearer_token(header)
            except AppError as exc:
                raise Refused(CLOSE_UNAUTHORIZED, "unauthorized", exc.message) from None
        offered: list[str] = list(websocket.scope.get("subprotocols") or [])
        if SUBPROTOCOL in offered:
            following = offered[offered.index(SUBPROTOCOL) + 1 :]
            if not following or not following[0]:
                raise Refused(
                    CLOSE_UNAUTHORIZED, "unauthorized", "offer the subprotocols 'bearer' and then the access token"
                )
            return following[0]
        cookie = websocket.cookies.get(COOKIE_NAME)
        if cookie:
            if not self._same_origin(websocket):
                raise Refused(
                    CLOSE_FORBIDDEN, "forbidden", "cookie sign-in is accepted only from this site's own pages (Origin)"
                )
            return cookie
        return None

    def _same_origin(self, websocket: WebSocket) -> bool:
        origin = websocket.headers.get("origin")
        if not origin:
            return False
        secure = websocket.scope.get("scheme") == "wss"
        own = [self.settings.public_url]
        host = websocket.headers.get("host")
        if host:
            own.append(f"{'https' if secure else 'http'}://{host}")
        wanted = _origin_key(origin)
        return wanted is not None and any(_origin_key(candidate) == wanted for candidate in own)

    async def _authenticate(self, token: str) -> Principal:
        try:
            return await self.authenticator.authenticate(token)
        except AppError as exc:
            raise Refused(CLOSE_UNAUTHORIZED, "unauthorized", exc.message) from None
        except (RedisError, OSError) as exc:
            log.warning("live_auth_unavailable", error=f"{type(exc).__name__}: {exc}")
            raise Refused(CLOSE_UNAVAILABLE, "service_unavailable", "the token cannot be checked now; retry") from None

    async def _rate_limit(self, websocket: WebSocket, principal: Principal | None) -> None:
        """A connect counts as one request against the caller's rate limit, as on the HTTP API."""
        settings = self.settings
        if principal is not None and principal.user_id:
            key, limit, what = f"user:{principal.user_id}", settings.rate_limit_user, "per account"
        else:
            address = websocket.client.host if websocket.client else "unknown"
            key, limit, what = f"ip:{address}", settings.rate_limit_anonymous, "per address without a token"
        try:
            await self.limiter.enforce(
                key, limit=limit, window_seconds=settings.rate_limit_window_seconds, what=what, fail_open=True
            )
        except RateLimited as exc:
            raise Refused(CLOSE_TRY_LATER, "rate_limited", exc.message) from None

    async def _query(self, websocket: WebSocket, principal: Principal | None) -> tuple[list[str], str]:
        """``symbols`` and ``vs`` from the query string. Without ``symbols`` a signed-in user gets the watchlist
        (and, without ``vs``, the preferred currency); an anonymous socket must name its symbols."""
        params = websocket.query_params
        raw_symbols = params.get("symbols", "").strip()
        raw_vs = params.get("vs", "").strip()
        symbols: list[str] = []
        preferred_vs: str | None = None
        if raw_symbols:
            symbols = self._parse_symbols(raw_symbols.split(","))
        elif principal is None:
            raise Refused(
                CLOSE_POLICY, "validation_error", "symbols is required without a token, e.g. ?symbols=BTC,ETH&vs=USD"
            )
        elif principal.user_id:
            symbols, preferred_vs = await self._profile(principal.user_id)
        vs = raw_vs.upper() if raw_vs else self._default_vs(preferred_vs)
        if not SYMBOL_RE.match(vs):
            raise Refused(CLOSE_POLICY, "validation_error", "vs must be one currency code (letters and digits)")
        if vs not in self.settings.vs_currencies:
            known = ", ".join(self.settings.vs_currencies)
            raise Refused(CLOSE_POLICY, "unknown_currency", f"unknown currency: {vs} (prices are published in {known})")
        if raw_symbols:
            unknown = [s for s in symbols if s not in await self.tracked()]
            if unknown:
                raise Refused(CLOSE_POLICY, "unknown_symbol", f"unknown coin: {', '.join(unknown[:5])} (not tracked)")
        return symbols, vs

    def _default_vs(self, preferred: str | None) -> str:
        published = self.settings.vs_currencies
        if preferred in published:
            return str(preferred)
        return "USD" if "USD" in published else published[0]

    def _parse_symbols(self, raw: Iterable[object]) -> list[str]:
        symbols: list[str] = []
        for item in raw:
            symbol = item.strip().upper() if isinstance(item, str) else ""
            if not SYMBOL_RE.match(symbol):
                raise Refused(
                    CLOSE_POLICY, "validation_error", "symbols: ticker symbols (letters and digits), e.g. BTC,ETH"
                )
            if symbol not in symbols:
                symbols.append(symbol)
        if len(symbols) > self.settings.live_max_symbols:
            raise Refused(
                CLOSE_POLICY, "too_many_symbols", f"at most {self.settings.live_max_symbols} symbols per socket"
            )
        return symbols

    async def _profile(self, user_id: str) -> tuple[list[str], str | None]:
        try:
            user = await self.auth.me(user_id)
        except AppError as exc:
            raise Refused(CLOSE_UNAUTHORIZED, "unauthorized", exc.message) from None
        except Exception as exc:
            if store_unavailable(exc) is None:
                raise
            log.warning("live_profile_unavailable", error=f"{type(exc).__name__}: {exc}")
            return [], None
        tracked = await self.tracked()
        watchlist = [s for s in user.watchlist if s in tracked][: self.settings.live_max_symbols]
        return watchlist, user.vs_currency

    async def tracked(self) -> frozenset[str]:
        """The tracked coins (pricing's table), re-read at most every ``coins_refresh_seconds``; the
        configured coins while the table is empty or unreadable."""
        now = time.monotonic()
        fresh = self._tracked_at is not None and now - self._tracked_at < self.settings.coins_refresh_seconds
        if fresh:
            return self._tracked
        async with self._tracked_lock:
            if (
                self._tracked_at is not None
                and time.monotonic() - self._tracked_at < self.settings.coins_refresh_seconds
            ):
                return self._tracked
            try:
                async with self.sessions() as session:
                    coins = await active_coins(session)
            except Exception as exc:
                if store_unavailable(exc) is None:
                    raise
                log.warning("live_coins_unavailable", error=f"{type(exc).__name__}: {exc}")
                coins = list(self._tracked)
            self._tracked = frozenset(coins or self.settings.coins)
            self._tracked_at = time.monotonic()
            return self._tracked

    def _register(self, socket: LiveSocket) -> None:
        self.sockets.add(socket)
        if socket.user_id:
            self.by_user.setdefault(socket.user_id, set()).add(socket)
        self.metrics.sockets.set(len(self.sockets))

    def _unregister(self, socket: LiveSocket) -> None:
        self._set_symbols(socket, [])
        if socket.user_id:
            users = self.by_user.get(socket.user_id)
            if users is not None:
                users.discard(socket)
                if not users:
                    del self.by_user[socket.user_id]
        self.sockets.discard(socket)
        self.metrics.sockets.set(len(self.sockets))

    def _set_symbols(self, socket: LiveSocket, symbols: list[str]) -> None:
        for symbol in set(socket.symbols) - set(symbols):
            pair = (symbol, socket.vs)
            subscribers = self.by_pair.get(pair)
            if subscribers is not None:
                subscribers.discard(socket)
                if not subscribers:
                    del self.by_pair[pair]
            socket.prices.pop(pair, None)
        for symbol in symbols:
            self.by_pair.setdefault((symbol, socket.vs), set()).add(socket)
        socket.symbols = list(symbols)

    async def _run(self, socket: LiveSocket) -> None:
        """The writer and the reader run as tasks of their own: a task started here resumes without passing
        through every frame of the ASGI stack above, which is most of the cost of a frame sent."""
        socket.writer = writer = asyncio.create_task(self._write(socket))
        reader = asyncio.create_task(self._read(socket))
        try:
            await asyncio.wait((writer, reader), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (writer, reader):
                task.cancel()
            for task in (writer, reader):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            self._unregister(socket)
        if socket.closing is not None and not socket.gone:
            code, reason = socket.closing
            self.metrics.closed.labels(str(code)).inc()
            log.info("live_closed", code=code, reason=reason, user_id=socket.user_id)
            with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError, TimeoutError):
                async with asyncio.timeout(CLOSE_GRACE_SECONDS):
                    await socket.websocket.close(code, _reason(reason))

    async def _write(self, socket: LiveSocket) -> None:
        websocket = socket.websocket
        loop = asyncio.get_running_loop()
        while True:
            if not socket.pending() and socket.closing is None and not socket.gone:
                socket.wake.clear()
                await socket.wake.wait()
            if socket.gone or socket.closing is not None:
                return
            if socket.alerts and await self._revoked(socket):
                return
            frames = socket.take()
            # The hub's watchdog disconnects the client if this drain (at most live_max_symbols prices and
            # live_queue_frames alerts and replies) takes longer than live_send_timeout_seconds.
            socket.sending_since = loop.time()
            try:
                for frame in frames:
                    await websocket.send_text(frame)
            except (WebSocketDisconnect, RuntimeError, OSError):
                socket.gone = True
                return
            finally:
                socket.sending_since = None

    async def _revoked(self, socket: LiveSocket) -> bool:
        """Closes a signed-in socket whose token has expired or been revoked since it connected."""
        principal = socket.principal
        if principal is None:
            return False
        if _expired(principal, time.time()):
            socket.close(CLOSE_UNAUTHORIZED, EXPIRED_REASON)
            return True
        try:
            denied = await self.authenticator.denylist.is_denied(principal)
        except (RedisError, OSError) as exc:
            # Its signature and expiry were checked; only revocation can't be, until Redis is back.
            log.warning("live_revocation_unchecked", error=f"{type(exc).__name__}: {exc}")
            return False
        if denied:
            socket.close(CLOSE_UNAUTHORIZED, "access token revoked (signed out)")
        return denied

    async def _read(self, socket: LiveSocket) -> None:
        websocket = socket.websocket
        limit = self.settings.live_max_message_bytes
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                text = message.get("text")
                if text is None:
                    socket.reply(schemas.error("bad_message", 'send JSON text frames, e.g. {"action":"ping"}'))
                elif len(text) > limit or len(text.encode()) > limit:
                    socket.reply(schemas.error("bad_message", f"messages are limited to {limit} bytes"))
                else:
                    try:
                        await self._on_message(socket, text)
                    except Exception as exc:
                        refusal = self._unexpected(exc)
                        socket.reply(schemas.error(refusal.code, refusal.message))
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass
        socket.gone = True
        socket.wake.set()

    async def _on_message(self, socket: LiveSocket, text: str) -> None:
        try:
            message = json.loads(text)
        except ValueError:
            socket.reply(schemas.error("bad_message", "not JSON"))
            return
        if not isinstance(message, dict):
            socket.reply(schemas.error("bad_message", 'send a JSON object, e.g. {"action":"ping"}'))
            return
        action = message.get("action")
        try:
            if action == "ping":
                socket.reply(schemas.pong())
            elif action in ("subscribe", "unsubscribe"):
                await self._change_symbols(socket, action, message.get("symbols"))
            elif action == "auth":
                await self._reauthenticate(socket, message.get("token"))
            else:
                socket.reply(schemas.error("bad_message", "unknown action: use subscribe, unsubscribe, ping or auth"))
        except Refused as refusal:
            socket.reply(schemas.error(refusal.code, refusal.message))

    async def _change_symbols(self, socket: LiveSocket, action: str, raw: object) -> None:
        if not isinstance(raw, list) or not raw:
            raise Refused(CLOSE_POLICY, "bad_message", f'{action} needs "symbols": a non-empty list, e.g. ["BTC"]')
        if len(raw) > self.settings.live_max_symbols:
            raise Refused(
                CLOSE_POLICY, "too_many_symbols", f"at most {self.settings.live_max_symbols} symbols per socket"
            )
        named = self._parse_symbols(raw)
        if action == "subscribe":
            unknown = [s for s in named if s not in await self.tracked()]
            if unknown:
                raise Refused(CLOSE_POLICY, "unknown_symbol", f"unknown coin: {', '.join(unknown[:5])} (not tracked)")
            wanted = socket.symbols + [s for s in named if s not in socket.symbols]
            if len(wanted) > self.settings.live_max_symbols:
                raise Refused(
                    CLOSE_POLICY, "too_many_symbols", f"at most {self.settings.live_max_symbols} symbols per socket"
                )
        else:
            wanted = [s for s in socket.symbols if s not in named]
        if socket.gone or socket.closing is not None:
            return
        self._set_symbols(socket, wanted)
        socket.reply(schemas.subscribed(socket.symbols))

    async def _reauthenticate(self, socket: LiveSocket, token: object) -> None:
        """A fresh access token on an open socket (a dashboard refreshes before the old one expires)."""
        if not isinstance(token, str) or not token:
            raise Refused(CLOSE_POLICY, "bad_message", 'auth needs "token": an access token')
        try:
            principal = await self.authenticator.authenticate(token)
        except AppError as exc:
            raise Refused(CLOSE_UNAUTHORIZED, "unauthorized", exc.message) from None
        except (RedisError, OSError):
            raise Refused(CLOSE_UNAVAILABLE, "service_unavailable", "the token cannot be checked now; retry") from None
        if socket.principal is not None and socket.principal.user_id != principal.user_id:
            raise Refused(CLOSE_FORBIDDEN, "forbidden", "this socket belongs to another user; open a new one")
        if socket.gone or socket.closing is not None:
            return
        if socket.principal is None and principal.user_id:
            self.by_user.setdefault(principal.user_id, set()).add(socket)
        socket.principal = principal
        expires = datetime.fromtimestamp(principal.expires_at, UTC) if principal.expires_at else None
        socket.reply(schemas.authenticated(expires))


def _expired(principal: Principal, now: float) -> bool:
    return principal.expires_at is not None and now >= principal.expires_at


def _origin_key(url: str) -> tuple[str, str, int] | None:
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        return None
    return scheme, parts.hostname.lower(), port or (443 if scheme == "https" else 80)
