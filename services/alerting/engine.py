"""The alert evaluation engine: which rules a new consolidated price fires, in O(log n + fired).

Pure and in memory (no I/O), so the consumer that feeds it and the delivery that follows stay separate and
the semantics are testable on their own:

- **Crossing.** ``above`` fires when the previous fresh price was below the threshold and the new one is at
  or above it (``below`` mirrors it); a price that stays beyond the threshold fires nothing more. Thresholds
  are kept sorted per coin and currency, so an update looks only at the thresholds between the previous and
  the new price (a range search), never at every rule.
- **Re-arming.** A rule that fired is disarmed until the price crosses back past the threshold by the
  hysteresis band (``band``, a fraction of the threshold), and it cannot fire again within its cooldown.
  Disarmed rules sit in a second sorted index, by the level that re-arms them, so re-arming is a range
  search too.
- **Percent change** (``pct_change_up``/``pct_change_down``) over ``window_minutes``: the change from the
  price ``window`` ago to now, with the same crossing rule applied to the change; rules are grouped by
  window, so each update computes one change per distinct window.
- **Spread** (``spread_above``): the gap between the highest and lowest used source, as a percentage,
  crossing above the threshold.
- **Stale prices never fire.** They don't move the reference either: the next fresh price is compared with
  the last fresh one, so a crossing that happened while the price was stale still fires once it is fresh.
- **One-shot** rules are removed once fired; paused and expired rules never fire.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal

from sortedcontainers import SortedList

CONDITIONS = ("above", "below", "pct_change_up", "pct_change_down", "spread_above")
# Re-arm once the price is back past the threshold by this fraction of it (0.1%).
DEFAULT_BAND = Decimal("0.001")
HUNDRED = Decimal(100)


@dataclass(slots=True)
class Rule:
    id: str
    symbol: str
    vs: str
    condition: str
    threshold: Decimal
    cooldown_seconds: int = 300
    one_shot: bool = False
    window_minutes: int | None = None
    expires_at: datetime | None = None
    paused: bool = False
    last_fired_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Trigger:
    rule_id: str
    symbol: str
    vs: str
    condition: str
    threshold: Decimal
    # The measured value that crossed: the price, the percent change, or the spread.
    value: Decimal
    previous: Decimal
    price: Decimal
    at: datetime
    # When the book last moved before this update (its previous fresh price): with the alert, it names the
    # crossing, so the same crossing seen again (a redelivery, a new leader) is recognised as the same event.
    previous_at: datetime | None = None


class _Sorted:
    """(level, rule id) pairs kept in order (sortedcontainers' SortedList: O(log n) adds and removes as
    rules fire and re-arm, range queries by level)."""

    def __init__(self, items: Iterable[tuple[Decimal, str]] = ()) -> None:
        self.items: SortedList = SortedList(items)

    def add(self, level: Decimal, rule_id: str) -> None:
        self.items.add((level, rule_id))

    def discard(self, level: Decimal, rule_id: str) -> None:
        self.items.discard((level, rule_id))

    def between(self, low: Decimal, high: Decimal, *, low_open: bool, high_open: bool) -> list[str]:
        """Rule ids whose level lies in the interval from ``low`` to ``high`` (ends open or closed)."""
        if low > high:
            return []
        # Rule ids sort between "" and "\uffff", so these bounds take in (or leave out) every id at a level.
        lower = (low, "\uffff") if low_open else (low, "")
        upper = (high, "") if high_open else (high, "\uffff")
        return [rule_id for _level, rule_id in self.items.irange(lower, upper)]

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class _Book:
    """Every rule of one coin in one currency, by condition and state."""

    armed: dict[str, _Sorted] = field(default_factory=dict)  # condition (pct: "pct_change_up:60") -> by threshold
    disarmed: dict[str, _Sorted] = field(default_factory=dict)  # same keys -> by re-arm level
    last_price: Decimal | None = None
    last_spread: Decimal | None = None
    # The time of the last fresh price evaluated: an older one arriving later (a reclaimed stream entry) is
    # skipped, never compared against a newer reference.
    last_at: datetime | None = None
    # Fresh prices seen within the longest window any pct rule of this book asks for.
    history: list[tuple[datetime, Decimal]] = field(default_factory=list)
    last_change: dict[int, Decimal] = field(default_factory=dict)  # window minutes -> last percent change
    windows: dict[int, int] = field(default_factory=dict)  # window minutes -> how many rules use it


def _terms(rule: Rule) -> tuple[object, ...]:
    return (rule.symbol, rule.vs, rule.condition, rule.threshold, rule.window_minutes)


def _slot(rule: Rule) -> str:
    if rule.condition.startswith("pct_change"):
        return f"{rule.condition}:{rule.window_minutes}"
    return rule.condition


class AlertEngine:
    def __init__(self, band: Decimal = DEFAULT_BAND) -> None:
        self.band = band
        self._previous_at: datetime | None = None
        self.rules: dict[str, Rule] = {}
        self.armed: dict[str, bool] = {}
        self.books: dict[tuple[str, str], _Book] = {}

    # -- rules ------------------------------------------------------------------------------------------

    def load(self, rules: Iterable[Rule]) -> None:
        """Replace every rule (at startup); each starts armed. One sort per index instead of an insertion per
        rule: a million rules load in seconds, not hours."""
        self.rules.clear()
        self.armed.clear()
        self.books.clear()
        pending: dict[tuple[str, str, str], list[tuple[Decimal, str]]] = {}
        for rule in rules:
            self._check(rule)
            self.rules[rule.id] = rule
            self.armed[rule.id] = True
            book = self.books.setdefault((rule.symbol, rule.vs), _Book())
            pending.setdefault((rule.symbol, rule.vs, _slot(rule)), []).append((rule.threshold, rule.id))
            if rule.window_minutes and rule.condition.startswith("pct_change"):
                book.windows[rule.window_minutes] = book.windows.get(rule.window_minutes, 0) + 1
        for (symbol, vs, slot), items in pending.items():
            self.books[(symbol, vs)].armed[slot] = _Sorted(items)

    @staticmethod
    def _check(rule: Rule) -> None:
        if rule.condition not in CONDITIONS:
            raise ValueError(f"unknown condition {rule.condition!r}")
        if rule.condition.startswith("pct_change") and not rule.window_minutes:
            raise ValueError("a percent-change rule needs window_minutes")

    def upsert(self, rule: Rule) -> None:
        """Add or replace a rule. A rule whose terms changed starts armed again (its old state described other
        terms); one whose terms are the same (a channel edited, a cooldown changed) keeps its state."""
        self._check(rule)
        current = self.rules.get(rule.id)
        if current is not None and _terms(current) == _terms(rule):
            for name in ("cooldown_seconds", "one_shot", "expires_at", "paused"):
                setattr(current, name, getattr(rule, name))
            if rule.last_fired_at is not None and (
                current.last_fired_at is None or rule.last_fired_at > current.last_fired_at
            ):
                current.last_fired_at = rule.last_fired_at
            return
        self.remove(rule.id)
        self.rules[rule.id] = rule
        self.armed[rule.id] = True
        book = self.books.setdefault((rule.symbol, rule.vs), _Book())
        book.armed.setdefault(_slot(rule), _Sorted()).add(rule.threshold, rule.id)
        if rule.window_minutes and rule.condition.startswith("pct_change"):
            book.windows[rule.window_minutes] = book.windows.get(rule.window_minutes, 0) + 1

    def remove(self, rule_id: str) -> None:
        rule = self.rules.pop(rule_id, None)
        if rule is None:
            return
        was_armed = self.armed.pop(rule_id, True)
        book = self.books.get((rule.symbol, rule.vs))
        if book is None:
            return
        slot = _slot(rule)
        if was_armed:
            book.armed.get(slot, _Sorted()).discard(rule.threshold, rule_id)
        else:
            book.disarmed.get(slot, _Sorted()).discard(self._rearm_level(rule), rule_id)
        if rule.window_minutes and rule.condition.startswith("pct_change"):
            left = book.windows.get(rule.window_minutes, 1) - 1
            if left:
                book.windows[rule.window_minutes] = left
            else:
                book.windows.pop(rule.window_minutes, None)
                book.last_change.pop(rule.window_minutes, None)

    def _rearm_level(self, rule: Rule) -> Decimal:
        # Back past the threshold by the band: below it for rules that fire upwards, above it otherwise.
        if rule.condition == "below" or rule.condition == "pct_change_down":
            return rule.threshold + abs(rule.threshold) * self.band
        return rule.threshold - abs(rule.threshold) * self.band

    def windows_needed(self) -> dict[tuple[str, str], int]:
        """Per coin and currency, the longest percent-change window its rules ask for, in minutes."""
        return {pair: max(book.windows) for pair, book in self.books.items() if book.windows}

    def seed_history(self, symbol: str, vs: str, samples: Iterable[tuple[datetime, Decimal]]) -> None:
        """Earlier prices (from stored candles, at start), so percent-change rules need not wait a whole
        window of live prices before they can fire again."""
        book = self.books.get((symbol, vs))
        if book is None or not book.windows:
            return
        by_time = {at: price for at, price in [*samples, *book.history] if price.is_finite() and price > 0}
        book.history = sorted(by_time.items())

    # -- evaluation -------------------------------------------------------------------------------------

    def on_price(
        self,
        symbol: str,
        vs: str,
        price: Decimal,
        status: str,
        at: datetime,
        *,
        spread_pct: Decimal | None = None,
    ) -> list[Trigger]:
        """The rules this consolidated price fires (each disarmed, or removed if one-shot, as it fires)."""
        book = self.books.get((symbol, vs))
        if book is None or status != "fresh" or not price.is_finite() or price <= 0:
            return []
        if book.last_at is not None and at <= book.last_at:
            return []
        self._previous_at = book.last_at
        book.last_at = at
        fired: list[Trigger] = []
        previous = book.last_price
        if previous is not None:
            fired += self._cross(book, "above", previous, price, at, price, up=True)
            fired += self._cross(book, "below", previous, price, at, price, up=False)
        book.last_price = price
        fired += self._percent_changes(book, price, at)
        if spread_pct is not None and spread_pct.is_finite():
            if book.last_spread is not None:
                fired += self._cross(book, "spread_above", book.last_spread, spread_pct, at, price, up=True)
            book.last_spread = spread_pct
        return fired

    def _percent_changes(self, book: _Book, price: Decimal, at: datetime) -> list[Trigger]:
        if not book.windows:
            book.history.clear()
            return []
        longest = timedelta(minutes=max(book.windows))
        book.history.append((at, price))
        # Keep one sample at or before the start of the longest window: that window's reference price.
        keep_from = bisect.bisect_right(book.history, at - longest, key=lambda sample: sample[0]) - 1
        if keep_from > 0:
            del book.history[:keep_from]
        fired: list[Trigger] = []
        for window in sorted(book.windows):
            reference = self._price_at(book, at - timedelta(minutes=window))
            if reference is None:
                continue
            change = (price - reference) / reference * HUNDRED
            before = book.last_change.get(window)
            book.last_change[window] = change
            if before is None:
                continue
            fired += self._cross(book, f"pct_change_up:{window}", before, change, at, price, up=True)
            fired += self._cross(book, f"pct_change_down:{window}", before, change, at, price, up=False)
        return fired

    @staticmethod
    def _price_at(book: _Book, moment: datetime) -> Decimal | None:
        """The last price at or before ``moment``; None while history does not reach back that far."""
        index = bisect.bisect_right(book.history, moment, key=lambda sample: sample[0])
        return book.history[index - 1][1] if index else None

    def _cross(
        self, book: _Book, slot: str, before: Decimal, now: Decimal, at: datetime, price: Decimal, *, up: bool
    ) -> list[Trigger]:
        self._rearm(book, slot, before, now, up=up)
        armed = book.armed.get(slot)
        if not armed or before == now:
            return []
        # Up: thresholds in (before, now]; down (thresholds are negative changes or lower prices): [now, before).
        if up:
            if now < before:
                return []
            candidates = armed.between(before, now, low_open=True, high_open=False)
        else:
            if now > before:
                return []
            candidates = armed.between(now, before, low_open=False, high_open=True)
        fired = []
        for rule_id in candidates:
            rule = self.rules[rule_id]
            if rule.paused or (rule.expires_at is not None and at >= rule.expires_at):
                continue
            if rule.last_fired_at is not None and at - rule.last_fired_at < timedelta(seconds=rule.cooldown_seconds):
                continue  # still armed: the next crossing after the cooldown fires
            fired.append(
                Trigger(
                    rule.id, rule.symbol, rule.vs, rule.condition, rule.threshold, now, before, price, at,
                    previous_at=self._previous_at,
                )
            )  # fmt: skip
            rule.last_fired_at = at
            if rule.one_shot:
                self.remove(rule.id)
            else:
                armed.discard(rule.threshold, rule.id)
                self.armed[rule.id] = False
                book.disarmed.setdefault(slot, _Sorted()).add(self._rearm_level(rule), rule.id)
        return fired

    def _rearm(self, book: _Book, slot: str, before: Decimal, now: Decimal, *, up: bool) -> None:
        """Rules whose re-arm level the value has gone back past (downwards for rules that fire upwards)."""
        disarmed = book.disarmed.get(slot)
        if not disarmed:
            return
        # A rule that fires upwards re-arms once the value is at or below its re-arm level.
        back = (
            disarmed.between(now, Decimal("Infinity"), low_open=False, high_open=False)
            if up
            else (disarmed.between(Decimal("-Infinity"), now, low_open=False, high_open=False))
        )
        for rule_id in back:
            rule = self.rules[rule_id]
            disarmed.discard(self._rearm_level(rule), rule_id)
            self.armed[rule_id] = True
            book.armed.setdefault(slot, _Sorted()).add(rule.threshold, rule_id)

    # -- introspection ----------------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        armed = sum(1 for is_armed in self.armed.values() if is_armed)
        return {"rules": len(self.rules), "armed": armed, "disarmed": len(self.rules) - armed}
