"""Restart Redis under the running platform: every service reconnects on its own and nothing crash-loops.

The whole platform runs on the offline ``sim`` source. Its private Redis is stopped, kept down 3 s and started
again on the same port, empty (as the machine's Redis, run without persistence, comes back): streams, consumer
groups, caches and job queues are gone. Then every service's /readyz must say "ready" within 10 s of Redis
being back, no service process may have exited, the supervised tasks' restart counters must stop moving (no
crash loop), and a consolidated price newer than the restart must reach PostgreSQL and the gateway's API.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import httpx
import pytest

from tests.conftest import eventually
from tests.reliability.platform import Platform, samples

pytestmark = pytest.mark.reliability

READY_WITHIN_SECONDS = 10.0
DOWN_SECONDS = 3.0
# The supervisor restarts a task that lost Redis after 0.5 s, 1 s, 2 s... (jittered): a 3 s outage costs a
# task at most about five restarts. More is a loop that ignores the backoff.
MAX_RESTARTS_PER_TASK = 6
# Once settled, the restart counters are watched this long: a crash loop keeps counting (its backoff is a few
# seconds at this point), a recovered platform does not.
QUIET_SECONDS = 10.0


async def restarts(plat: Platform) -> dict[str, float]:
    """supervised_task_restarts_total per "service/task"."""
    texts = await asyncio.gather(*(plat.metrics_text(n) for n in plat.services))
    return {
        f"{service}/{labels.get('task')}": value
        for service, text in zip(plat.services, texts, strict=True)
        for labels, value in samples(text, "supervised_task_restarts_total")
    }


def moved(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}


async def settled(plat: Platform) -> bool:
    """Every service ready and every supervised task up: none is waiting out a backoff before a restart."""
    ready = await asyncio.gather(*(plat.readyz(n) for n in plat.services))
    if any(code != 200 or body.get("status") != "ready" for code, body in ready):
        return False
    texts = await asyncio.gather(*(plat.metrics_text(n) for n in plat.services))
    return all(value == 1 for text in texts for _labels, value in samples(text, "supervised_task_up"))


async def restarts_after(plat: Platform, baseline: dict[str, float], seconds: float) -> dict[str, float]:
    """The counters at the end of ``seconds``, or as soon as one moves past ``baseline`` (polled)."""
    deadline = time.monotonic() + seconds
    while True:
        current = await restarts(plat)
        if moved(baseline, current) or time.monotonic() >= deadline:
            return current
        await asyncio.sleep(0.5)


async def newest_price(plat: Platform) -> datetime | None:
    conn = await plat.db()
    try:
        value: datetime | None = await conn.fetchval("SELECT max(last_updated) FROM prices WHERE vs = 'USD'")
        return value
    finally:
        await conn.close()


async def wait_price_after(plat: Platform, after: datetime, timeout: float, since: float | None = None) -> float:
    """Seconds (from ``since``, a monotonic time, or now) until a consolidated price newer than ``after``."""
    started = time.monotonic()
    while True:
        newest = await newest_price(plat)
        if newest is not None and newest > after:
            return time.monotonic() - (since or started)
        assert time.monotonic() - started < timeout, f"no consolidated price after {after} (newest {newest})"
        await asyncio.sleep(0.5)


async def test_every_service_reconnects_after_a_redis_restart(platform_factory, reliability_row):
    plat = platform_factory(sources="sim", extra_env={"COINLYTICS_SIM_INTERVAL_SECONDS": "0.5"})
    await plat.start()
    await wait_price_after(plat, datetime(2000, 1, 1, tzinfo=UTC), timeout=60)
    before = await restarts(plat)

    plat.stop_redis()
    down_at = datetime.now(UTC)
    await asyncio.sleep(1)
    during = dict(zip(plat.services, await asyncio.gather(*(plat.readyz(n) for n in plat.services)), strict=True))
    await asyncio.sleep(DOWN_SECONDS - 1)
    plat.start_redis()
    back = time.monotonic()
    back_at = datetime.now(UTC)
    ready_after = dict(
        zip(
            plat.services,
            await asyncio.gather(*(plat.wait_ready(n, timeout=60, interval=0.1) for n in plat.services)),
            strict=True,
        )
    )
    price_seconds = await wait_price_after(plat, back_at, timeout=60, since=back)
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(f"{plat.url('gateway')}/api/v1/prices", params={"symbols": "BTC", "vs": "USD"})
    # The baseline once settled (not merely ready once): a task still in its backoff would count a restart
    # after it without looping.
    await eventually(lambda: settled(plat), timeout=60, interval=0.2)
    after_recovery = await restarts(plat)
    quiet = await restarts_after(plat, after_recovery, QUIET_SECONDS)

    not_ready_during = sorted(n for n, (code, _body) in during.items() if code != 200)
    slowest = max(ready_after.values())
    print(
        f"\nRedis down {DOWN_SECONDS:.0f}s from {down_at:%H:%M:%S}; not ready meanwhile: {not_ready_during}\n"
        + "\n".join(f"  {n:<10} ready {s:5.1f}s after Redis was back" for n, s in ready_after.items())
        + f"\nnew consolidated price {price_seconds:.1f}s after Redis was back\nsupervised task restarts during "
        f"the outage: {moved(before, after_recovery)}; in the {QUIET_SECONDS:.0f} s after recovery: "
        f"{moved(after_recovery, quiet)}"
    )
    reliability_row.update(
        checked="every /readyz ready within 10 s, no process exited, no crash loop, new prices flow",
        recover_seconds=slowest,
        notes="ready after Redis was back: " + ", ".join(f"{n} {s:.1f}s" for n, s in ready_after.items())
        + f"; first new price after {price_seconds:.1f}s; task restarts during the outage: "
        + ", ".join(f"{k} {v:.0f}" for k, v in moved(before, after_recovery).items()),
    )  # fmt: skip
    assert not_ready_during, "every service still said ready with Redis down: the fault did not happen"
    assert plat.unexpected_exits() == [], plat.unexpected_exits()
    late = {n: round(s, 1) for n, s in ready_after.items() if s > READY_WITHIN_SECONDS}
    assert not late, f"ready later than {READY_WITHIN_SECONDS:.0f}s after Redis came back: {late}"
    looping = {k: v for k, v in moved(before, quiet).items() if v > MAX_RESTARTS_PER_TASK}
    assert not looping, f"supervised tasks restarted more often than their backoff allows: {looping}"
    still = moved(after_recovery, quiet)
    assert not still, f"tasks still restarting after recovery: {still}"
    assert response.status_code == 200, response.text
    body = response.json()
    assert datetime.fromisoformat(body["BTC"]["USD"]["last_updated"].replace("Z", "+00:00")) > back_at, body
