"""The dashboard's alerts, account and password-reset pages in a real Chromium against the whole platform on
the `sim` source: an alert made in the page fires (its in-page notification, its event with the webhook's
delivery status, the signed webhook itself), the API's 422s shown next to the field they name, preferences
that survive a reload, and a password reset through the email the SMTP sink receives."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from aiohttp import web

from tests.accounts import PASSWORD, reset_link
from tests.conftest import free_port
from tests.standard_webhooks import verify_standard_webhook

NEW_PASSWORD = "a completely different passphrase"


@pytest.fixture
def settings(settings, request):
    # A test that asks for the SMTP sink gets a platform that mails through it (reset links, email alerts);
    # the others run without email, as a deployment without COINLYTICS_SMTP_URL does.
    if "smtp" in request.fixturenames:
        return settings.model_copy(update={"smtp_url": request.getfixturevalue("smtp").url})
    return settings


@dataclass
class Hooks:
    """A webhook receiver on 127.0.0.1 keeping every delivery (headers and raw body)."""

    port: int = field(default_factory=free_port)
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/coinlytics"

    async def handle(self, request: web.Request) -> web.Response:
        self.received.append((dict(request.headers), await request.read()))
        return web.Response(status=204)


@pytest.fixture
async def hooks() -> AsyncIterator[Hooks]:
    receiver = Hooks()
    app = web.Application()
    app.router.add_post("/hooks/coinlytics", receiver.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", receiver.port).start()
    try:
        yield receiver
    finally:
        await runner.cleanup()


async def typical_price(base: str, symbol: str = "BTC", vs: str = "USD") -> str:
    """The median of the consolidated prices published over about two seconds: a level the sim's jittering
    price crosses again within seconds, where a single read may be one of its outliers (the walk can then
    drift away before the jitter reaches that level again)."""
    seen: list[Decimal] = []
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        for _ in range(9):
            response = await client.get("/api/v1/prices", params={"symbols": symbol, "vs": vs})
            assert response.status_code == 200, response.text
            # Every digit as published (the JSON number may carry more than a float keeps).
            seen.append(json.loads(response.text, parse_float=Decimal)[symbol][vs]["price"])
            await asyncio.sleep(0.25)
    return str(sorted(seen)[len(seen) // 2])


async def signed_in_page(web_platform: Any, browser: Any, email: str, path: str) -> Any:
    await web_platform.register(email)
    page = await browser.page()
    await browser.sign_in(page, web_platform.gateway, email)
    await page.goto(web_platform.gateway + path)
    return page


def no_outside_requests_or_errors(browser: Any, *, refused: tuple[int, ...] = ()) -> None:
    """Nothing requested outside the platform and no script error; ``refused``: the HTTP statuses the test
    provoked on purpose (the browser logs each as a failed resource)."""
    assert not browser.outside_requests(), browser.outside_requests()
    expected = tuple(f"status of {status} " for status in refused)
    errors = [e for e in browser.console_errors if "favicon" not in e and not any(x in e for x in expected)]
    assert not errors, errors


@pytest.mark.platform(webhook_allow_private=True)
async def test_an_alert_made_in_the_page_fires_notifies_and_shows_its_delivery(web_platform, browser, hooks):
    base = web_platform.gateway
    page = await signed_in_page(web_platform, browser, "alerts@example.com", "/alerts")
    await page.locator("[data-alerts-state]").filter(has_text="no alerts yet").wait_for()
    await page.locator("#alert-symbol option[value='BTC']").wait_for(state="attached")
    await page.get_by_label("Coin").select_option("BTC")
    await page.get_by_label("Currency").select_option("USD")
    # The window applies to percent conditions only, and is shown only for them.
    window = page.get_by_label("Window (minutes)")
    assert not await window.is_visible()
    await page.get_by_label("Condition").select_option("pct_change_down")
    assert await window.is_visible()
    await page.get_by_label("Condition").select_option("above")
    assert not await window.is_visible()

    # The sim's consolidated price jitters around its walk: the median of its recent prices is crossed upwards
    # again within seconds.
    threshold = await typical_price(base)
    await page.get_by_label("Threshold").fill(threshold)
    await page.get_by_label("Webhook URL").fill(hooks.url)
    await page.get_by_label("Cooldown (seconds)").fill("0")
    await page.get_by_role("button", name="Create alert").click()

    secret_box = page.locator("[data-secret-box]")
    await secret_box.wait_for()
    assert "only this once" in await secret_box.inner_text()
    secret = await page.locator("[data-webhook-secret]").input_value()
    assert secret.startswith("whsec_")
    item = page.locator(".alert-item")
    await item.filter(has_text=f"BTC: price rises above {threshold} USD").wait_for()
    assert "Webhook: " + hooks.url in await item.inner_text()
    assert await item.locator("[data-alert-status]").inner_text() == "active"

    # Live: the notification pops up, and the alert's event appears with its delivery status in words.
    toast = page.locator("#notifications .toast").filter(has_text="BTC rose above")
    await toast.first.wait_for(timeout=60_000)
    delivered = item.locator("[data-event-id] [data-delivery-status='delivered']")
    await delivered.first.wait_for(timeout=30_000)
    assert re.search(r"delivered .+\(1 attempt", await delivered.first.inner_text())
    await item.filter(has_text="Last fired").filter(has_not_text="not yet").wait_for()

    # The webhook itself arrived, signed with the secret the page showed once.
    headers, body = hooks.received[0]
    payload = verify_standard_webhook(secret, headers, body)
    alert_id = await item.get_attribute("data-alert-id")
    assert payload["type"] == "alert.triggered" and payload["data"]["alert_id"] == alert_id

    # The secret is never shown again: a reload lists the alert without it.
    await page.reload()
    await item.filter(has_text="price rises above").wait_for()
    assert await page.locator("[data-webhook-secret]").count() == 0
    assert "whsec_" not in await page.content()

    await item.get_by_role("button", name=re.compile("^Pause")).click()
    await item.locator("[data-alert-status]").filter(has_text="paused").wait_for()
    await item.get_by_role("button", name=re.compile("^Resume")).click()
    await item.locator("[data-alert-status]").filter(has_text="active").wait_for()
    # Paused again, so no new notification pops up over the buttons below; the shown ones are dismissed.
    await item.get_by_role("button", name=re.compile("^Pause")).click()
    await item.locator("[data-alert-status]").filter(has_text="paused").wait_for()
    toasts = page.locator("#notifications .toast")
    while await toasts.count():
        await toasts.first.get_by_role("button", name="Dismiss").click()
    # Delete asks first; cancelling keeps the alert.
    await item.get_by_role("button", name=re.compile("^Delete")).click()
    await item.get_by_role("button", name="Cancel").click()
    assert await item.count() == 1
    await item.get_by_role("button", name=re.compile("^Delete")).click()
    await item.get_by_role("button", name="Yes, delete it").click()
    await page.locator("[data-alerts-state]").filter(has_text="no alerts yet").wait_for()
    await page.reload()
    await page.locator("[data-alerts-state]").filter(has_text="no alerts yet").wait_for()
    assert await item.count() == 0
    no_outside_requests_or_errors(browser)


async def test_the_apis_validation_messages_appear_next_to_their_fields(web_platform, browser):
    base = web_platform.gateway
    anonymous = await browser.page()
    await anonymous.goto(base + "/alerts")
    link = anonymous.get_by_role("link", name="Sign in to manage alerts")
    assert urlsplit(await link.get_attribute("href") or "").path == "/login"
    assert await link.get_attribute("href") == "/login?next=/alerts"

    page = await signed_in_page(web_platform, browser, "fields@example.com", "/alerts")
    await page.locator("#alert-symbol option[value='ETH']").wait_for(state="attached")
    await page.get_by_label("Coin").select_option("ETH")
    await page.get_by_label("Threshold").fill("0")
    await page.get_by_label("Webhook URL").fill("https://hooks.example.com/x")
    create = page.get_by_role("button", name="Create alert")
    await create.click()
    threshold_error = page.locator("[data-field-error='threshold']")
    await threshold_error.filter(has_text="greater than 0").wait_for()
    assert await page.get_by_label("Threshold").get_attribute("aria-invalid") == "true"

    # Private targets are refused here (no COINLYTICS_WEBHOOK_ALLOW_PRIVATE): the message sits by the URL.
    await page.get_by_label("Threshold").fill("2500")
    await page.get_by_label("Webhook URL").fill("http://127.0.0.1:9/hook")
    await create.click()
    channel_error = page.locator("[data-field-error='channels.0']")
    await channel_error.filter(has_text="public address").wait_for()
    assert await threshold_error.inner_text() == ""
    assert await page.get_by_label("Webhook URL").get_attribute("aria-invalid") == "true"

    # A second channel by email, which this deployment has not configured: refused now, by that channel.
    await page.get_by_label("Webhook URL").fill("https://hooks.example.com/x")
    await page.get_by_role("button", name="Add another channel").click()
    await page.get_by_label("Channel 2", exact=True).select_option("email")
    await page.get_by_label("Email address").fill("me@example.com")
    await create.click()
    await page.locator("[data-field-error='channels.1']").filter(has_text="email channel is not configured").wait_for()
    assert await channel_error.inner_text() == ""
    await page.get_by_label("Email address").fill("not an address")
    await create.click()
    await page.locator("[data-field-error='channels.1']").filter(has_text="enter an email address").wait_for()

    # Nothing was created along the way.
    assert await page.locator(".alert-item").count() == 0
    no_outside_requests_or_errors(browser, refused=(422,))


async def test_register_then_preferences_are_checked_saved_and_kept_after_a_reload(web_platform, browser):
    base = web_platform.gateway
    anonymous = await browser.page()
    await anonymous.goto(base + "/account")
    assert await anonymous.get_by_role("link", name="Sign in").last.get_attribute("href") == "/login?next=/account"

    page = await browser.page()
    await page.goto(base + "/register")
    await page.get_by_label("Email").fill("prefs@example.com")
    await page.get_by_label("Password").fill(PASSWORD)
    await page.get_by_role("button", name="Create account").click()
    await page.wait_for_url("**/account?welcome=1")
    await page.locator("[data-welcome]").filter(has_text="Welcome").wait_for()
    await page.locator("[data-profile-email]").filter(has_text="prefs@example.com").wait_for()
    assert await page.locator("[data-profile-role]").inner_text() == "User"

    watchlist = page.get_by_label("Watchlist")
    save = page.get_by_role("button", name="Save preferences")
    error = page.locator("[data-field-error='watchlist']")
    await watchlist.fill("BTC, DOGE")  # DOGE is not tracked on this platform
    await save.click()
    await error.filter(has_text="not a tracked coin: DOGE").wait_for()
    await watchlist.fill("BTC, sol!")
    await save.click()
    await error.filter(has_text='"sol!" is not a coin symbol').wait_for()
    assert await watchlist.get_attribute("aria-invalid") == "true"

    await page.get_by_label("Currency").select_option("EUR")
    await watchlist.fill("sol, btc")
    await save.click()
    await page.locator("[data-form-success]").filter(has_text="Preferences saved").wait_for()
    assert await error.inner_text() == ""
    await page.locator("[data-activity] tr[data-kind='preferences_changed']").wait_for()

    await page.reload()
    await page.locator("[data-profile-email]").filter(has_text="prefs@example.com").wait_for()
    assert await page.locator("[data-welcome]").is_hidden(), "the welcome is shown once"
    assert await page.get_by_label("Currency").input_value() == "EUR"
    assert await watchlist.input_value() == "SOL, BTC"
    activity = page.locator("[data-activity]")
    await activity.locator("tr[data-kind='login']").first.wait_for()
    assert "currency EUR; watchlist SOL, BTC" in await activity.inner_text()
    assert await activity.locator("tr[data-kind='register']").count() == 1
    no_outside_requests_or_errors(browser, refused=(422,))


async def test_password_reset_by_the_emailed_link(web_platform, browser, smtp):
    base = web_platform.gateway
    await web_platform.register("reset@example.com")
    page = await browser.page()
    await page.goto(base + "/reset-password")
    await page.get_by_label("Email").fill("reset@example.com")
    await page.get_by_role("button", name="Email me a reset link").click()
    await page.locator("[data-reset-sent]").filter(has_text="a link is on its way").wait_for()

    link = reset_link(await smtp.wait_for("reset@example.com", "Reset"))
    # The link names the configured public address; the same path and fragment on this test's gateway,
    # opened in a new tab as from a mail program.
    token_url = base + "/reset-password#" + urlsplit(link).fragment
    opened = await browser.page()
    await opened.goto(token_url)
    await opened.get_by_role("heading", name="Choose a new password").wait_for()
    assert "#" not in opened.url and "token" not in opened.url, "the token is taken out of the address bar"
    new_password = opened.get_by_label("New password", exact=True)
    again = opened.get_by_label("New password again")
    await new_password.fill("short")
    await again.fill("short")
    await opened.get_by_role("button", name="Set the new password").click()
    await opened.locator("[data-field-error='new_password']").filter(has_text="10 characters").wait_for()
    await new_password.fill(NEW_PASSWORD)
    await again.fill(NEW_PASSWORD)
    await opened.get_by_role("button", name="Set the new password").click()
    done = opened.locator("[data-reset-done]")
    await done.filter(has_text="Your password has been changed").wait_for()
    await done.get_by_role("link", name="Sign in with the new password").click()
    await opened.wait_for_url("**/login")
    await browser.sign_in(opened, base, "reset@example.com", NEW_PASSWORD)
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        old = await client.post("/web/session", json={"email": "reset@example.com", "password": PASSWORD})
        assert old.status_code == 401

    # The link works once: pasted again into the first tab (only the fragment changes there), it says so.
    await page.goto(token_url)
    await page.get_by_role("heading", name="Choose a new password").wait_for()
    await page.get_by_label("New password", exact=True).fill(NEW_PASSWORD + "!")
    await page.get_by_label("New password again").fill(NEW_PASSWORD + "!")
    await page.get_by_role("button", name="Set the new password").click()
    invalid = page.locator("[data-reset-invalid]")
    await invalid.filter(has_text="already been used").wait_for()
    await invalid.get_by_role("button", name="Ask for a new link").click()
    await page.get_by_role("button", name="Email me a reset link").wait_for()
    no_outside_requests_or_errors(browser, refused=(400, 422))
