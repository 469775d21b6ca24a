"""A local HTTP server that replays recorded exchange responses, with faults on demand."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web


def strip_jsonc(text: str) -> str:
    """Documentation examples carry ``// comments``; drop them (outside strings) to get JSON."""
    return re.sub(r'("(?:\\.|[^"\\])*")|//[^\n]*', lambda m: m.group(1) or "", text)


@dataclass
class Reply:
    body: bytes
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


class ReplayServer:
    """Serves ``Reply`` objects by path; ``fail_next`` queues faults that take precedence once each."""

    def __init__(self) -> None:
        self.routes: dict[str, Reply] = {}
        self.faults: dict[str, list[Reply]] = {}
        self.requests: list[str] = []
        self.queries: list[tuple[str, dict[str, str]]] = []
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    def serve(
        self, path: str, body: bytes | str | Path, *, status: int = 200, headers: dict[str, str] | None = None
    ) -> None:
        if isinstance(body, Path):
            body = body.read_bytes()
        elif isinstance(body, str):
            body = body.encode()
        self.routes[path] = Reply(body=body, status=status, headers=headers or {"Content-Type": "application/json"})

    def fail_next(self, path: str, reply: Reply, times: int = 1) -> None:
        self.faults.setdefault(path, []).extend([reply] * times)

    def count(self, path: str) -> int:
        return sum(1 for p in self.requests if p == path)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        self.requests.append(path)
        self.queries.append((path, dict(request.query)))
        queued = self.faults.get(path)
        reply = queued.pop(0) if queued else self.routes.get(path)
        if reply is None:
            return web.json_response({"code": -1, "msg": f"no recorded reply for {path}"}, status=404)
        if reply.delay:
            await asyncio.sleep(reply.delay)
        headers = {"Content-Type": "application/json", **reply.headers}
        return web.Response(body=reply.body, status=reply.status, headers=headers)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        sockets = site._server.sockets if site._server else []
        port = sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def serve_binance(server: ReplayServer, fixtures: Path) -> None:
    """Binance's recorded market list and its recorded 24h ticker list (same shape on /api/v3)."""
    binance = fixtures / "binance"
    server.serve("/api/v3/exchangeInfo", binance / "rec_api_v3_exchangeInfo_FULL_2021-10-12.json")
    server.serve("/api/v3/ticker/24hr", binance / "rec_api_v1_ticker_24hr_ALL_2019-08-22.json")
