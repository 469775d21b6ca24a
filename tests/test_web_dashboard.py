"""The dashboard's sign-in session and markets page: cookie flags, CSRF on every change made with the cookie,
sign-out revoking the tokens, and, in a real Chromium against the whole platform on the `sim` source,
registering, signing in, a markets table that updates without a reload, and signing out."""

from __future__ import annotations

import httpx
import pytest

from tests.accounts import PASSWORD
from tests.replay import serve_binance


async def _cookie_session(client: httpx.AsyncClient, email: str) -> httpx.Response:
    registered = await client.post("/api/v1/auth/register", json={"email": email, "password": PASSWORD})
    assert registered.status_code == 201, registered.text
    response = await client.post("/web/session", json={"email": email, "password": PASSWORD})
    assert response.status_code == 200, response.text
    return response


async def test_sign_in_sets_httponly_lax_cookies_and_the_page_never_sees_the_tokens(web_platform):
    async with httpx.AsyncClient(base_url=web_platform.gateway, timeout=20) as client:
        response = await _cookie_session(client, "cookie@example.com")
        body = response.json()
        assert body["signed_in"] is True and body["expires_in"] > 0
        assert "access_token" not in response.text and "refresh_token" not in response.text
        headers = [v for k, v in response.headers.multi_items() if k == "set-cookie"]
        by_name = {h.split("=", 1)[0]: h.lower() for h in headers}
        assert {"coinlytics_access", "coinlytics_refresh", "coinlytics_csrf", "coinlytics_expires"} <= set(by_name)
        assert "httponly" in by_name["coinlytics_access"] and "samesite=lax" in by_name["coinlytics_access"]
        assert "httponly" in by_name["coinlytics_refresh"] and "path=/web/session" in by_name["coinlytics_refresh"]
        assert "httponly" not in by_name["coinlytics_csrf"]
        # The cookie alone signs API reads in.
        me = await client.get("/api/v1/users/me")
        assert me.status_code == 200 and me.json()["email"] == "cookie@example.com"
        state = await client.get("/web/session")
        assert state.status_code == 200 and state.json()["user"]["email"] == "cookie@example.com"


async def test_a_change_made_with_the_cookie_needs_the_csrf_token(web_platform):
    async with httpx.AsyncClient(base_url=web_platform.gateway, timeout=20) as client:
        await _cookie_session(client, "csrf@example.com")
        csrf = client.cookies["coinlytics_csrf"]
        forged = await client.patch("/api/v1/users/me", json={"vs_currency": "EUR"})
        assert forged.status_code == 403 and "CSRF" in forged.json()["error"]["message"]
        wrong = await client.patch("/api/v1/users/me", json={"vs_currency": "EUR"}, headers={"X-CSRF-Token": "x"})
        assert wrong.status_code == 403
        done = await client.patch("/api/v1/users/me", json={"vs_currency": "EUR"}, headers={"X-CSRF-Token": csrf})
        assert done.status_code == 200, done.text
        assert (await client.get("/api/v1/users/me")).json()["vs_currency"] == "EUR"
        # An API client with a bearer token needs no CSRF token (and no cookie is consulted).
        login = await client.post("/api/v1/auth/login", data={"username": "csrf@example.com", "password": PASSWORD})
        bearer = {"Authorization": f"Bearer {login.json()['access_token']}"}
        async with httpx.AsyncClient(base_url=web_platform.gateway, timeout=20) as api_client:
            patched = await api_client.patch("/api/v1/users/me", json={"vs_currency": "GBP"}, headers=bearer)
            assert patched.status_code == 200, patched.text


