"""A full disk under the system log: the service keeps serving and says so once, not once per line (at most
once every ten minutes; a disk failing by turns is tests/test_system_log.py's flapping case).

One real service process (conversion, on its own PostgreSQL and Redis) runs with COINLYTICS_SYSTEM_LOG_PATH
naming a symlink to /dev/full, where every write fails with ENOSPC, as on a full disk. 500 requests follow,
each of which logs request_started and request_finished. Every request must answer 200, the process must not
exit, its stderr must say exactly once that the system log cannot be written, and the dropped lines must be
counted in system_log_dropped_lines_total.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.reliability

REQUESTS = 500
CONCURRENCY = 10
WARNING = "system log: cannot write"


async def test_a_full_disk_for_the_system_log(platform_factory, reliability_row, tmp_path: Path):
    if not Path("/dev/full").exists():
        pytest.skip("this system has no /dev/full to stand in for a full disk")
    log_path = tmp_path / "coinlytics_system.log"
    log_path.symlink_to("/dev/full")
    plat = platform_factory(services=("conversion",), extra_env={"COINLYTICS_SYSTEM_LOG_PATH": str(log_path)})
    await plat.start()

    statuses: list[int] = []
    async with httpx.AsyncClient(base_url=plat.url("conversion"), timeout=30) as client:
        # The spec and the API explorer: answered by the service itself whatever data it has (its API routes
        # want the gateway's signed credential in production), and logged like any request.
        paths = ["/openapi.json", "/docs"]
        queue = list(range(REQUESTS))

        async def worker() -> None:
            while queue:
                n = queue.pop()
                response = await client.get(paths[n % len(paths)])
                statuses.append(response.status_code)

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    stderr = plat.log("conversion")
    warnings = stderr.count(WARNING)
    dropped = await plat.metric("conversion", "system_log_dropped_lines_total")
    answered = sum(1 for s in statuses if s == 200)
    print(
        f"\nfull disk for the system log: sent {len(statuses)}, answered 200 {answered}, "
        f"warnings on stderr {warnings}, lines dropped {dropped:.0f}"
    )
    reliability_row.update(
        checked="every request answered 200 with the log unwritable; said once on stderr; drops counted",
        sent=len(statuses),
        stored=answered,
        lost=len(statuses) - answered,
        notes=f"{warnings} warning(s) on stderr, {dropped:.0f} log lines dropped and counted",
    )
    assert len(statuses) == REQUESTS
    assert answered == REQUESTS, f"not every request answered 200: {sorted(set(statuses))}"
    assert plat.unexpected_exits() == [], plat.unexpected_exits()
    assert warnings == 1, f"stderr said {warnings} times that the log is unwritable:\n{plat.log_tail('conversion')}"
    assert "No space left on device" in stderr
    assert dropped >= 2 * REQUESTS, "every request's two lines are dropped and counted"
