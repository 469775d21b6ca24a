"""The task monitor page in a real Chromium against the whole platform on the `sim` source, with one more arq
worker in this process running the test jobs of tests/test_task_monitor.py: an administrator sees a failed
job with its error, retries it from the keyboard and sees the retry complete; the platform's own queues and cron
jobs are listed; axe-core finds no serious or critical violation; anyone else sees "administrators only"."""

from __future__ import annotations

import os
import uuid
from typing import Any

import pytest
from redis.asyncio import Redis

from shared.jobs import JobQueue
from tests.browser import Browser, WebPlatform
from tests.test_task_monitor import worker
from tests.test_web_admin import ADMIN, serious, signed_in_admin

QUEUE = "web-tests"


async def test_an_administrator_retries_a_failed_job_from_the_task_monitor(
    web_platform: WebPlatform, browser: Browser, db: Any, redis: Redis
) -> None:
    try:
        from axe_playwright_python.async_playwright import Axe
    except ImportError:
        reason = "the accessibility check needs axe-playwright-python (pip install -e '.[dev]')"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    settings = web_platform.settings
    jobs = JobQueue(settings)
    flag = settings.key("tests", "healed", uuid.uuid4().hex)
    failing = f"heals-{uuid.uuid4().hex}"
    try:
        async with worker(settings, QUEUE):
            assert await jobs.enqueue(QUEUE, "heals", flag, job_id=failing)
            page = await signed_in_admin(web_platform, browser, db)
            await page.get_by_role("link", name="Admin").click()
            await page.get_by_role("tab", name="Task monitor").click()
            await page.get_by_role("link", name="open the task monitor").click()
            await page.wait_for_url("**/admin/tasks")

            queue = page.locator(f"section[data-queue='{QUEUE}']")
            failed = queue.locator(f"table[data-table=failed] tr[data-job='{failing}']")
            # The page refreshes itself: the job fails after the page has loaded.
            await failed.locator("[data-cell=error]", has_text="RuntimeError: not healed yet").wait_for()
            assert await queue.locator("[data-count=failed]").inner_text() == "1"
            # The platform's own queues and their cron jobs, with a next run.
            await page.locator("section[data-queue='alerting-delivery']").wait_for()
            sweep = page.locator("table[data-table=cron] tr[data-cron='cron:sweep_deliveries']")
            await sweep.wait_for()
            assert await sweep.locator("time").count() >= 1

            problems = serious(await Axe().run(page))
            await page.emulate_media(color_scheme="dark")
            problems += serious(await Axe().run(page))
            assert problems == [], "\n".join(problems)

            await redis.set(flag, "1", ex=600)
            retry = failed.get_by_role("button", name=f"Retry heals ({failing})")
            await retry.focus()
            await page.keyboard.press("Enter")
            await page.locator("[data-tasks-done]", has_text="heals queued again as").wait_for()
            rerun = queue.locator(f"table[data-table=completed] tr[data-retry-of='{failing}']")
            await rerun.wait_for()
            assert await rerun.get_attribute("data-status") == "completed"
            await failed.get_by_text("retried as").wait_for()
            assert int(await queue.locator("[data-count=completed]").inner_text()) >= 1
    finally:
        await jobs.close()
    assert browser.outside_requests() == []
    assert browser.console_errors == []


async def test_anyone_else_sees_administrators_only_on_the_task_monitor(
    web_platform: WebPlatform, browser: Browser
) -> None:
    page = await browser.page()
    await page.goto(web_platform.gateway + "/admin/tasks")
    denied = page.locator("[data-admin-denied]")
    assert "Administrators only" in await denied.inner_text()
    assert await denied.get_by_role("link", name="Sign in").get_attribute("href") == "/login?next=/admin/tasks"
    await web_platform.register("user@example.com")
    await browser.sign_in(page, web_platform.gateway, "user@example.com")
    await page.goto(web_platform.gateway + "/admin/tasks")
    assert "your account is not one" in await page.locator("[data-admin-denied]").inner_text()
    assert not any(url.endswith("/static/js/tasks.js") for url in browser.requested)
    assert ADMIN not in await page.content()
