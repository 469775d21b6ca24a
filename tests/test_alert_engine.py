"""The alert engine's semantics: crossing, hysteresis, cooldown, one-shot, expiry, pause, percent-change
windows, spread, stale prices, and that an update looks only at the thresholds it crosses."""

from __future__ import annotations

import weakref
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from services.alerting.engine import AlertEngine, Rule

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
D = Decimal


# Keyed weakly by the engine itself: an id() can be reused by a later test's engine once this one is freed,
# which handed that engine a stale clock and made the window tests depend on garbage collection.
_CLOCKS: weakref.WeakKeyDictionary[AlertEngine, datetime] = weakref.WeakKeyDictionary()


def feed(engine: AlertEngine, prices: list[str], *, start: datetime | None = None,
         step: timedelta = timedelta(seconds=1), status: str = "fresh") -> list[list[str]]:  # fmt: skip
    """The ids fired by each price in turn; times go on from the engine's previous feed unless ``start`` is
    given (the engine skips a price older than one it has evaluated)."""
    at = start if start is not None else _CLOCKS.get(engine, T0)
    out = []
    for price in prices:
        out.append([t.rule_id for t in engine.on_price("BTC", "USD", D(price), status, at)])
        at += step
    _CLOCKS[engine] = at
    return out


def rule(rule_id: str, condition: str, threshold: str, **kwargs: object) -> Rule:
    values: dict[str, object] = {"cooldown_seconds": 0, **kwargs}
    return Rule(rule_id, "BTC", "USD", condition, D(threshold), **values)  # type: ignore[arg-type]


def test_above_fires_on_the_crossing_not_on_every_price_beyond_it():
    engine = AlertEngine()
    engine.load([rule("a", "above", "100")])
    assert feed(engine, ["99", "99.5", "100", "101", "105"]) == [[], [], ["a"], [], []]


def test_the_first_price_is_only_a_reference():
    engine = AlertEngine()
    engine.load([rule("a", "above", "100")])
    # Already beyond when the rule is first evaluated: no crossing was seen, nothing fires.
    assert feed(engine, ["105", "106"]) == [[], []]


def test_below_mirrors_above():
    engine = AlertEngine()
    engine.load([rule("b", "below", "100")])
    # Back up to 101 is past the band (re-arms at or above 100.1): the next fall through 100 fires again.
    assert feed(engine, ["101", "100.5", "100", "99", "101", "99"]) == [[], [], ["b"], [], [], ["b"]]


def test_a_jump_over_several_thresholds_fires_each_once_in_one_update():
    engine = AlertEngine()
    engine.load([rule("a95", "above", "95"), rule("a100", "above", "100"), rule("a120", "above", "120")])
    fired = engine.on_price("BTC", "USD", D("90"), "fresh", T0)
    fired = engine.on_price("BTC", "USD", D("110"), "fresh", T0 + timedelta(seconds=1))
    assert sorted(t.rule_id for t in fired) == ["a100", "a95"]
    assert {t.previous for t in fired} == {D("90")} and {t.value for t in fired} == {D("110")}


def test_a_fired_rule_re_arms_only_after_crossing_back_past_the_band():
    engine = AlertEngine(band=D("0.01"))  # 1%: re-arms at or below 99
    engine.load([rule("a", "above", "100")])
    # Dips to 99.5 (inside the band) and back: no second alert; down to 99 re-arms, the next crossing fires.
    assert feed(engine, ["98", "100", "99.5", "100.5", "99", "100"]) == [[], ["a"], [], [], [], ["a"]]


def test_cooldown_holds_a_second_crossing_and_the_next_one_after_it_fires():
    engine = AlertEngine(band=D("0.001"))
    engine.load([Rule("a", "BTC", "USD", "above", D("100"), cooldown_seconds=60)])
    assert feed(engine, ["99", "101", "98", "101"], step=timedelta(seconds=10)) == [[], ["a"], [], []]
    # After the cooldown: down and up again fires.
    later = T0 + timedelta(seconds=120)
    assert feed(engine, ["98", "101"], start=later) == [[], ["a"]]


def test_one_shot_rules_fire_once_and_are_gone():
    engine = AlertEngine()
    engine.load([rule("a", "above", "100", one_shot=True)])
    assert feed(engine, ["99", "101", "98", "101"]) == [[], ["a"], [], []]
    assert "a" not in engine.rules


def test_paused_and_expired_rules_never_fire():
    engine = AlertEngine()
    engine.load([rule("p", "above", "100", paused=True), rule("e", "above", "100", expires_at=T0)])
    assert feed(engine, ["99", "101"]) == [[], []]


def test_a_stale_price_never_fires_and_the_next_fresh_one_sees_the_crossing():
    engine = AlertEngine()
    engine.load([rule("a", "above", "100")])
    assert feed(engine, ["99"]) == [[]]
    assert feed(engine, ["105"], status="stale") == [[]]
    # The crossing happened while stale; the first fresh price beyond the threshold fires it.
    assert feed(engine, ["104"]) == [["a"]]


def test_changes_to_a_rule_take_effect_and_removed_rules_stop():
    engine = AlertEngine()
    engine.load([rule("a", "above", "100")])
    feed(engine, ["90"])
    engine.upsert(rule("a", "above", "95"))
    assert feed(engine, ["96"]) == [["a"]]
    engine.remove("a")
    assert feed(engine, ["90", "99"]) == [[], []]
    assert engine.counts() == {"rules": 0, "armed": 0, "disarmed": 0}