async def test_refresh_renews_and_sign_out_revokes_the_session(web_platform):
    async with httpx.AsyncClient(base_url=web_platform.gateway, timeout=20) as client:
        await _cookie_session(client, "out@example.com")
        csrf = client.cookies["coinlytics_csrf"]
        old_access = client.cookies["coinlytics_access"]
        assert (await client.post("/web/session/refresh")).status_code == 403, "refresh is CSRF-checked too"
        renewed = await client.post("/web/session/refresh", headers={"X-CSRF-Token": csrf})
        assert renewed.status_code == 200, renewed.text
        assert client.cookies["coinlytics_access"] != old_access
        new_csrf = client.cookies["coinlytics_csrf"]
        access = client.cookies["coinlytics_access"]
        out = await client.delete("/web/session", headers={"X-CSRF-Token": new_csrf})
        assert out.status_code == 204
        assert "coinlytics_access" not in client.cookies
    async with httpx.AsyncClient(base_url=web_platform.gateway, timeout=20) as stale:
        revoked = await stale.get("/api/v1/users/me", headers={"Authorization": f"Bearer {access}"})
        assert revoked.status_code == 401, "sign-out revoked the token, not only the cookie"


async def test_pages_carry_a_same_origin_policy_and_say_who_is_signed_in(web_platform):
    async with httpx.AsyncClient(base_url=web_platform.gateway, timeout=20) as client:
        page = await client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        policy = page.headers["content-security-policy"]
        assert "default-src 'self'" in policy and "script-src 'self'" in policy and "unsafe-eval" not in policy
        assert 'data-signed-in="false"' in page.text and "Sign in" in page.text
        await _cookie_session(client, "nav@example.com")
        signed = await client.get("/")
        assert 'data-signed-in="true"' in signed.text and "Sign out" in signed.text
        assert (await client.get("/static/css/app.css")).status_code == 200
        assert (await client.get("/static/nope.css")).status_code == 404


async def test_register_sign_in_live_markets_and_sign_out_in_a_browser(web_platform, browser):
    page = await browser.page()
    base = web_platform.gateway
    await page.goto(base + "/register")
    await page.get_by_label("Email").fill("browser@example.com")
    await page.get_by_label("Password").fill("short")
    await page.get_by_role("button", name="Create account").click()
    # The API's validation message, next to its field.
    await page.locator("[data-field-error='password']").filter(has_text="10").wait_for()
    await page.get_by_label("Password").fill(PASSWORD)
    await page.get_by_role("button", name="Create account").click()
    await page.wait_for_url("**/account?welcome=1")
    assert await page.locator("body").get_attribute("data-signed-in") == "true"

    await page.goto(base + "/")
    table = page.locator("[data-markets]")
    await table.locator("tbody tr").first.wait_for()
    assert await table.locator("tbody tr").count() == 3
    # A price cell changes (with an arrow, not only a colour) without a reload.
    await page.locator("[data-price][data-direction]").first.wait_for(timeout=20_000)
    changed = await page.locator("[data-price][data-direction]").first.inner_text()
    assert changed[0] in "▲▼"
    # Sorting by a column header.
    await page.get_by_role("button", name="Coin").click()
    symbols = [await r.get_attribute("data-symbol") for r in await table.locator("tbody tr").all()]
    assert symbols in (sorted(symbols), sorted(symbols, reverse=True))
    before = await page.locator("[data-markets-state]").inner_text()
    await page.get_by_label("Currency").select_option("EUR")
    await page.wait_for_url("**/?vs=EUR")
    await page.locator("[data-markets-state]").filter(has_not_text=before).wait_for()

    await page.get_by_role("button", name="Sign out").click()
    await page.wait_for_url("**/login?signed_out=1")
    assert await page.locator("body").get_attribute("data-signed-in") == "false"
    await browser.sign_in(page, base, "browser@example.com")
    assert not browser.outside_requests(), browser.outside_requests()
    # No script failed (answers like the 422 above are shown to the user, and logged by the browser only).
    assert not [e for e in browser.console_errors if e.startswith("page error")], browser.console_errors


@pytest.mark.parametrize("path", ["/", "/login", "/register"])
async def test_pages_work_without_a_session_and_request_nothing_outside(web_platform, browser, path):
    page = await browser.page()
    response = await page.goto(web_platform.gateway + path)
    assert response is not None and response.status == 200
    await page.wait_for_load_state("networkidle")
    assert await page.locator("main h1").count() == 1
    assert not browser.outside_requests(), browser.outside_requests()


