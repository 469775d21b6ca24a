"""The gateway's read memo: an answer a service marked as the same for every caller and changed only by price
events (``MemoHint`` in shared/responses.py: price reads, live conversions) is kept for the same request, so
a dashboard or a script asking it again costs the gateway a dictionary lookup instead of a round trip through
the service. The guard (authentication, rate limits) runs before it as for any forwarded request.

Trust is the pricing memo's: copies are only ever what a service answered over the signed internal hop; the
prices stream is unsigned, so its entries only ever drop copies, and a forged entry can never put a made-up
price in an answer (at worst, one naming a genuine older event while a pricing replica lags lets that
replica's older answer stand for its ttl). Copies are used only while the live hub's reader hears from Redis
(it reports in at least every second); when it stops hearing, or on an outage or an unreadable entry, every
copy is dropped, and none is kept until the reader hears again.

Freshness: a copy goes at the first price event for a pair it shows (for a conversion: any price event),
when the first fresh price it shows would turn stale, and at the hint's ``ttl`` whatever happens. A copy is
stored only if no event overtook the request: an answer naming another event for a pair than the last one
the gateway heard (a lagging replica) or, for a conversion, a request forwarded before any later event, is
not kept.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter

from shared.responses import MemoHint

Pair = tuple[str, str]
# The clock when the request was forwarded, and whether the last price event was SETTLE_SECONDS behind it.
Ticket = tuple[int, bool]

# The hub's XREAD blocks for at most a second, then reports in: three seconds without it is an outage.
LIVE_SECONDS = 3.0
MAX_ENTRIES = 10_000
# An answer tied to every pair (a conversion) is kept only when asked this long after the last price event:
# the service applies events through its own consumer and re-reads its table every 50 ms, so an answer given
# sooner may not reflect that event yet, and no event id in it could tell.
SETTLE_SECONDS = 0.25
# No copy is larger than this, and all of them together stay under MAX_TOTAL_BYTES (the oldest go first).
MAX_BODY_BYTES = 64 * 1024
MAX_TOTAL_BYTES = 32 * 1024 * 1024
# Event ids remembered per pair to recognise one heard again.
RECENT_EVENTS = 8
# The last event heard per pair; a stream that somehow names more pairs than this starts over (all copies go).
MAX_PAIRS_TRACKED = 100_000


@dataclass(slots=True)
class Copy:
    expires_at: float  # time.monotonic()
    status: int
    body: bytes
    headers: list[tuple[bytes, bytes]]
    template: str | None
    pairs: tuple[Pair, ...]
    any_pair: bool


class ReadMemo:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.copies: dict[str, Copy] = {}
        self._bytes = 0
        self._by_pair: dict[Pair, set[str]] = {}
        self._any_pair: set[str] = set()
        self._last_event: dict[Pair, str | None] = {}
        # The last few event ids heard per pair: the relay publishes each id once, so an id heard again is a
        # replay (or a forgery naming a genuine older event) and must not become "the last event" the answers
        # are checked against.
        self._recent: dict[Pair, deque[str]] = {}
        # Bumped by every event and every drop of everything; a request remembers it when it is forwarded.
        self._clock = 0
        self._any_event_at = 0
        self._last_event_monotonic = float("-inf")
        self._cleared_at = 0
        self._heard_at: float | None = None
        self._results = Counter(
            "gateway_read_memo_total",
            "Answers the gateway served from its read memo (hit), kept (stored) or would not keep (refused)",
            ["result"],
            registry=registry,
        )

    # --- the hub's side: what the prices stream says ------------------------------------------------------

    def heard(self) -> None:
        """The hub's reader completed a read (with entries or not)."""
        self._heard_at = time.monotonic()

    def live(self) -> bool:
        heard = self._heard_at
        return heard is not None and time.monotonic() - heard < LIVE_SECONDS

    def price_event(self, pair: Pair, event_id: str | None) -> None:
        self._clock += 1
        self._any_event_at = self._clock
        self._last_event_monotonic = time.monotonic()
        if len(self._last_event) >= MAX_PAIRS_TRACKED and pair not in self._last_event:
            self._last_event.clear()
            self._recent.clear()
            self.clear()
        recent = self._recent.setdefault(pair, deque(maxlen=RECENT_EVENTS))
        if event_id is None or event_id not in recent:
            self._last_event[pair] = event_id
            if event_id is not None:
                recent.append(event_id)
        for key in list(self._by_pair.get(pair, ())):
            self._remove(key)
        for key in list(self._any_pair):
            self._remove(key)

    def clear(self, *, outage: bool = False) -> None:
        """Something the stream said could not be read, or (``outage``) the reader lost Redis: no copy is
        vouched for, and after an outage none is kept or used until the reader hears from Redis again. The
        last event heard per pair stays: an answer older than it is still refused."""
        self._clock += 1
        self._cleared_at = self._clock
        if outage:
            self._heard_at = None
        self.copies.clear()
        self._bytes = 0
        self._by_pair.clear()
        self._any_pair.clear()

    # --- the forwarding side ------------------------------------------------------------------------------

    def ticket(self) -> Ticket:
        """Taken when a request is forwarded; ``store`` with it keeps the answer only if nothing overtook it."""
        return self._clock, time.monotonic() - self._last_event_monotonic >= SETTLE_SECONDS

    def lookup(self, key: str) -> Copy | None:
        copy = self.copies.get(key)
        if copy is None:
            return None
        if not self.live() or time.monotonic() >= copy.expires_at:
            self._remove(key)
            return None
        self._results.labels("hit").inc()
        return copy

    def store(
        self,
        key: str,
        ticket: Ticket,
        hint: MemoHint,
        *,
        status: int,
        body: bytes,
        headers: list[tuple[bytes, bytes]],
        template: str | None,
    ) -> bool:
        if (
            not self.live()
            or ticket[0] < self._cleared_at
            or len(body) > MAX_BODY_BYTES
            or not self._current(hint, ticket)
        ):
            self._results.labels("refused").inc()
            return False
        self._remove(key)
        while self.copies and (len(self.copies) >= MAX_ENTRIES or self._bytes + len(body) > MAX_TOTAL_BYTES):
            self._remove(next(iter(self.copies)))
        copy = Copy(
            expires_at=time.monotonic() + hint.ttl,
            status=status,
            body=body,
            headers=headers,
            template=template,
            pairs=tuple(hint.pairs),
            any_pair=hint.any_pair,
        )
        self.copies[key] = copy
        self._bytes += len(body)
        if copy.any_pair:
            self._any_pair.add(key)
        for pair in copy.pairs:
            self._by_pair.setdefault(pair, set()).add(key)
        self._results.labels("stored").inc()
        return True

    def _current(self, hint: MemoHint, ticket: Ticket) -> bool:
        if hint.any_pair:
            clock, settled = ticket
            return settled and self._any_event_at <= clock
        for pair, event in hint.pairs.items():
            heard = self._last_event.get(pair)
            if heard is not None and heard != event:
                return False
            if heard is None and pair in self._last_event and event is not None:
                return False  # the gateway heard an event without an id for it: the answer is not that one
        return True

    def _remove(self, key: str) -> None:
        copy = self.copies.pop(key, None)
        if copy is None:
            return
        self._bytes -= len(copy.body)
        if copy.any_pair:
            self._any_pair.discard(key)
        for pair in copy.pairs:
            keys = self._by_pair.get(pair)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_pair[pair]
