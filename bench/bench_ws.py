"""Live websocket fan-out: from a price entering the prices stream to its frame received by each of 1,000
connected clients (p50 and p99), beside the same measured with 10 clients in the same run; and the
gateway's resident memory per 1,000 open sockets.

The gateway runs as its own process on real uvicorn (``python -m services.gateway``), the clients in
another (this module run with ``client``: a bare websocket client on uvloop), so neither shares the other's
core. Each update's event id carries its publish time (taken just before the XADD); a client subtracts it
from the moment the frame arrives. Updates are spaced so that each one's fan-out is measured on its own,
not queued behind the previous one. Target (issue 10): p99 under 100 ms for 1,000 clients.

Also measured: the same 1,000 clients with permessage-deflate negotiated, as browsers do (each frame is then
compressed once per socket)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import secrets
import sys
import time
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import aiohttp
import asyncpg
from redis.asyncio import Redis
from sqlalchemy.engine import make_url

from bench.common import Figure, scratch_database, service_process, wait_ok
from shared.embedded import free_port
from shared.streams import PRICES_STREAM, StreamPublisher

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = 1_000
BASELINE_CLIENTS = 10
# Between updates: well above one fan-out, so each update is measured alone.
GAP_SECONDS = 0.2


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))] if ordered else float("nan")


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


@contextlib.asynccontextmanager
async def _gateway(database_url: str, redis_url: str, namespace: str) -> AsyncIterator[tuple[str, int]]:
    port = free_port()
    env = {
        **os.environ,
        "COINLYTICS_ENV": "test",
        "COINLYTICS_DATABASE_URL": database_url,
        "COINLYTICS_REDIS_URL": redis_url,
        "COINLYTICS_REDIS_NAMESPACE": namespace,
        "COINLYTICS_JWT_SECRET": secrets.token_urlsafe(48),
        "COINLYTICS_HMAC_KEY": secrets.token_urlsafe(48),
        "COINLYTICS_GATEWAY_PORT": str(port),
        "COINLYTICS_LOG_LEVEL": "WARNING",
        # 1,000 connects from one address inside a minute: the limiter's cost is paid, its limit is not hit.
        "COINLYTICS_RATE_LIMIT_ANONYMOUS": "1000000000",
        "COINLYTICS_RATE_LIMIT_USER": "1000000000",
    }
    url = f"http://127.0.0.1:{port}"
    with service_process("services.gateway", env) as process:
        async with aiohttp.ClientSession() as session:
            await wait_ok(session, url + "/healthz", process)
        yield url, process.pid


async def _fan_out(
    ws_url: str, publisher: StreamPublisher, clients: int, updates: int, *, compress: bool, gateway_pid: int
) -> tuple[list[float], int, float]:
    """Latencies (ms) of every frame received, how many frames were expected, and the gateway's RSS (MiB)
    while the clients were connected."""
    args = [sys.executable, "-m", "bench.bench_ws", "client", ws_url, str(clients), str(updates)]
    if compress:
        args.append("--compress")
    client = await asyncio.create_subprocess_exec(
        # The report is one line of every latency: far past the default 64 KiB line limit.
        *args,
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        limit=2**26,
    )
    assert client.stdin is not None and client.stdout is not None
    try:
        line = await asyncio.wait_for(client.stdout.readline(), timeout=60)
        if not line.startswith(b"connected"):
            raise RuntimeError(f"the client process did not connect: {line!r}")
        for i in range(updates):
            payload = {
                "event_id": f"{i}-{time.time_ns()}", "base": "BTC", "vs": "USD", "price": f"{60000 + i}.5",
                "volume_24h": "1", "status": "fresh", "sources_used": 3, "sources_total": 3, "method": "vwap-mad2.5",
                "last_updated": "2026-11-25T10:00:00Z", "fresh_until": "2026-11-25T10:01:00Z", "spread_pct": "0.01",
            }  # fmt: skip
            await publisher.publish(PRICES_STREAM, payload)
            await asyncio.sleep(GAP_SECONDS)
        result = json.loads(await asyncio.wait_for(client.stdout.readline(), timeout=60))
        rss = _rss_mib(gateway_pid)
        client.stdin.write(b"stop\n")
        await client.stdin.drain()
        await asyncio.wait_for(client.wait(), timeout=30)
    finally:
        if client.returncode is None:
            client.kill()
            await client.wait()
    return result["latencies_ms"], result["expected"], rss


async def run(*, database_url: str, redis_url: str, quick: bool, **_: Any) -> list[Figure]:
    updates = 8 if quick else 25
    namespace = f"bench-{secrets.token_hex(4)}"
    async with scratch_database(database_url) as db:
        conn = await asyncpg.connect(make_url(db).set(drivername="postgresql").render_as_string(False))
        try:
            await conn.execute("INSERT INTO coins (symbol, name, active) VALUES ('BTC', 'Bitcoin', true)")
        finally:
            await conn.close()
        redis = Redis.from_url(redis_url)
        publisher = StreamPublisher(redis, namespace=namespace, maxlen=10_000)
        try:
            async with _gateway(db, redis_url, namespace) as (url, pid):
                ws_url = url.replace("http://", "ws://") + "/api/v1/ws?symbols=BTC&vs=USD"
                # Warm-up: the route, the tracked-coins cache and the hub's first read, then the idle RSS.
                await _fan_out(ws_url, publisher, 1, 2, compress=False, gateway_pid=pid)
                idle_rss = _rss_mib(pid)
                many, many_expected, many_rss = await _fan_out(
                    ws_url, publisher, CLIENTS, updates, compress=False, gateway_pid=pid
                )
                few, few_expected, _few_rss = await _fan_out(
                    ws_url, publisher, BASELINE_CLIENTS, updates, compress=False, gateway_pid=pid
                )
                deflated, deflated_expected, _deflated_rss = await _fan_out(
                    ws_url, publisher, CLIENTS, updates, compress=True, gateway_pid=pid
                )
        finally:
            keys = [key async for key in redis.scan_iter(match=f"{namespace}:*", count=500)]
            if keys:
                await redis.delete(*keys)
            await redis.aclose()
    for label, got, expected in (
        (f"{CLIENTS} clients", many, many_expected),
        (f"{BASELINE_CLIENTS} clients", few, few_expected),
        (f"{CLIENTS} clients, deflate", deflated, deflated_expected),
    ):
        print(f"   {label}: {len(got):,} of {expected:,} frames received")
    per_thousand = (many_rss - idle_rss) * 1000 / CLIENTS
    return [
        Figure(
            f"websocket fan-out p50, {CLIENTS:,} clients", _percentile(many, 0.5), "ms",
            baseline_name=f"{BASELINE_CLIENTS} clients, same run", baseline_value=_percentile(few, 0.5),
        ),
        Figure(
            f"websocket fan-out p99, {CLIENTS:,} clients", _percentile(many, 0.99), "ms",
            baseline_name=f"{BASELINE_CLIENTS} clients, same run", baseline_value=_percentile(few, 0.99),
            target="< 100 ms",
        ),
        Figure(
            f"websocket fan-out p99, {CLIENTS:,} clients, deflate", _percentile(deflated, 0.99), "ms",
            baseline_name=f"{CLIENTS:,} clients without compression", baseline_value=_percentile(many, 0.99),
        ),
        Figure(
            "gateway RSS per 1,000 open sockets", per_thousand, "MiB",
            baseline_name="gateway RSS with no socket open", baseline_value=idle_rss,
        ),

    ]  # fmt: skip


# --- the client process ------------------------------------------------------------------------------
# A bare RFC 6455 client on an asyncio Protocol: frames are parsed in data_received, with no task or queue
# per message, so the load generator costs far less than the server it measures and a frame's arrival is
# stamped when its bytes are read.


class _Client(asyncio.Protocol):
    def __init__(self, host: str, path: str, compress: bool, latencies: list[float], updates: int) -> None:
        self.request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\nSec-WebSocket-Version: 13\r\n"
            + ("Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n" if compress else "")
            + "\r\n"
        ).encode()
        self.latencies = latencies
        self.updates = updates
        self.received = 0
        self.buffer = b""
        self.upgraded = False
        self.inflate: Any = None
        self.welcomed = asyncio.get_running_loop().create_future()
        self.done = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports don't subclass asyncio's
        self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.welcomed.done():
            self.welcomed.set_exception(ConnectionError(f"the server closed the socket: {exc}"))
        if not self.done.done():
            self.done.set_result(None)  # nothing more arrives: the report counts what did

    def data_received(self, data: bytes) -> None:
        arrived = time.time_ns()
        self.buffer += data
        if not self.upgraded:
            head, found, rest = self.buffer.partition(b"\r\n\r\n")
            if not found:
                return
            if b" 101 " not in head.split(b"\r\n", 1)[0]:
                raise RuntimeError(f"the upgrade was refused: {head[:200]!r}")
            if b"permessage-deflate" in head.lower():
                self.inflate = zlib.decompressobj(-zlib.MAX_WBITS)
            self.upgraded, self.buffer = True, rest
        while len(self.buffer) >= 2:
            first, length = self.buffer[0], self.buffer[1] & 0x7F
            offset = 2
            if length == 126:
                length, offset = int.from_bytes(self.buffer[2:4], "big"), 4
            elif length == 127:
                length, offset = int.from_bytes(self.buffer[2:10], "big"), 10
            if len(self.buffer) < offset + length:
                return
            payload, self.buffer = self.buffer[offset : offset + length], self.buffer[offset + length :]
            self._frame(first, payload, arrived)

    def _frame(self, first: int, payload: bytes, arrived: int) -> None:
        opcode = first & 0x0F
        if opcode == 0x9:  # ping: answer with a masked pong, as a client must
            mask = os.urandom(4)
            masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            assert self.transport is not None
            self.transport.write(bytes([0x8A, 0x80 | len(payload)]) + mask + masked)
            return
        if opcode != 0x1:
            return
        if first & 0x40 and self.inflate is not None:
            payload = self.inflate.decompress(payload + b"\x00\x00\xff\xff")
        if b'"type":"welcome"' in payload:
            if not self.welcomed.done():
                self.welcomed.set_result(None)
        elif b'"type":"price"' in payload:
            published = int(json.loads(payload)["event_id"].split("-")[1])
            self.latencies.append(round((arrived - published) / 1e6, 3))
            self.received += 1
            if self.received >= self.updates and not self.done.done():
                self.done.set_result(None)


async def _clients(url: str, count: int, updates: int, compress: bool) -> None:
    """Opens ``count`` sockets, says so, records each price frame's latency until every socket has
    ``updates`` of them (or nothing more can arrive), reports, then holds the sockets until told to stop."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    opening = asyncio.Semaphore(100)

    async def open_one() -> _Client:
        async with opening:
            _, client = await loop.create_connection(
                lambda: _Client(f"{host}:{port}", path, compress, latencies, updates), host, port
            )
            await asyncio.wait_for(client.welcomed, timeout=30)
            return client

    clients = await asyncio.gather(*(open_one() for _ in range(count)))
    print(f"connected {count}", flush=True)
    await asyncio.wait([c.done for c in clients], timeout=updates * GAP_SECONDS + 20)
    print(json.dumps({"latencies_ms": latencies, "expected": count * updates}), flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    for client in clients:
        if client.transport is not None:
            client.transport.close()


def _client_main(argv: list[str]) -> None:
    import uvloop

    url, count, updates = argv[0], int(argv[1]), int(argv[2])
    uvloop.run(_clients(url, count, updates, "--compress" in argv))


if __name__ == "__main__" and sys.argv[1:2] == ["client"]:
    _client_main(sys.argv[2:])