@pytest.fixture
def platform_overrides(replay, exchange_fixtures) -> dict[str, object]:
    """Ingest polls Binance's recorded REST payloads (tests/replay.py) instead of the simulator."""
    serve_binance(replay, exchange_fixtures)
    return {
        "sources": ["binance"],
        "source_urls": {"binance_rest_url": replay.base_url},
        "min_fresh_sources": 1,
        "max_clock_skew_seconds": 0,
        "expect_prices_for": ["BTC", "ETH"],
    }


async def test_markets_show_prices_from_replayed_exchange_traffic(platform_overrides, web_platform, browser):
    async with httpx.AsyncClient(base_url=web_platform.gateway, timeout=20) as client:
        expected = (await client.get("/api/v1/prices", params={"symbols": "BTC", "vs": "USD"})).json()["BTC"]["USD"]
    page = await browser.page()
    await page.goto(web_platform.gateway + "/")
    row = page.locator("[data-markets] tbody tr[data-symbol='BTC']")
    await row.wait_for()
    shown = (await row.locator("[data-price]").inner_text()).replace(",", "").split()[0].lstrip("▲▼ ")
    # The recorded Binance ticker's price, as consolidated, to the cents the table shows.
    assert abs(float(shown) - float(expected["price"])) < 0.01, (shown, expected)
    assert not browser.outside_requests(), browser.outside_requests()


async def test_sign_in_is_refused_from_another_origin_and_without_json(web_platform):
    async with httpx.AsyncClient(base_url=web_platform.gateway, timeout=20) as client:
        await client.post("/api/v1/auth/register", json={"email": "origin@example.com", "password": PASSWORD})
        body = {"email": "origin@example.com", "password": PASSWORD}
        foreign = await client.post("/web/session", json=body, headers={"Origin": "http://127.0.0.1:1"})
        assert foreign.status_code == 403 and "coinlytics_access" not in client.cookies
        cross_site = await client.post("/web/session", json=body, headers={"Sec-Fetch-Site": "same-site"})
        assert cross_site.status_code == 403
        untyped = await client.post("/web/session", content=b'{"email": "origin@example.com", "password": "x"}')
        assert untyped.status_code in (415, 422) and "coinlytics_access" not in client.cookies
        own = await client.post("/web/session", json=body, headers={"Origin": web_platform.gateway})
        assert own.status_code == 200 and "coinlytics_access" in client.cookies


@pytest.mark.parametrize("target", ["/%5Cevil.example", "/%09/evil.example", "//evil.example", "https://evil.example/"])
async def test_the_page_after_sign_in_is_always_on_this_site(web_platform, browser, target):
    await web_platform.register("next@example.com")
    page = await browser.page()
    await page.goto(f"{web_platform.gateway}/login?next={target}")
    await page.get_by_label("Email").fill("next@example.com")
    await page.get_by_label("Password").fill(PASSWORD)
    await page.get_by_role("button", name="Sign in").click()
    await page.locator("body[data-signed-in='true']").wait_for()
    assert page.url.startswith(web_platform.gateway + "/"), page.url
    assert not browser.outside_requests(), browser.outside_requests()


async def test_an_unknown_address_is_a_page_for_a_browser_and_the_error_shape_for_an_api_client(web_platform):
    async with httpx.AsyncClient(base_url=web_platform.gateway, timeout=20) as client:
        page = await client.get("/no/such/page", headers={"Accept": "text/html,application/xhtml+xml"})
        assert page.status_code == 404 and page.headers["content-type"].startswith("text/html")
        assert "Page not found" in page.text and "/no/such/page" in page.text
        api = await client.get("/no/such/page")
        assert api.status_code == 404 and api.json()["error"]["code"] == "not_found"
        routed = await client.get("/api/v1/nothing-here", headers={"Accept": "text/html"})
        assert routed.status_code == 404 and "error" in routed.json(), "API paths keep their JSON errors"


async def test_a_known_address_asked_with_another_method_is_405_not_a_page(web_platform):
    async with httpx.AsyncClient(base_url=web_platform.gateway, timeout=20) as client:
        response = await client.get("/web/session/refresh", headers={"Accept": "text/html"})
        assert response.status_code == 405 and "POST" in response.headers["allow"]
