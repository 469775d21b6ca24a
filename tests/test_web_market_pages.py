"""The dashboard's coin, compare and convert pages in a real Chromium, against the whole platform on the
`sim` source (tests/browser.py): chart ranges and types on a coin page, the per-exchange table, a comparison of
three coins saved and opened again, and a conversion recomputed as the user types."""

from __future__ import annotations

import random
import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from urllib.parse import parse_qs, urlsplit

import pytest

expect = pytest.importorskip(
    "playwright.async_api", reason="browser tests need the playwright package (pip install -e '.[dev]')"
).expect

DASH = "\u2013"  # what the pages show for a value that isn't there
MINUS = "\u2212"
SIM_SOURCES = {"sim-alpha", "sim-beta", "sim-gamma"}
LEVELS = {"BTC": 65_000.0, "ETH": 3_400.0, "SOL": 150.0}
BACKFILL_HOURS = 72
# Hours before now of BTC's one unusual candle (a 9% jump), which the history chart marks.
JUMP_HOURS_AGO = 12


async def _backfill(db) -> None:
    """Three days of hourly exchange candles (with volume) behind the sim's live ones, as `coinlytics backfill`
    leaves them: enough history for returns, volatility, beta, correlation and anomalies."""
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    rows = []
    for coin, level in LEVELS.items():
        noise = random.Random(coin)
        price = level * 0.98
        for hours_ago in range(BACKFILL_HOURS, 0, -1):
            change = 0.09 if coin == "BTC" and hours_ago == JUMP_HOURS_AGO else noise.gauss(0, 0.003)
            before, price = price, price * (1 + change)
            high, low = max(before, price) * 1.001, min(before, price) * 0.999
            rows.append((coin, "USD", "1h", now - timedelta(hours=hours_ago),
                         *(Decimal(f"{v:.4f}") for v in (before, high, low, price)),
                         Decimal(f"{noise.uniform(100, 200):.2f}"), "binance"))  # fmt: skip
    await db.executemany(
        "INSERT INTO candles (base, vs, interval, t, open, high, low, close, volume, source) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        rows,
    )


def _requests(browser, path: str) -> list[dict[str, list[str]]]:
    """The query of every request the pages made to ``path``."""
    found = []
    for url in browser.requested:
        parts = urlsplit(url)
        if parts.path == path:
            found.append(parse_qs(parts.query))
    return found


async def _accessible(page) -> None:
    """axe-core's rules on the page as it is now (charts drawn, tables filled): nothing serious or critical."""
    from axe_playwright_python.async_playwright import Axe

    results = await Axe().run(page)
    serious = [(v["id"], v["help"], [n["target"] for n in v["nodes"]][:3])
               for v in results.response["violations"] if v["impact"] in ("serious", "critical")]  # fmt: skip
    assert not serious, serious


def _clean(browser) -> None:
    assert not browser.outside_requests(), browser.outside_requests()
    errors = [e for e in browser.console_errors if "favicon" not in e and "status of 4" not in e]
    assert not errors, errors


