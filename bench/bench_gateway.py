"""What a request through the gateway costs: for the gateway's own /healthz (the baseline), a price read, a
conversion and a history read, the requests per second at saturation, p50/p99 at a fixed rate of 500
requests/s, and the CPU time per request spent in each process involved (issue 14, part 1).

Every service is its own process (``python -m services.<name>`` on real uvicorn, free ports, a scratch
database with seeded prices, fiat rates and candles). The load generator is Debian's ``wrk`` (C, one thread),
so it takes little of the cores the services need; a Python client would compete with them.

- Saturation: 32 connections, a fixed number of requests (a Lua ``response()`` stops wrk when they are
  answered); requests/s is that count over wrk's elapsed time, and CPU per request is the growth of
  utime+stime in /proc/<pid>/stat of the gateway, pricing and conversion processes over the same run,
  divided by the count.
- Fixed rate: wrk is closed-loop, so a Lua ``delay()`` paces it the way wrk2 does: each request claims the
  next slot of a fixed 500/s schedule (read from CLOCK_MONOTONIC through LuaJIT's ffi) and waits for it; a
  late request goes at once, so a backlog is caught up rather than skipped. With 100 connections each one
  has 200 ms between its slots, so latency is counted from the moment the request is written (wrk's own
  measure) without hiding a queue unless a request takes longer than that; the achieved rate is printed
  and a shortfall is flagged.

Targets (issue 14): gateway CPU per forwarded request at most 0.6 ms (the issue's "2x /healthz", from the
0.30 ms it measured; /healthz skips request logging, so it may well come out cheaper here), pricing at most
0.4 ms per price read, conversion at most 0.4 ms per conversion, price reads and conversions at least 0.35x
the /healthz throughput, p99 under 50 ms at 500 requests/s. Each service's own /healthz, called directly, is
the floor its CPU figure is shown beside.

The machine's cores are shared with whatever else runs: absolute figures are indicative, the ratios within
one run are what count.

``python -m bench.bench_gateway profile [--seconds N] [--out DIR] [--route NAME]`` runs py-spy (not a project
dependency: ``.venv/bin/pip install py-spy``) on the gateway and pricing processes under a price-read load (or
another route of ROUTES) and writes the top entries of each to DIR/profile-gateway.txt and
DIR/profile-pricing.txt, with the collapsed stacks beside them (profile-*.folded, for a flame graph).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from sqlalchemy.engine import make_url

from bench import bench_conversion
from bench.common import Figure, cpu_seconds, scratch_database, service_process, wait_ok
from shared.embedded import free_port

TARGET_RATE = 500
SATURATION_CONNECTIONS = 32
RATE_CONNECTIONS = 100
# A fixed day of stored hourly candles: 24 rows, the same query every time.
HISTORY_DAY = datetime(2026, 11, 1, tzinfo=UTC)
HISTORY = (
    "/api/v1/prices/BTC/history?vs=USD&interval=1h"
    f"&start={HISTORY_DAY:%Y-%m-%dT%H:%M:%SZ}&end={HISTORY_DAY + timedelta(days=1):%Y-%m-%dT%H:%M:%SZ}"
)
ROUTES: dict[str, list[str]] = {
    "healthz": ["/healthz"],
    "price read": ["/api/v1/prices?symbols=BTC&vs=USD"],
    "conversion": bench_conversion.QUERIES,
    "history read": [HISTORY],
}
# The same reads, each request made distinct by a parameter the services ignore (``&n=<i>``), so the gateway's
# read memo never has it: what a request costs when the gateway forwards it (a dashboard's first read of a
# pair, a conversion of an amount nobody asked for in the last half second, any read during a burst of price
# events).
DISTINCT = {"price read": "price read, each distinct", "conversion": "conversion, each distinct"}
ROUTES.update({DISTINCT[name]: ROUTES[name] for name in DISTINCT})
PROCESSES = ("gateway", "pricing", "conversion")

# CLOCK_MONOTONIC in ms, through LuaJIT's ffi: wrk's Lua has no clock of its own.
_CLOCK_LUA = """
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clock_id, bench_timespec *tp);
]]
local ts = ffi.new("bench_timespec")
local function now_ms()
  ffi.C.clock_gettime(1, ts)
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end
local paths = {%(paths)s}
local distinct = %(distinct)s
local i = 0
request = function()
  if started == nil then started = now_ms() end
  i = i + 1
  local path = paths[(i %% #paths) + 1]
  if distinct then path = path .. "&n=" .. i end
  return wrk.format("GET", path)
end
"""

# wrk's main thread sleeps out -d whatever its worker does, so a worker that has its count says so on stdout
# and the bench interrupts wrk (SIGINT: wrk then reports at once); the elapsed time is the worker's own.
_SATURATION_LUA = (
    _CLOCK_LUA
    + """
local wanted = %(count)d
answered = 0
response = function(status, headers, body)
  if elapsed_ms ~= nil then return end
  answered = answered + 1
  if answered >= wanted then
    elapsed_ms = now_ms() - started
    io.write("BENCH_STOPPED\\n")
    io.flush()
    wrk.thread:stop()
  end
end
"""
)

# Paced like wrk2: each request claims the next slot of a fixed schedule and waits for it; a late one goes at
# once, so a backlog is caught up rather than skipped. wrk's delay() is in whole ms; slots are not rounded.
_RATE_LUA = (
    _CLOCK_LUA
    + """
local step = 1000 / %(rate)d
local slot = nil
delay = function()
  local now = now_ms()
  if slot == nil then slot = now end
  local wait = slot - now
  slot = slot + step
  if wait <= 0 then return 0 end
  return math.floor(wait)
end
"""
)

# Run in wrk's main thread: one line the bench parses.
_DONE_LUA = """
local threads = {}
setup = function(thread) table.insert(threads, thread) end
done = function(summary, latency, requests)
  local e = summary.errors
  local elapsed = threads[1]:get("elapsed_ms")
  local count = threads[1]:get("answered")
  if elapsed == nil then
    elapsed = summary.duration / 1000
    count = summary.requests
  end
  io.write(string.format("BENCH requests=%d elapsed_ms=%.3f non2xx=%d socket_errors=%d p50_us=%d p99_us=%d\\n",
    count, elapsed, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass
class WrkResult:
    requests: int
    seconds: float
    non2xx: int
    socket_errors: int
    p50_ms: float
    p99_ms: float

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


@dataclass
class Platform:
    gateway_url: str
    # Each service's own address (for its /healthz, the floor of what a request costs in that process).
    urls: dict[str, str]
    pids: dict[str, int]


def wrk_available() -> bool:
    """wrk on PATH; if missing and we are root on Debian, install it (the bench says so either way)."""
    if shutil.which("wrk"):
        return True
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("   wrk not found: installing Debian's wrk (apt-get install -y -qq wrk)", flush=True)
        result = subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], capture_output=True, check=False)
        if result.returncode == 0 and shutil.which("wrk"):
            return True
        print(f"   apt-get failed: {result.stderr.decode(errors='replace')[-300:]}", flush=True)
    print("   wrk is not installed (apt-get install wrk): the gateway figures are skipped", flush=True)
    return False


def _lua_paths(paths: list[str]) -> str:
    return ", ".join('"' + p.replace("\\", "\\\\").replace('"', '\\"') + '"' for p in paths)


@contextlib.contextmanager
def _lua_file(script: str) -> Iterator[str]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", prefix="bench-wrk-") as handle:
        handle.write(script + _DONE_LUA)
        handle.flush()
        yield handle.name


async def _wrk(url: str, script: str, *, connections: int, seconds: float) -> WrkResult:
    with _lua_file(script) as lua:
        process = await asyncio.create_subprocess_exec(
            "wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "10s", "-s", lua, url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert process.stdout is not None and process.stderr is not None
        out = b""
        while line := await process.stdout.readline():
            out += line
            if line.startswith(b"BENCH_STOPPED"):
                process.send_signal(signal.SIGINT)
        err = await process.stderr.read()
        await process.wait()
    match = re.search(rb"BENCH (.*)", out)
    if process.returncode != 0 or match is None:
        raise RuntimeError(f"wrk failed ({process.returncode}): {(out + err).decode(errors='replace')[-500:]}")
    values = dict(item.split("=") for item in match.group(1).decode().split())
    return WrkResult(
        requests=int(values["requests"]),
        seconds=float(values["elapsed_ms"]) / 1000,
        non2xx=int(values["non2xx"]),
        socket_errors=int(values["socket_errors"]),
        p50_ms=int(values["p50_us"]) / 1000,
        p99_ms=int(values["p99_us"]) / 1000,
    )


def _lua_bool(value: bool) -> str:
    return "true" if value else "false"


async def saturate(
    platform: Platform, paths: list[str], count: int, *, service: str = "gateway", distinct: bool = False
) -> tuple[WrkResult, dict[str, float]]:
    """``count`` requests to ``service`` as fast as it answers them; also each process's CPU ms per request."""
    script = _SATURATION_LUA % {"paths": _lua_paths(paths), "count": count, "distinct": _lua_bool(distinct)}
    before = {name: cpu_seconds(pid) for name, pid in platform.pids.items()}
    # The duration is only a bound: the script stops wrk once ``count`` requests are answered.
    result = await _wrk(platform.urls[service], script, connections=SATURATION_CONNECTIONS, seconds=600)
    after = {name: cpu_seconds(pid) for name, pid in platform.pids.items()}
    per_request = {name: (after[name] - before[name]) * 1000 / max(1, result.requests) for name in before}
    return result, per_request


async def at_rate(
    platform: Platform, paths: list[str], rate: int, seconds: float, *, distinct: bool = False
) -> WrkResult:
    script = _RATE_LUA % {"paths": _lua_paths(paths), "rate": rate, "distinct": _lua_bool(distinct)}
    return await _wrk(platform.gateway_url, script, connections=RATE_CONNECTIONS, seconds=seconds)


async def _seed(database_url: str) -> None:
    """Prices and fiat rates as the conversion bench stores them (fresh for the run), and a day of hourly
    BTC/USD candles."""
    await bench_conversion._seed(database_url)
    conn = await asyncpg.connect(make_url(database_url).set(drivername="postgresql").render_as_string(False))
    try:
        rows = [
            ("BTC", "USD", "1h", HISTORY_DAY + timedelta(hours=h), 60000.0 + h, 60100.0 + h, 59900.0 + h,
             60050.0 + h, 12.5, "rollup")
            for h in range(24)
        ]  # fmt: skip
        columns = ["base", "vs", "interval", "t", "open", "high", "low", "close", "volume", "source"]
        await conn.copy_records_to_table("candles", records=rows, columns=columns)
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def platform(database_url: str, redis_url: str) -> AsyncIterator[Platform]:
    ports = {name: free_port() for name in PROCESSES}
    env = {
        **os.environ,
        "COINLYTICS_ENV": "test",
        "COINLYTICS_DATABASE_URL": database_url,
        "COINLYTICS_REDIS_URL": redis_url,
        "COINLYTICS_REDIS_NAMESPACE": f"bench-{secrets.token_hex(4)}",
        "COINLYTICS_JWT_SECRET": secrets.token_urlsafe(48),
        "COINLYTICS_HMAC_KEY": secrets.token_urlsafe(48),
        "COINLYTICS_SOURCES": "binance",  # no ECB fetch: its rates are seeded; no ingest runs at all
        "COINLYTICS_PRICING_URL": f"http://127.0.0.1:{ports['pricing']}",
        "COINLYTICS_CONVERSION_URL": f"http://127.0.0.1:{ports['conversion']}",
        "COINLYTICS_GATEWAY_PORT": str(ports["gateway"]),
        "COINLYTICS_LOG_LEVEL": "WARNING",
        # Anonymous per-IP limits would throttle a one-client load test; the limiter's cost is still paid.
        "COINLYTICS_RATE_LIMIT_ANONYMOUS": "1000000000",
        "COINLYTICS_RATE_LIMIT_USER": "1000000000",
    }
    gateway_url = f"http://127.0.0.1:{ports['gateway']}"
    with (
        service_process("services.pricing", env) as pricing,
        service_process("services.conversion", env) as conversion,
        service_process("services.gateway", env) as gateway,
    ):
        async with aiohttp.ClientSession() as session:
            await wait_ok(session, f"http://127.0.0.1:{ports['pricing']}/healthz", pricing)
            await wait_ok(session, f"http://127.0.0.1:{ports['conversion']}/healthz", conversion)
            await wait_ok(session, gateway_url + "/healthz", gateway)
            for paths in ROUTES.values():
                for path in paths:
                    await wait_ok(session, gateway_url + path, gateway)
        yield Platform(
            gateway_url,
            {name: f"http://127.0.0.1:{port}" for name, port in ports.items()},
            {"gateway": gateway.pid, "pricing": pricing.pid, "conversion": conversion.pid},
        )


async def run(*, database_url: str, redis_url: str, quick: bool, **_: Any) -> list[Figure]:
    if not wrk_available():
        return []
    count = 2_000 if quick else 12_000
    seconds = 4.0 if quick else 15.0
    saturation: dict[str, WrkResult] = {}
    cpu: dict[str, dict[str, float]] = {}
    fixed: dict[str, WrkResult] = {}
    own_health: dict[str, dict[str, float]] = {}
    own_rate: dict[str, float] = {}
    async with scratch_database(database_url) as db:
        await _seed(db)
        async with platform(db, redis_url) as running:
            for name, paths in ROUTES.items():
                distinct = name in DISTINCT.values()
                await saturate(running, paths, 300, distinct=distinct)  # warm: pools, caches, route lookups
                saturation[name], cpu[name] = await saturate(running, paths, count, distinct=distinct)
            for service in ("pricing", "conversion"):
                await saturate(running, ["/healthz"], 300, service=service)
                own, own_health[service] = await saturate(running, ["/healthz"], count, service=service)
                own_rate[service] = own.rate
            for name, paths in ROUTES.items():
                fixed[name] = await at_rate(running, paths, TARGET_RATE, seconds, distinct=name in DISTINCT.values())
    print(f"   {'route':<22} {'req/s':>8} {'non-200':>8}  " + "  ".join(f"{p + ' ms/req':>18}" for p in PROCESSES))
    for name in ROUTES:
        r = saturation[name]
        cells = "  ".join(f"{cpu[name][p]:>18.3f}" for p in PROCESSES)
        print(f"   {name + ' (gateway)':<22} {r.rate:>8,.0f} {r.non2xx + r.socket_errors:>8}  {cells}")
    for service in ("pricing", "conversion"):
        cells = "  ".join(f"{own_health[service][p]:>18.3f}" for p in PROCESSES)
        print(f"   {service + ' own /healthz':<22} {own_rate[service]:>8,.0f} {'':>8}  {cells}")
    print(f"   at {TARGET_RATE} req/s for {seconds:.0f} s ({RATE_CONNECTIONS} connections, paced wrk):")
    for name in ROUTES:
        r = fixed[name]
        flag = "  << below the target rate: latencies understate the queue" if r.rate < TARGET_RATE * 0.95 else ""
        print(
            f"   {name:<14} achieved {r.rate:>6,.0f} req/s  p50 {r.p50_ms:6.1f} ms  p99 {r.p99_ms:6.1f} ms"
            f"  non-200 {r.non2xx + r.socket_errors}{flag}"
        )
    health = saturation["healthz"]
    health_cpu = cpu["healthz"]["gateway"]
    figures = [Figure("gateway: /healthz req/s at saturation", health.rate, "req/s")]
    reads = ("price read", "conversion", *DISTINCT.values(), "history read")
    for name in reads:
        figures.append(
            Figure(
                f"gateway: {name} req/s at saturation", saturation[name].rate, "req/s",
                baseline_name="gateway /healthz, same run", baseline_value=health.rate,
                target=">= 0.35 x baseline" if name in DISTINCT else None,
            )
        )  # fmt: skip
    for name in reads:
        figures.append(
            Figure(
                f"gateway: CPU per {name}", cpu[name]["gateway"], "ms",
                baseline_name="gateway CPU per /healthz, same run", baseline_value=health_cpu,
                target="<= 0.6 ms (issue 14: 2x /healthz)",
            )
        )  # fmt: skip
    figures += [
        Figure(
            "pricing: CPU per price read", cpu[DISTINCT["price read"]]["pricing"], "ms",
            baseline_name="pricing CPU per its own /healthz, same run",
            baseline_value=own_health["pricing"]["pricing"], target="<= 0.4 ms",
        ),
        Figure(
            "conversion: CPU per conversion", cpu[DISTINCT["conversion"]]["conversion"], "ms",
            baseline_name="conversion CPU per its own /healthz, same run",
            baseline_value=own_health["conversion"]["conversion"], target="<= 0.4 ms",
        ),
        Figure(
            "pricing: CPU per history read", cpu["history read"]["pricing"], "ms",
            baseline_name="pricing CPU per its own /healthz, same run", baseline_value=own_health["pricing"]["pricing"],
        ),
    ]  # fmt: skip
    for name in reads:
        figures.append(
            Figure(
                f"gateway: {name} p50 at {TARGET_RATE} req/s", fixed[name].p50_ms, "ms",
                baseline_name=f"/healthz p50 at {TARGET_RATE} req/s", baseline_value=fixed["healthz"].p50_ms,
            )
        )  # fmt: skip
        figures.append(
            Figure(
                f"gateway: {name} p99 at {TARGET_RATE} req/s", fixed[name].p99_ms, "ms",
                baseline_name=f"/healthz p99 at {TARGET_RATE} req/s", baseline_value=fixed["healthz"].p99_ms,
                target="< 50 ms" if name != "history read" else None,
            )
        )  # fmt: skip
    return figures


# --- profiling (py-spy) ----------------------------------------------------------------------------------


def _py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).exists():
        raise SystemExit("py-spy is not installed: .venv/bin/pip install py-spy (a local tool, not a dependency)")
    return found


_LINE = re.compile(r":\d+\)$")
PROJECT_CODE = ("(services/", "(shared/")


def top_entries(folded: str, limit: int = 25) -> str:
    """The ``limit`` functions with the most samples, from py-spy's raw (collapsed-stack) output: by self
    time (the frame on top of the stack), by total time for the project's own functions, and by total time
    for all. Lines of one function are counted together; a thread's root frame is left out."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in folded.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        samples += count
        frames = [_LINE.sub(")", f) for f in stack.split(";") if not f.startswith(("thread (", "process "))]
        if not frames:
            continue
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    project = collections.Counter({f: c for f, c in total.items() if any(p in f for p in PROJECT_CODE)})
    lines = [f"{samples} samples (busy only: py-spy leaves out idle threads)"]
    for title, counter in (
        ("self (top of stack)", own),
        ("total, project code only (services/, shared/)", project),
        ("total (anywhere on the stack)", total),
    ):
        lines += ["", f"top {limit} by {title}:", f"{'samples':>8} {'share':>6}  function (file)"]
        for frame, count in counter.most_common(limit):
            lines.append(f"{count:>8} {count / max(1, samples):>6.1%}  {frame}")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def _recording(pid: int, seconds: int, out: Path, *, native: bool) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(
        [_py_spy(), "record", "-p", str(pid), "-d", str(seconds), "-r", "200", "--format", "raw", "-o", str(out),
         "--threads", *(["--native"] if native else ["--nonblocking"])],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        yield process
    finally:
        if process.poll() is None:
            process.wait(timeout=seconds + 30)


async def profile(
    database_url: str, redis_url: str, seconds: int, raw: dict[str, Path], *, native: bool, route: str
) -> tuple[float, dict[str, str]]:
    """py-spy on the gateway and pricing (raw output to ``raw[name]``) under price reads; returns the rate wrk
    kept up while recording and what each py-spy printed on stderr."""
    async with scratch_database(database_url) as db:
        await _seed(db)
        async with platform(db, redis_url) as running:
            paths = ROUTES[route]
            await saturate(running, paths, 300, distinct=route in DISTINCT.values())
            with (
                _recording(running.pids["gateway"], seconds, raw["gateway"], native=native) as gateway,
                _recording(running.pids["pricing"], seconds, raw["pricing"], native=native) as pricing,
            ):
                # The same closed loop as the saturation figure, running a little past the recording.
                distinct = _lua_bool(route in DISTINCT.values())
                script = _SATURATION_LUA % {"paths": _lua_paths(paths), "count": 10**9, "distinct": distinct}
                result = await _wrk(
                    running.gateway_url, script, connections=SATURATION_CONNECTIONS, seconds=seconds + 2
                )
            errors = {}
            for name, recorder in (("gateway", gateway), ("pricing", pricing)):
                stderr = recorder.stderr.read().decode(errors="replace") if recorder.stderr else ""
                if recorder.returncode != 0:
                    raise SystemExit(f"py-spy failed on {name} ({recorder.returncode}): {stderr[-500:]}")
                errors[name] = stderr
    return result.rate, errors


def main() -> None:
    parser = argparse.ArgumentParser(description="profile the gateway and pricing under load (py-spy)")
    parser.add_argument("command", choices=["profile"])
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--route", choices=list(ROUTES), default="price read")
    parser.add_argument(
        "--native", action="store_true", help="also sample C frames (py-spy --native; pauses the process per sample)"
    )
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    from bench.common import servers

    _py_spy()  # fail before starting anything
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="coinlytics-bench-") as tmp, servers(Path(tmp)) as (db, redis):
        # The collapsed stacks stay beside the summaries (for a flame graph: flamegraph.pl or speedscope).
        raw = {name: args.out / f"profile-{name}.folded" for name in ("gateway", "pricing")}
        rate, _ = asyncio.run(profile(db, redis, args.seconds, raw, native=args.native, route=args.route))
        for name, path in raw.items():
            header = (
                f"py-spy record -r 200 --threads {'--native' if args.native else '--nonblocking'}: "
                f"{args.seconds} s of the {name} process under {args.route} requests "
                f"(GET {ROUTES[args.route][0]} through the gateway, wrk -c{SATURATION_CONNECTIONS}, "
                f"{rate:,.0f} req/s while recorded)\n"
            )
            target = args.out / f"profile-{name}.txt"
            target.write_text(header + top_entries(path.read_text()))
            print(f"wrote {target}")


if __name__ == "__main__":
    main()