def test_percent_change_over_a_window_crosses_its_threshold():
    engine = AlertEngine()
    engine.load(
        [
            rule("up5", "pct_change_up", "5", window_minutes=10),
            rule("down5", "pct_change_down", "-5", window_minutes=10),
        ]
    )
    minute = timedelta(minutes=1)
    # 100 for ten minutes, then climbing: +4% (no), +6% (fires up5 once), +7% (no).
    prices = ["100"] * 11 + ["104", "106", "107"]
    fired = feed(engine, prices, step=minute)
    assert fired[:11] == [[]] * 11
    assert fired[11:] == [[], ["up5"], []]
    # Then the fall: minute 22 is 99 against 106 ten minutes earlier (-6.6%: fires), minute 24 is 99 against
    # 103 (-3.9%: back past the band, re-arms), minute 25 is 93 against 100 (-7%: fires again).
    start = T0 + 14 * minute
    later = feed(engine, ["103", "100", "99"] + ["99"] * 8 + ["93"], start=start, step=minute)
    expected: list[list[str]] = [[] for _ in later]
    expected[22 - 14] = expected[25 - 14] = ["down5"]
    assert later == expected


def test_spread_above_crosses_on_the_spread_between_sources():
    engine = AlertEngine()
    engine.load([Rule("s", "BTC", "USD", "spread_above", D("0.5"), cooldown_seconds=0)])
    spreads = ["0.1", "0.3", "0.6", "0.8", "0.2", "0.7"]
    fired = [
        [
            t.rule_id
            for t in engine.on_price("BTC", "USD", D("100"), "fresh", T0 + timedelta(seconds=i), spread_pct=D(s))
        ]
        for i, s in enumerate(spreads)
    ]
    assert fired == [[], [], ["s"], [], [], ["s"]]


def test_an_update_looks_only_at_the_thresholds_between_the_two_prices():
    engine = AlertEngine()
    engine.load(rule(f"r{i}", "above", str(1000 + i)) for i in range(20_000))
    engine.on_price("BTC", "USD", D("1500.5"), "fresh", T0)
    book = engine.books[("BTC", "USD")]
    calls = 0
    real_between = book.armed["above"].between

    def counting(*args, **kwargs):
        nonlocal calls
        result = real_between(*args, **kwargs)
        calls += len(result)
        return result

    book.armed["above"].between = counting  # type: ignore[method-assign]
    fired = engine.on_price("BTC", "USD", D("1503.5"), "fresh", T0 + timedelta(seconds=1))
    # Thresholds 1501, 1502 and 1503 are crossed: those three are all the update touched.
    assert sorted(t.threshold for t in fired) == [D("1501"), D("1502"), D("1503")]
    assert calls == 3


def test_unknown_conditions_and_percent_rules_without_a_window_are_refused():
    engine = AlertEngine()
    with pytest.raises(ValueError, match="unknown condition"):
        engine.upsert(rule("x", "sideways", "1"))
    with pytest.raises(ValueError, match="window_minutes"):
        engine.upsert(rule("y", "pct_change_up", "1"))


def test_a_price_older_than_one_evaluated_is_skipped_not_compared():
    """A reclaimed stream entry can arrive after a newer one: P1 99, P3 102, then P2 101. The real path only
    went up, so the "below 101.5" rule must not fire on 102 -> 101."""
    engine = AlertEngine()
    engine.load([rule("down", "below", "101.5"), rule("up", "above", "100")])
    assert [t.rule_id for t in engine.on_price("BTC", "USD", D("99"), "fresh", T0)] == []
    assert [t.rule_id for t in engine.on_price("BTC", "USD", D("102"), "fresh", T0 + timedelta(seconds=2))] == ["up"]
    assert engine.on_price("BTC", "USD", D("101"), "fresh", T0 + timedelta(seconds=1)) == []
    assert engine.on_price("BTC", "USD", D("101"), "fresh", T0 + timedelta(seconds=2)) == []


def test_a_trigger_names_the_price_before_the_crossing():
    engine = AlertEngine()
    engine.load([rule("a", "above", "100")])
    engine.on_price("BTC", "USD", D("99"), "fresh", T0)
    engine.on_price("BTC", "USD", D("99.5"), "stale", T0 + timedelta(seconds=1))
    [fired] = engine.on_price("BTC", "USD", D("101"), "fresh", T0 + timedelta(seconds=2))
    assert fired.previous_at == T0 and fired.previous == D("99")


def test_an_edit_that_keeps_the_terms_keeps_the_rule_disarmed():
    """Editing a channel or the cooldown is not a new rule: inside the hysteresis band it stays disarmed."""
    engine = AlertEngine()
    engine.load([rule("a", "above", "100")])
    assert feed(engine, ["99", "100.05"]) == [[], ["a"]]
    later = T0 + timedelta(days=1)
    engine.upsert(rule("a", "above", "100", expires_at=later))
    assert feed(engine, ["99.95", "100.05"]) == [[], []], "a swing inside the band does not re-arm it"
    assert engine.rules["a"].expires_at == later
    engine.upsert(rule("a", "above", "100.01"))  # new terms: armed again
    assert feed(engine, ["99.9", "100.05"]) == [[], ["a"]]