async def test_coin_page_switches_ranges_and_chart_types_and_lists_the_sim_sources(web_platform, browser, db):
    await _backfill(db)
    page = await browser.page()
    base = web_platform.gateway
    await page.goto(base + "/coins/btc?vs=USD")
    await expect(page.locator("main h1")).to_have_text("Bitcoin (BTC)")
    await page.locator("[data-price]").filter(has_text="USD").wait_for()
    chart = page.locator("[data-chart]")
    await page.locator("[data-chart][data-renders='1']").wait_for(timeout=30_000)
    one_day = page.get_by_role("button", name="1D")
    seven_days = page.get_by_role("button", name="7D")
    assert await one_day.get_attribute("aria-pressed") == "true"
    assert await seven_days.get_attribute("aria-pressed") == "false"
    assert await chart.get_attribute("data-range") == "1d"

    await seven_days.click()
    await page.locator("[data-chart][data-range='7d'][data-renders='2']").wait_for(timeout=30_000)
    assert await seven_days.get_attribute("aria-pressed") == "true"
    assert await one_day.get_attribute("aria-pressed") == "false"
    # The chart asked for seven days of history, and Plotly drew the figure it got.
    starts = [datetime.fromisoformat(q["start"][0]) for q in _requests(browser, "/api/v1/charts/history")]
    assert len(starts) == 2, starts
    span = datetime.now(UTC) - starts[-1]
    assert timedelta(days=6, hours=23) < span < timedelta(days=7, minutes=5), span
    assert datetime.now(UTC) - starts[0] < timedelta(days=1, minutes=5)
    traces = await chart.evaluate("node => node.data.map(trace => [trace.type || 'scatter', trace.name])")
    assert ["scatter", "Price"] in traces and ["bar", "Volume"] in traces, traces
    assert ["scatter", "Return anomalies"] in traces, "the 9% hour is marked"
    await expect(page.locator("[data-chart-state]")).to_contain_text("marked with triangles")
    assert "?vs=USD&range=7d" in page.url

    await page.get_by_role("button", name="All").click()
    await page.locator("[data-chart][data-range='all'][data-renders='3']").wait_for(timeout=30_000)
    assert _requests(browser, "/api/v1/charts/history")[-1]["interval"] == ["1d"]

    await page.get_by_role("button", name="Candlesticks").click()
    await page.locator("[data-chart][data-kind='candles'][data-renders='4']").wait_for(timeout=30_000)
    assert await page.get_by_role("button", name="Candlesticks").get_attribute("aria-pressed") == "true"
    assert await page.get_by_role("button", name="Line with volume").get_attribute("aria-pressed") == "false"
    assert _requests(browser, "/api/v1/charts/candles"), "the candlesticks come from the candles chart"
    traces = await chart.evaluate("node => node.data.map(trace => trace.type)")
    assert "candlestick" in traces, traces
    state = await page.locator("[data-chart-state]").inner_text()
    assert "candlesticks over all stored history" in state, state

    # Every sim venue, its status in words, and its spread to the consolidated price.
    rows = page.locator("[data-sources] tbody tr")
    await rows.nth(2).wait_for()
    sources = {await row.get_attribute("data-source") for row in await rows.all()}
    assert sources == SIM_SOURCES
    for row in await rows.all():
        cells = row.locator("td")
        assert await cells.nth(1).inner_text() != DASH
        status = (await cells.nth(2).locator(".badge").inner_text()).strip()
        assert status in {"used", "stale", "outlier"}
        assert re.fullmatch(rf"[+{MINUS}±]\d+\.\d{{3}}%", await cells.nth(3).inner_text())
    assert "sources used in the consolidated price" in await page.locator("[data-sources-state]").inner_text()

    await _accessible(page)
    # An unknown coin says so, with the API's message, instead of an empty page.
    await page.goto(base + "/coins/NOPE")
    state = page.locator("[data-coin-state][data-not-found]")
    await state.wait_for()
    assert "unknown coin: NOPE" in await state.inner_text()
    assert await page.locator("main h1").inner_text() == "No such coin"
    assert await page.locator("[data-coin-body]").is_hidden()
    await _accessible(page)
    _clean(browser)


