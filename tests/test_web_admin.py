"""The admin panel in a real Chromium against the whole platform on the `sim` source: an administrator disables
a source and sees its status change; others see "administrators only". And over every page of the dashboard:
no request leaves the platform's origin, and axe-core (axe-playwright-python) finds no serious or critical
accessibility violation."""

from __future__ import annotations

import os
import re
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.browser import Browser, WebPlatform
from tests.conftest import free_port

ADMIN = "admin@example.com"
PAGES = ["/", "/coins/BTC", "/compare", "/convert", "/alerts", "/account", "/login", "/register", "/reset-password",
         "/admin/tasks", "/admin"]  # fmt: skip
ADMIN_TABS = ["sources", "errors", "users", "coins", "tasks"]
# Any attempt to load from elsewhere, even one the page's CSP blocks before it goes out, is recorded here
# (an init script runs before the page's own, outside the CSP).
RECORD_CSP_VIOLATIONS = """
window.__blocked = [];
document.addEventListener("securitypolicyviolation",
  (e) => window.__blocked.push(e.blockedURI + " (" + e.violatedDirective + ")"));
"""


async def signed_in_admin(web_platform: WebPlatform, browser: Browser, db: Any) -> Any:
    await web_platform.register(ADMIN, admin=True, db=db)
    page = await browser.page()
    await browser.sign_in(page, web_platform.gateway, ADMIN)
    return page


async def confirm(page: Any, ok: str) -> None:
    dialog = page.locator("dialog[data-confirm]")
    await dialog.wait_for(state="visible")
    await dialog.get_by_role("button", name=ok, exact=True).click()
    await dialog.wait_for(state="hidden")


async def test_an_administrator_disables_a_source_in_the_panel_and_sees_its_status_change(
    web_platform: WebPlatform, browser: Browser, db: Any
) -> None:
    page = await signed_in_admin(web_platform, browser, db)
    await web_platform.register("someone@example.com")
    await page.get_by_role("link", name="Admin").click()
    await page.wait_for_url(re.compile(r".*/admin(#.*)?$"))
    sim = page.locator("tr[data-source='sim']")
    await sim.locator("[data-cell=state]", has_text="connected").wait_for()

    # Cancelling changes nothing.
    await page.get_by_role("button", name="Disable sim").click()
    await confirm(page, "Cancel")
    assert await db.fetchval("SELECT count(*) FROM source_settings") == 0
    assert await sim.get_attribute("data-enabled") == "true"

    await page.get_by_role("button", name="Disable sim").click()
    await confirm(page, "Disable sim")
    await page.locator("tr[data-source='sim'][data-state='disabled'][data-enabled='false']").wait_for()
    await sim.locator("[data-cell=state]", has_text="disabled").wait_for()
    assert await db.fetchval("SELECT enabled FROM source_settings WHERE name = 'sim'") is False
    # Still disabled after a reload: the page shows the platform's state, not its own memory.
    await page.reload()
    await page.locator("tr[data-source='sim'][data-state='disabled']").wait_for()

    await page.get_by_role("button", name="Enable sim").click()
    await confirm(page, "Enable sim")
    await sim.locator("[data-cell=state]", has_text="connected").wait_for()
    assert await db.fetchval("SELECT enabled FROM source_settings WHERE name = 'sim'") is True

    # A refused action shows the API's own message.
    await page.get_by_role("tab", name="Users").click()
    own = page.locator(f"tr[data-user='{ADMIN}']")
    await own.wait_for()
    await own.get_by_role("button", name=f"Deactivate: {ADMIN}").click()
    await confirm(page, "Deactivate")
    await page.locator("[data-admin-error=users]", has_text="cannot demote or disable themselves").wait_for()
    # Search, then deactivate another account.
    await page.get_by_label("Email contains").fill("someone")
    await page.get_by_role("button", name="Search").click()
    await page.locator("[data-state=users]", has_text="1 account matching").wait_for()
    other = page.locator("tr[data-user='someone@example.com']")
    assert await other.count() == 1
    assert await page.locator(f"tr[data-user='{ADMIN}']").count() == 0
    await other.get_by_role("button", name="Deactivate: someone@example.com").click()
    await confirm(page, "Deactivate")
    await other.get_by_text("deactivated").wait_for()
    assert await db.fetchval("SELECT is_active FROM users WHERE email = 'someone@example.com'") is False

    # Tracked coins: add one, then remove it.
    await page.get_by_role("tab", name="Tracked coins").click()
    await page.locator("tr[data-coin='BTC']").wait_for()
    await page.get_by_label("Symbol").fill("doge")
    await page.get_by_role("button", name="Track coin").click()
    await confirm(page, "Track DOGE")
    doge = page.locator("tr[data-coin='DOGE']")
    await doge.get_by_text("tracked").wait_for()
    await doge.get_by_role("button", name="Remove: DOGE").click()
    await confirm(page, "Remove DOGE")
    await doge.get_by_text("removed").wait_for()
    assert await db.fetchval("SELECT active FROM coins WHERE symbol = 'DOGE'") is False

    # The error log, per source, and the task monitor's note.
    await db.execute("INSERT INTO error_log (source, kind, message) VALUES ('sim', 'timeout', 'the sim timed out')")
    await page.get_by_role("tab", name="Error log").click()
    await page.locator("table[data-table=errors] tr", has_text="the sim timed out").wait_for()
    await page.get_by_label("Source", exact=True).select_option("sim")
    await page.get_by_role("button", name="Show").click()
    await page.locator("[data-state=errors]", has_text="1 entry for sim, newest first").wait_for()
    await page.get_by_label("Since").fill("2999-01-01T00:00")
    await page.get_by_role("button", name="Show").click()
    await page.locator("[data-state=errors]", has_text="No errors logged for sim since").wait_for()
    assert await page.locator("table[data-table=errors]").is_hidden()
    await page.get_by_role("tab", name="Task monitor").click()
    assert await page.locator("[data-tasks-note]").get_by_role("link", name="open the task monitor").count() == 1
    # The tabs work from the keyboard: Home, then the arrow keys.
    await page.keyboard.press("Home")
    assert await page.get_by_role("tab", name="Sources").get_attribute("aria-selected") == "true"
    await page.keyboard.press("ArrowRight")
    assert await page.get_by_role("tab", name="Error log").evaluate("(tab) => tab === document.activeElement")
    assert await page.locator("#panel-errors").is_visible() and await page.locator("#panel-sources").is_hidden()
    # The one failed request was the refused self-deactivation.
    assert [e for e in browser.console_errors if "status of 409" not in e] == []


