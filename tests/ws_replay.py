"""A local websocket server that plays an exchange's side of a recorded session.

On connect it sends ``greeting`` frames (e.g. Kraken's systemStatus); when the client subscribes it answers
with the recorded acknowledgement(s), then replays the recorded frames. The replay position is shared by all
connections, so a client that reconnects after a drop gets the rest of the recording, not the start again.
``drop_after(n)`` closes the current connection after ``n`` more frames; ``pongs`` answers app-level pings.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import WSMsgType, web


def ndjson(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()]


@dataclass
class WsReplayServer:
    frames: list[str]
    acks: list[str] = field(default_factory=list)
    greeting: list[str] = field(default_factory=list)
    # Client text -> the server's reply (e.g. "ping" -> "pong").
    pongs: dict[str, str] = field(default_factory=dict)
    interval: float = 0.0
    received: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    connections: int = 0
    position: int = 0
    base_url: str = ""
    _drop_after: int | None = None
    _runner: web.AppRunner | None = None
    _open: set[web.WebSocketResponse] = field(default_factory=set)

    def drop_after(self, frames: int) -> None:
        self._drop_after = frames

    def subscribes(self) -> list[object]:
        return [json.loads(m) for m in self.received if m.startswith("{")]

    async def _handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        self._open.add(ws)
        self.connections += 1
        self.paths.append(str(request.rel_url))
        for frame in self.greeting:
            await ws.send_str(frame)
        replay: asyncio.Task[None] | None = None
        # Binance names its streams in the URL: there is no subscribe message to wait for.
        if "streams=" in request.rel_url.query_string:
            replay = asyncio.create_task(self._replay(ws))
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                self.received.append(msg.data)
                if msg.data in self.pongs:
                    await ws.send_str(self.pongs[msg.data])
                    continue
                if replay is None:
                    for ack in self.acks:
                        await ws.send_str(ack)
                    replay = asyncio.create_task(self._replay(ws))
        finally:
            self._open.discard(ws)
            if replay is not None:
                replay.cancel()
        return ws

    async def _replay(self, ws: web.WebSocketResponse) -> None:
        sent = 0
        while self.position < len(self.frames) and not ws.closed:
            if self._drop_after is not None and sent >= self._drop_after:
                self._drop_after = None
                await ws.close()
                return
            await ws.send_str(self.frames[self.position])
            self.position += 1
            sent += 1
            await asyncio.sleep(self.interval)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        sockets = site._server.sockets if site._server else []
        self.base_url = f"ws://127.0.0.1:{sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        # Open sockets would hold the server's shutdown until its timeout.
        for ws in list(self._open):
            await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()
