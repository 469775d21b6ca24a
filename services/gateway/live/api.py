"""The live websocket route, ``WS /api/v1/ws``: the protocol is services/gateway/live/service.py's."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, WebSocket

from services.gateway.live.service import LiveHub
from shared.errors import UpgradeRequired
from shared.service_app import lifespan_state

router = APIRouter()

Hub = Annotated[LiveHub, Depends(lifespan_state("live_hub", LiveHub))]


@router.websocket("/api/v1/ws", name="live")
async def live(websocket: WebSocket, hub: Hub) -> None:
    """Prices of ``?symbols=BTC,ETH&vs=USD`` as they are consolidated; with an access token also the
    caller's alert events. Frames and close codes: README.md, "Live push"."""
    await hub.serve(websocket)


@router.get("/api/v1/ws", include_in_schema=False)
async def live_over_http() -> None:
    # A plain GET (curl, a browser tab) is told what this address wants, not "not routed".
    raise UpgradeRequired(
        "this is a websocket: connect with ws:// (or wss://) and Upgrade: websocket", headers={"Upgrade": "websocket"}
    )