async def test_anyone_else_sees_administrators_only(web_platform: WebPlatform, browser: Browser, db: Any) -> None:
    page = await browser.page()
    await page.goto(web_platform.gateway + "/admin")
    denied = page.locator("[data-admin-denied]")
    assert "Administrators only" in await denied.inner_text()
    assert await denied.get_by_role("link", name="Sign in").count() == 1
    assert await page.locator("[data-admin-tabs]").count() == 0

    await web_platform.register("user@example.com")
    await browser.sign_in(page, web_platform.gateway, "user@example.com")
    assert await page.get_by_role("link", name="Admin").count() == 0
    await page.goto(web_platform.gateway + "/admin")
    text = await page.locator("[data-admin-denied]").inner_text()
    assert "Administrators only" in text and "your account is not one" in text
    # No admin data reached the page, and its script was never loaded.
    assert await page.locator("table").count() == 0
    assert not any(url.endswith("/static/js/admin.js") for url in browser.requested)


def same_origin(url: str, origin: str) -> bool:
    parts = urlsplit(url)
    if parts.scheme in ("data", "about"):
        return True
    if parts.scheme == "blob":  # an in-memory object, named after the origin that made it
        return same_origin(parts.path, origin)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    return f"{scheme}://{parts.netloc}" == origin


async def visit_every_page(page: Any, base: str, seen: list[str]) -> list[str]:
    """Opens each page (every admin tab too) until it is idle; returns what its CSP blocked."""
    blocked: list[str] = []
    for path in PAGES:
        await page.goto(base + path, wait_until="networkidle")
        await page.locator("main").wait_for()
        if await page.locator("[data-admin-tabs]").count():
            for tab in ADMIN_TABS:
                await page.locator(f"[data-tab={tab}]").click()
                await page.wait_for_load_state("networkidle")
        blocked += [f"{path}: {b}" for b in await page.evaluate("window.__blocked")]
        seen.append(path)
    return blocked


async def watched_page(browser: Browser) -> Any:
    page = await browser.page()
    await page.context.add_init_script(RECORD_CSP_VIOLATIONS)
    page.on("websocket", lambda socket: browser.requested.append(socket.url))
    return page


