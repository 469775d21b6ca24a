"""Routes: the tracked-coins overview and detail, and the admin endpoints that change the coin list."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query

from services.pricing.coins.schemas import AdminCoinOut, AdminCoinsOut, CoinCreateIn, CoinDetailOut, CoinOut
from services.pricing.coins.service import CoinsService
from shared.auth import require_admin
from shared.errors import ValidationFailed, error_responses
from shared.responses import DecimalJSONResponse
from shared.service_app import lifespan_state
from shared.validation import SYMBOL_PATTERN, SYMBOL_RE

router = APIRouter(tags=["market data"])
# The role is checked here too, not only by the internal-auth middleware: a route stays closed even if
# the middleware is misconfigured or bypassed.
admin_router = APIRouter(tags=["admin"], dependencies=[Depends(require_admin)])

MAX_PER_PAGE = 250
MAX_PAGE = 10_000


Coins = Annotated[CoinsService, Depends(lifespan_state("coins", CoinsService))]


def _symbol(raw: str) -> str:
    symbol = raw.strip().upper()
    if not SYMBOL_RE.match(symbol):
        raise ValidationFailed(f"not a coin symbol: {raw[:20]!r} (letters and digits, 1-15)", details={"symbol": raw})
    return symbol


def _currency(raw: str) -> str:
    vs = raw.strip().upper()
    if not SYMBOL_RE.match(vs):
        raise ValidationFailed(f"vs: not a currency code: {raw[:20]!r}", details={"vs": raw})
    return vs


@router.get(
    "/api/v1/coins",
    response_model=list[CoinOut],
    summary="Tracked coins with price, market cap, volume and 1h/24h/7d changes",
    description="Active tracked coins ordered by market cap (largest first; coins without one last), one page at a "
    "time. Prices and volumes are our consolidated values; market cap is CoinGecko's circulating supply times our "
    "price; changes are computed from our own candles (null while there is no history that far back). The total "
    "number of coins is in the `X-Total-Count` header.\n\n"
    "Example: `/api/v1/coins?vs=EUR&page=1&per_page=50`",
    responses=error_responses(404, 422),
)
async def list_coins(
    coins: Coins,
    vs: str = Query(
        default="USD", pattern=SYMBOL_PATTERN, description="currency of prices and market caps", examples=["USD"]
    ),
    page: int = Query(default=1, ge=1, le=MAX_PAGE, description="page number, from 1"),
    per_page: int = Query(default=100, ge=1, le=MAX_PER_PAGE, description="coins per page, 1-250"),
) -> DecimalJSONResponse:
    entries, total = await coins.list_coins(_currency(vs), page, per_page)
    return DecimalJSONResponse(
        entries, headers={"X-Total-Count": str(total), "X-Page": str(page), "X-Per-Page": str(per_page)}
    )


@router.get(
    "/api/v1/coins/{symbol}",
    response_model=CoinDetailOut,
    summary="One tracked coin in detail",
    description="Price, market cap, volume and changes as in the list, plus CoinGecko's circulating and total supply, "
    "how the market cap was computed, and every source's latest quote with its status in consolidation.\n\n"
    "Example: `/api/v1/coins/btc?vs=USD`",
    responses=error_responses(404, 422),
)
async def coin_detail(
    coins: Coins,
    symbol: str = Path(pattern=SYMBOL_PATTERN, examples=["BTC"]),
    vs: str = Query(default="USD", pattern=SYMBOL_PATTERN, examples=["USD"]),
) -> DecimalJSONResponse:
    return DecimalJSONResponse(await coins.coin_detail(_symbol(symbol), _currency(vs)))


@admin_router.get(
    "/api/v1/admin/coins",
    response_model=AdminCoinsOut,
    summary="Every coin ever tracked, active or removed (admin)",
    description='Example: `GET /api/v1/admin/coins` → `{"coins": [{"symbol": "BTC", "active": true, ...}]}`',
    responses=error_responses(401, 403),
)
async def admin_list_coins(coins: Coins) -> DecimalJSONResponse:
    return DecimalJSONResponse({"coins": await coins.admin_list()})


@admin_router.post(
    "/api/v1/admin/coins",
    response_model=AdminCoinOut,
    status_code=201,
    summary="Track a coin, or track a removed one again (admin)",
    description="201 when the coin is new, 200 when it was reactivated or already tracked. Ingest picks the change "
    "up without a restart (it re-reads the coins table every `COINLYTICS_COINS_REFRESH_SECONDS`).\n\n"
    'Example: `POST /api/v1/admin/coins` with `{"symbol": "MATIC", "name": "Polygon"}`',
    responses={
        200: {"description": "Reactivated or already tracked", "model": AdminCoinOut},
        **error_responses(401, 403, 422),
    },
)
async def admin_add_coin(coins: Coins, body: CoinCreateIn) -> DecimalJSONResponse:
    view = await coins.add_coin(_symbol(body.symbol), body.name)
    return DecimalJSONResponse(view, status_code=201 if view["change"] == "added" else 200)


@admin_router.delete(
    "/api/v1/admin/coins/{symbol}",
    response_model=AdminCoinOut,
    summary="Stop tracking a coin (admin)",
    description="The coin is deactivated, not deleted: its history stays and POST brings it back.\n\n"
    "Example: `DELETE /api/v1/admin/coins/MATIC`",
    responses=error_responses(401, 403, 404, 422),
)
async def admin_remove_coin(
    coins: Coins, symbol: str = Path(pattern=SYMBOL_PATTERN, examples=["MATIC"])
) -> DecimalJSONResponse:
    return DecimalJSONResponse(await coins.remove_coin(_symbol(symbol)))
