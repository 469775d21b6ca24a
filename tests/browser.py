"""What every browser test of the dashboard shares: the whole platform on real servers (ingest on the `sim`
source, pricing, conversion, analytics, alerting, gateway), and Playwright pages on Debian's chromium that
record every request and leave a screenshot in ``test-artifacts/`` when the test fails.

Use::

    async def test_something(web_platform, browser):
        page = await browser.page()
        await page.goto(web_platform.gateway + "/")
        ...

``web_platform`` takes settings overrides through ``@pytest.mark.platform(webhook_allow_private=True, ...)``,
or from a ``platform_overrides`` fixture of the test module (``expect_prices_for=[...]`` names the coins it
waits to see priced before the test starts; by default the sim's three).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from services.alerting.app import create_app as alerting_app
from services.analytics.app import create_app as analytics_app
from services.conversion.app import create_app as conversion_app
from services.gateway.app import create_app as gateway_app
from services.ingest.app import create_app as ingest_app
from services.pricing.app import create_app as pricing_app
from tests.accounts import PASSWORD
from tests.conftest import ROOT, eventually, serve_app

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
ARTIFACTS = ROOT / "test-artifacts"
COINS = ["BTC", "ETH", "SOL"]


def chromium_or_skip() -> str:
    """The system chromium for Playwright; missing tools skip locally and fail in CI."""
    missing = []
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        missing.append("the playwright package (pip install -e '.[dev]')")
    if not Path(CHROMIUM).is_file():
        missing.append(f"{CHROMIUM} (apt-get install chromium)")
    if missing:
        reason = "browser test needs " + " and ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return CHROMIUM


def on_this_machine(url: str) -> bool:
    parts = urlsplit(url)
    if parts.scheme in ("data", "about"):
        return True
    if parts.scheme == "blob":  # an in-memory object named after the origin that made it
        parts = urlsplit(parts.path)
    return parts.hostname in {"127.0.0.1", "localhost"}


@dataclass
class WebPlatform:
    gateway: str
    settings: Any
    services: dict[str, str]

    async def register(self, email: str, password: str = PASSWORD, *, admin: bool = False, db: Any = None) -> None:
        async with httpx.AsyncClient(base_url=self.gateway, timeout=20) as client:
            response = await client.post("/api/v1/auth/register", json={"email": email, "password": password})
            assert response.status_code == 201, response.text
        if admin:
            assert db is not None, "pass the db fixture to make an administrator"
            await db.execute("UPDATE users SET role = 'admin' WHERE email = $1", email)


@pytest.fixture
async def web_platform(request, settings, db) -> AsyncIterator[WebPlatform]:
    marker = request.node.get_closest_marker("platform")
    overrides: dict[str, Any] = dict(marker.kwargs) if marker else {}
    # A test module may define a `platform_overrides` fixture for values known only at run time (a replay
    # server's URL).
    if "platform_overrides" in request.fixturenames:
        overrides.update(request.getfixturevalue("platform_overrides"))
    coins = overrides.pop("expect_prices_for", COINS)
    await db.executemany("INSERT INTO coins (symbol, name, active) VALUES ($1, $2, true)",
                         [("BTC", "Bitcoin"), ("ETH", "Ethereum"), ("SOL", "Solana")])  # fmt: skip
    common = settings.model_copy(
        update={
            "internal_auth_required": True,
            "sources": ["sim"],
            "coins": COINS,
            "sim_seed": 11,
            "sim_interval_seconds": 0.5,
            "rate_limit_anonymous": 100_000,
            "rate_limit_user": 100_000,
            "login_max_attempts_per_ip": 100_000,
            "live_heartbeat_seconds": 2.0,
            **overrides,
        }
    )
    async with contextlib.AsyncExitStack() as stack:
        urls: dict[str, str] = {}
        for name, factory in (("pricing", pricing_app), ("ingest", ingest_app), ("conversion", conversion_app),
                              ("analytics", analytics_app), ("alerting", alerting_app)):  # fmt: skip
            urls[name] = await stack.enter_async_context(serve_app(factory(common)))
        gw = common.model_copy(update={f"{name}_url": url for name, url in urls.items()})
        gateway = await stack.enter_async_context(serve_app(gateway_app(gw)))
        platform = WebPlatform(gateway, gw, urls)

        async def priced() -> bool:
            async with httpx.AsyncClient(base_url=gateway, timeout=10) as client:
                response = await client.get("/api/v1/prices", params={"symbols": ",".join(coins), "vs": "USD"})
                return response.status_code == 200 and all(c in response.json() for c in coins)

        await eventually(priced, timeout=30)
        yield platform


@dataclass
class Browser:
    """Pages on one headless chromium; every request URL any page makes is kept in ``requested``."""

    node: Any
    browser: Any = None
    pages: list[Any] = field(default_factory=list)
    requested: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)

    async def page(self) -> Any:
        context = await self.browser.new_context()
        page = await context.new_page()
        page.set_default_timeout(15_000)
        page.on("request", lambda request: self.requested.append(request.url))
        page.on("console", lambda msg: msg.type == "error" and self.console_errors.append(msg.text))
        page.on("pageerror", lambda exc: self.console_errors.append(f"page error: {exc}"))
        self.pages.append(page)
        return page

    def outside_requests(self) -> list[str]:
        return [url for url in self.requested if not on_this_machine(url)]

    async def sign_in(self, page: Any, base: str, email: str, password: str = PASSWORD) -> None:
        await page.goto(base + "/login")
        await page.get_by_label("Email").fill(email)
        await page.get_by_label("Password").fill(password)
        await page.get_by_role("button", name="Sign in").click()
        await page.wait_for_url(re.compile(r".*/(\?.*)?$"))
        await page.locator("body[data-signed-in='true']").wait_for()


@pytest.fixture
async def browser(request) -> AsyncIterator[Browser]:
    executable = chromium_or_skip()
    from playwright.async_api import async_playwright

    holder = Browser(request.node)
    async with async_playwright() as pw:
        holder.browser = await pw.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            yield holder
        finally:
            report = getattr(request.node, "rep_call", None)
            if report is not None and report.failed:
                ARTIFACTS.mkdir(exist_ok=True)
                for index, page in enumerate(holder.pages):
                    with contextlib.suppress(Exception):
                        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.nodeid)[-150:]
                        await page.screenshot(path=str(ARTIFACTS / f"{name}-{index}.png"), full_page=True)
            await holder.browser.close()