async def test_no_page_requests_anything_outside_the_platforms_origin(
    web_platform: WebPlatform, browser: Browser, db: Any
) -> None:
    base = web_platform.gateway
    origin = f"{urlsplit(base).scheme}://{urlsplit(base).netloc}"

    # The detector itself: a request to another origin (still on this machine) is caught.
    probe = await watched_page(browser)
    await probe.goto(base + "/login", wait_until="networkidle")
    elsewhere = f"http://127.0.0.1:{free_port()}/probe.png"
    await probe.evaluate("(url) => { const i = new Image(); i.src = url; document.body.append(i); }", elsewhere)
    await probe.wait_for_function("window.__blocked.length > 0")
    assert any(elsewhere in b for b in await probe.evaluate("window.__blocked"))
    await probe.close()
    browser.requested.clear()
    browser.console_errors.clear()

    seen: list[str] = []
    anonymous = await watched_page(browser)
    blocked = await visit_every_page(anonymous, base, seen)
    await web_platform.register(ADMIN, admin=True, db=db)
    admin = await watched_page(browser)
    await browser.sign_in(admin, base, ADMIN)
    blocked += await visit_every_page(admin, base, seen)

    assert seen == PAGES + PAGES
    assert f"{base}/static/css/app.css" in browser.requested, "requests are being recorded"
    assert any(url.startswith(("ws://", "wss://")) for url in browser.requested), "the live socket is recorded"
    assert [url for url in browser.requested if not same_origin(url, origin)] == []
    assert blocked == []
    assert [e for e in browser.console_errors if "Content Security Policy" in e] == []


def serious(results: Any) -> list[str]:
    found = []
    for violation in results.response["violations"]:
        if violation["impact"] in ("serious", "critical"):
            targets = "; ".join(" ".join(node["target"]) for node in violation["nodes"][:5])
            found.append(f"{violation['id']} ({violation['impact']}): {violation['help']} at {targets}")
    return found


async def audit(page: Any, axe: Any, where: str, problems: list[str], everything: list[str]) -> None:
    results = await axe.run(page)
    problems += [f"{where}: {p}" for p in serious(results)]
    everything += [f"{where}: {v['id']} ({v['impact']}) x{len(v['nodes'])}" for v in results.response["violations"]]


async def audit_every_page(
    page: Any, axe: Any, base: str, scheme: str, problems: list[str], everything: list[str]
) -> None:
    for path in PAGES:
        await page.goto(base + path, wait_until="networkidle")
        await audit(page, axe, f"{scheme} {path}", problems, everything)
    # Every admin tab, and the confirmation dialog open.
    for tab in ADMIN_TABS[1:]:
        await page.locator(f"[data-tab={tab}]").click()
        await page.wait_for_load_state("networkidle")
        await audit(page, axe, f"{scheme} /admin#{tab}", problems, everything)
    await page.locator("[data-tab=sources]").click()
    await page.get_by_role("button", name="Disable sim").click()
    await page.locator("dialog[data-confirm]").wait_for(state="visible")
    await audit(page, axe, f"{scheme} /admin confirmation dialog", problems, everything)
    await page.keyboard.press("Escape")
    await page.locator("dialog[data-confirm]").wait_for(state="hidden")


async def test_every_page_passes_axe_without_serious_violations_in_light_and_dark(
    web_platform: WebPlatform, browser: Browser, db: Any
) -> None:
    try:
        from axe_playwright_python.async_playwright import Axe
    except ImportError:
        reason = "the accessibility test needs axe-playwright-python (pip install -e '.[dev]')"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)

    axe = Axe()
    base = web_platform.gateway
    problems: list[str] = []
    everything: list[str] = []
    page = await browser.page()
    await web_platform.register(ADMIN, admin=True, db=db)
    for scheme in ("light", "dark"):
        await page.emulate_media(color_scheme=scheme)
        for path in ("/login", "/register", "/reset-password", "/admin"):
            await page.goto(base + path, wait_until="networkidle")
            await audit(page, axe, f"{scheme} {path} (signed out)", problems, everything)
    await browser.sign_in(page, base, ADMIN)
    for scheme in ("light", "dark"):
        await page.emulate_media(color_scheme=scheme)
        await audit_every_page(page, axe, base, scheme, problems, everything)
    assert problems == [], "\n".join(["serious or critical accessibility violations:", *problems, "all:", *everything])