async def test_compare_three_coins_then_save_the_comparison_and_open_it_again(web_platform, browser, db):
    await _backfill(db)
    base = web_platform.gateway
    await web_platform.register("compare@example.com")
    page = await browser.page()
    await browser.sign_in(page, base, "compare@example.com")
    await page.goto(base + "/compare")
    await expect(page.locator("[data-saved-state]")).to_contain_text("Nothing saved yet")
    # One coin is not a comparison: said next to the coin picker, nothing is asked of the API.
    await page.get_by_label("Bitcoin (BTC)").check()
    await page.get_by_role("button", name="Compare", exact=True).click()
    await expect(page.locator("[data-field-error='symbols']")).to_contain_text("Pick 2 to 20 coins (1 picked)")
    assert not _requests(browser, "/api/v1/analytics/compare")

    await page.get_by_label("Ethereum (ETH)").check()
    await page.get_by_label("Solana (SOL)").check()
    await page.get_by_label("Range").select_option("1d")
    await page.get_by_role("button", name="Compare", exact=True).click()
    rows = page.locator("[data-stats] tbody tr")
    await expect(rows).to_have_count(3)
    assert [await row.get_attribute("data-symbol") for row in await rows.all()] == ["BTC", "ETH", "SOL"]
    await page.locator("[data-chart='compare'][data-renders='1']").wait_for(timeout=30_000)
    await page.locator("[data-chart='correlation'][data-renders='1']").wait_for(timeout=30_000)
    (query,) = _requests(browser, "/api/v1/analytics/compare")
    assert query["symbols"] == ["BTC,ETH,SOL"] and query["vs"] == ["USD"]
    assert timedelta(hours=23) < datetime.now(UTC) - datetime.fromisoformat(query["start"][0]) < timedelta(hours=25)
    assert _requests(browser, "/api/v1/charts/compare") and _requests(browser, "/api/v1/charts/correlation")
    assert "symbols=BTC%2CETH%2CSOL" in page.url and "period=1d" in page.url
    await expect(page.locator("[data-chart='compare']")).to_have_attribute("data-state", "data")
    await expect(page.locator("[data-chart='correlation']")).to_have_attribute("data-state", "data")
    btc = rows.first.locator("td")
    assert re.fullmatch(r"[▲▼] \d+\.\d\d%", await btc.nth(0).inner_text()), "a return with its direction in an arrow"
    assert re.fullmatch(r"\d+\.\d\d%", await btc.nth(1).inner_text())
    assert re.fullmatch(r"-\d+\.\d\d%", await btc.nth(2).inner_text())
    assert await btc.nth(4).inner_text() == "1.00", "BTC against itself"
    for row in await rows.all():
        cells = row.locator("td")
        assert await cells.count() == 6
        assert re.fullmatch(r"\d+%", await cells.nth(5).inner_text()), "coverage is always known"
        # A value that can't be computed is a dash with the API's reason, never an empty cell or NaN.
        for cell in await cells.all():
            text = (await cell.inner_text()).strip()
            assert text and "NaN" not in text
            if text.startswith(DASH):
                assert await cell.locator("span[title]").get_attribute("title")

    # Saving: the API's messages next to the name field, then the saved one in the list.
    await page.get_by_role("button", name="Save comparison").click()
    await expect(page.locator("[data-field-error='name']")).not_to_be_empty()
    await page.get_by_label("Name").fill("Majors")
    await page.get_by_role("button", name="Save comparison").click()
    saved = page.locator("[data-saved] li")
    await expect(saved).to_have_count(1)
    await expect(saved.first).to_contain_text("Majors")
    await expect(saved.first).to_contain_text("BTC, ETH, SOL · USD · last 1d")
    await page.get_by_label("Name").fill("Majors")
    await page.get_by_role("button", name="Save comparison").click()
    await expect(page.locator("[data-field-error='name']")).to_contain_text("already have a comparison named")
    await expect(saved).to_have_count(1)

    await _accessible(page)
    # A fresh page lists it; opening it picks its coins and runs it.
    await page.goto(base + "/compare")
    await page.get_by_role("button", name="Majors", exact=True).click()
    await expect(rows).to_have_count(3)
    runs = [url for url in browser.requested if re.search(r"/api/v1/analytics/comparisons/[0-9a-f-]{36}/run", url)]
    assert len(runs) == 1, runs
    for name in ("Bitcoin (BTC)", "Ethereum (ETH)", "Solana (SOL)"):
        await expect(page.get_by_label(name)).to_be_checked()
    await expect(page.get_by_label("Range")).to_have_value("1d")
    await expect(page.locator("[data-results-state]")).to_contain_text("“Majors”")
    await page.get_by_role("button", name="Delete Majors").click()
    await expect(saved).to_have_count(0)
    await expect(page.locator("[data-saved-state]")).to_contain_text("Nothing saved yet")

    # The address pre-fills and runs a comparison.
    await page.goto(base + "/compare?symbols=ETH,SOL&vs=USD&period=7d")
    await expect(rows).to_have_count(2)
    await expect(page.get_by_label("Bitcoin (BTC)")).not_to_be_checked()
    await expect(page.get_by_label("Range")).to_have_value("7d")
    _clean(browser)


async def test_convert_recomputes_as_you_type_and_shows_the_api_message_next_to_the_field(web_platform, browser):
    page = await browser.page()
    await page.goto(web_platform.gateway + "/convert")
    result = page.locator("[data-result]")
    await expect(result).to_contain_text("1 BTC = ", timeout=30_000)
    await expect(result).to_contain_text("USD")
    await expect(page.locator("[data-path]")).to_have_text("BTC → USD")
    await expect(page.locator("[data-as-of]")).not_to_be_empty()

    amount = page.get_by_label("Amount")
    await amount.fill("2.5")
    # No submit: the result follows the typing.
    await expect(result).to_contain_text("2.5 BTC = ")
    assert any(q.get("amount") == ["2.5"] for q in _requests(browser, "/api/v1/convert"))
    assert "amount=2.5" in page.url

    await amount.fill("abc")
    error = page.locator("[data-field-error='amount']")
    await expect(error).to_have_text("amount: not a number: 'abc'")
    await expect(amount).to_have_attribute("aria-invalid", "true")
    await expect(page.locator("[data-convert-result]")).to_be_hidden()
    await amount.fill("-1")
    await expect(error).to_have_text("amount: must be greater than 0")
    await amount.fill("3")
    await expect(result).to_contain_text("3 BTC = ")
    await expect(error).to_be_empty()

    await page.get_by_label("To", exact=True).select_option("ETH")
    await expect(result).to_contain_text(" ETH")

    await _accessible(page)
    # A past moment: the local time typed travels as an instant in UTC.
    await page.get_by_label("At a past moment").check()
    moment = page.get_by_label("Moment (your local time)")
    await moment.fill("2024-01-02T03:04")
    expected = await page.evaluate("new Date('2024-01-02T03:04').toISOString().replace('.000Z', 'Z')")
    await expect(page.locator("[data-at-help]")).to_contain_text(expected)
    await expect(page.locator("[data-field-error='at']")).to_contain_text("before the earliest data")
    assert [q["at"] for q in _requests(browser, "/api/v1/convert") if "at" in q][-1] == [expected]
    _clean(browser)
