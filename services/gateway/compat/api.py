"""Routes of the CoinGecko-compatible API (/api/v3): CoinGecko's paths and parameters, its field names and its
error shape, over our own services (services/gateway/compat/service.py).

Parameters are taken as plain strings and checked here, so a bad one answers CoinGecko's
``{"error": "..."}`` with a 400 rather than our validation shape. The caller is resolved and rate limited
by the gateway's one resolver (services/gateway/guard.py ``resolve``): whatever credential it accepts
(a bearer token today, a personal API key once the gateway takes them, including CoinGecko's
``x-cg-demo-api-key``/``x-cg-pro-api-key`` headers and query parameters) works here unchanged. Those
CoinGecko key parameters are accepted and otherwise ignored by these routes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.routing import APIRoute

from services.gateway.compat import schemas
from services.gateway.compat.service import (
    CHART_INTERVALS,
    MARKET_ORDERS,
    MAX_HISTORY_START,
    OHLC_INTERVALS,
    PRICE_CHANGE_WINDOWS,
    CompatError,
    CompatService,
    bad_request,
    parse_bool,
    parse_days,
    parse_moment,
    parse_positive_int,
    parse_precision,
    split_list,
)
from services.gateway.guard import resolve
from shared.auth import Principal
from shared.errors import AppError
from shared.service_app import lifespan_state

TAG = "CoinGecko-compatible"


class CoinGeckoRoute(APIRoute):
    """A route whose parameter errors answer CoinGecko's ``{"error": "..."}`` with a 400 instead of our 422
    shape: the parameters keep their types and enums in the spec, and a client written for CoinGecko still
    reads the error it knows."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def checked(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                return JSONResponse({"error": validation_message(exc)}, status_code=400)

        return checked


def validation_message(exc: RequestValidationError) -> str:
    errors = exc.errors()
    first = errors[0] if errors else {}
    location = first.get("loc") or ()
    name = str(location[-1]) if location else "parameter"
    if first.get("type") == "missing":
        return f"Missing parameter {name}"
    return f"invalid {name}"


router = APIRouter(prefix="/api/v3", tags=[TAG], route_class=CoinGeckoRoute)
Compat = Annotated[CompatService, Depends(lifespan_state("compat", CompatService))]

MAX_IDS = 250
CG_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "A bad parameter: CoinGecko's shape", "model": schemas.CGErrorOut},
    404: {"description": "Unknown coin: `{\"error\": \"coin not found\"}`", "model": schemas.CGErrorOut},
    429: {"description": "Rate limited (Retry-After): CoinGecko's status shape", "model": schemas.CGStatusErrorOut},
    502: {"description": "A service behind the route is unavailable", "model": schemas.CGStatusErrorOut},
    503: {"description": "No fresh price yet (with Retry-After)", "model": schemas.CGStatusErrorOut},
    504: {"description": "A service behind the route did not answer in time", "model": schemas.CGStatusErrorOut},
}  # fmt: skip
PRECISION = "decimal places of prices and amounts: `full` or 0-18"
Ids = Query(None, description="CoinGecko coin ids, comma-separated (see /coins/list)", examples=["bitcoin,ethereum"])
VsCurrency = Query(description="a currency of /simple/supported_vs_currencies", examples=["usd"])
Precision = Query(None, description=PRECISION, examples=["2"])
PrecisionChoice = Literal[
    "full", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16", "17", "18"
]
MarketOrder = Literal["market_cap_desc", "market_cap_asc", "volume_desc", "volume_asc", "id_asc", "id_desc"]
TickerOrder = Literal["trust_score_desc", "trust_score_asc", "volume_desc", "volume_asc"]
ChartInterval = Literal["1m", "5m", "hourly", "daily"]
WINDOW = "(1h|24h|7d|14d|30d|200d|1y)"
DAYS_PATTERN = "^(max|[1-9][0-9]{0,3})$"
MOMENT_PATTERN = "^([0-9]{1,11}|[0-9]{4}-[0-9]{2}-[0-9]{2}(T[0-9]{2}:[0-9]{2}(:[0-9]{2})?Z?)?)$"
Days = Query(description="a whole number of days (up to 9999), or max", pattern=DAYS_PATTERN, examples=["1"])


async def answer(request: Request, work: Callable[[Principal], Awaitable[Any]]) -> JSONResponse:
    """Runs ``work`` for the resolved caller; any failure is answered in CoinGecko's error shape (the
    correlation id header is set by the gateway's middleware on every answer, errors included)."""
    try:
        principal = await resolve(request)
        return JSONResponse(await work(principal))
    except CompatError as exc:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)
    except AppError as exc:  # the resolver's 401/429 (and anything of ours that reaches here)
        failure = CompatError(exc.status, exc.message, headers=exc.headers)
        return JSONResponse(failure.body(), status_code=failure.status, headers=failure.headers)


@router.get("/ping", response_model=schemas.PingOut, summary="Check the API server status", responses=CG_ERRORS)
async def ping(request: Request) -> JSONResponse:
    async def work(_: Principal) -> dict[str, str]:
        return {"gecko_says": "(V3) To the Moon!"}

    return await answer(request, work)


@router.get(
    "/simple/price",
    response_model=schemas.SimplePriceOut,
    summary="Consolidated prices by CoinGecko id or symbol",
    description="Our consolidated price (`/api/v1/prices`) under CoinGecko's keys: `{id: {usd: …, usd_market_cap: …, "
    "usd_24h_vol: …, usd_24h_change: …, last_updated_at: <unix s>}}`. Unknown ids and currencies are left out, "
    "as CoinGecko does. Example: `/api/v3/simple/price?ids=bitcoin&vs_currencies=usd,eur&include_market_cap=true`",
    responses=CG_ERRORS,
)
async def simple_price(
    request: Request,
    compat: Compat,
    ids: str | None = Ids,
    symbols: str | None = Query(None, description="coin symbols, comma-separated", examples=["btc,eth"]),
    vs_currencies: str = Query(description="currencies, comma-separated", examples=["usd"]),
    include_market_cap: bool | None = Query(None, examples=[True]),
    include_24hr_vol: bool | None = Query(None, examples=[True]),
    include_24hr_change: bool | None = Query(None, examples=[True]),
    include_last_updated_at: bool | None = Query(None, examples=[True]),
    precision: PrecisionChoice | None = Precision,
) -> JSONResponse:
    async def work(principal: Principal) -> Any:
        wanted_ids, wanted_symbols = split_list(ids), split_list(symbols)
        if not wanted_ids and not wanted_symbols:
            raise bad_request("Missing parameter ids")
        currencies = split_list(vs_currencies)
        if not currencies:
            raise bad_request("Missing parameter vs_currencies")
        if len(wanted_ids) + len(wanted_symbols) > MAX_IDS:
            raise bad_request(f"at most {MAX_IDS} ids per request")
        return await compat.simple_price(
            principal,
            ids=wanted_ids,
            symbols=wanted_symbols,
            vs_currencies=currencies,
            market_cap=parse_bool(include_market_cap, "include_market_cap"),
            volume=parse_bool(include_24hr_vol, "include_24hr_vol"),
            change=parse_bool(include_24hr_change, "include_24hr_change"),
            last_updated=parse_bool(include_last_updated_at, "include_last_updated_at"),
            precision=parse_precision(precision),
        )

    return await answer(request, work)


@router.get(
    "/simple/supported_vs_currencies",
    response_model=list[str],
    summary="Currencies prices are published in",
    description="COINLYTICS_VS_CURRENCIES, lower-case.",
    responses=CG_ERRORS,
)
async def supported_vs_currencies(request: Request, compat: Compat) -> JSONResponse:
    async def work(_: Principal) -> list[str]:
        return compat.supported_vs()

    return await answer(request, work)


@router.get(
    "/coins/list",
    response_model=list[schemas.CoinListItem],
    summary="Every tracked coin with its CoinGecko id",
    responses=CG_ERRORS,
)
async def coins_list(
    request: Request,
    compat: Compat,
    include_platform: bool | None = Query(None, examples=[False]),
    status: Literal["active", "inactive"] | None = Query(
        None, description="active (we list no inactive coins)", examples=["active"]
    ),
) -> JSONResponse:
    async def work(principal: Principal) -> Any:
        platform = parse_bool(include_platform, "include_platform")
        if status not in (None, "", "active", "inactive"):
            raise bad_request("invalid status: use active or inactive")
        return [] if status == "inactive" else await compat.coins_list(principal, platform)

    return await answer(request, work)


@router.get(
    "/coins/markets",
    response_model=list[schemas.MarketOut],
    summary="Tracked coins with price, market cap and volume",
    description="`/api/v1/coins` in CoinGecko's shape. Fields we do not know (image, all-time high/low, "
    "fully diluted valuation, 24 h high/low) are null. Example: `/api/v3/coins/markets?vs_currency=usd`",
    responses=CG_ERRORS,
)
async def coins_markets(
    request: Request,
    compat: Compat,
    vs_currency: str = VsCurrency,
    ids: str | None = Ids,
    symbols: str | None = Query(None, description="coin symbols, comma-separated", examples=["btc"]),
    order: MarketOrder | None = Query(None, description="default market_cap_desc", examples=["market_cap_desc"]),
    per_page: int | None = Query(None, ge=1, le=250, description="default 100", examples=[100]),
    page: int | None = Query(None, ge=1, le=10_000, examples=[1]),
    sparkline: bool | None = Query(None, description="7 days of hourly closes", examples=[False]),
    price_change_percentage: str | None = Query(
        None,
        description="comma-separated: 1h, 24h, 7d, 14d, 30d, 200d, 1y",
        pattern=f"^{WINDOW}(,{WINDOW})*$",
        examples=["1h,24h,7d"],
    ),
    precision: PrecisionChoice | None = Precision,
) -> JSONResponse:
    async def work(principal: Principal) -> Any:
        vs = compat.check_vs(vs_currency)
        chosen_order = order or "market_cap_desc"
        if chosen_order not in MARKET_ORDERS:
            raise bad_request("invalid order")
        windows = [w.lower() for w in split_list(price_change_percentage)]
        if any(w not in PRICE_CHANGE_WINDOWS for w in windows):
            raise bad_request("invalid price_change_percentage")
        return await compat.markets(
            principal,
            vs=vs,
            ids=split_list(ids),
            symbols=split_list(symbols),
            order=chosen_order,
            per_page=parse_positive_int(per_page, "per_page", 100, 250),
            page=parse_positive_int(page, "page", 1, 10_000),
            sparkline=parse_bool(sparkline, "sparkline"),
            windows=list(dict.fromkeys(windows)),
            precision=parse_precision(precision),
        )

    return await answer(request, work)


@router.get(
    "/coins/{id}",
    response_model=schemas.CoinOut,
    summary="One coin: market data in every published currency, and its tickers",
    description="`/api/v1/coins/{symbol}` in CoinGecko's shape; what we do not know (image, links, genesis date, "
    "categories…) is null or empty.",
    responses=CG_ERRORS,
)
async def coin(
    request: Request,
    compat: Compat,
    coin_id: str = Path(alias="id", description="CoinGecko coin id", examples=["bitcoin"]),
    localization: bool | None = Query(None, description="default true", examples=[False]),
    tickers: bool | None = Query(None, description="default true", examples=[True]),
    market_data: bool | None = Query(None, description="default true", examples=[True]),
    community_data: bool | None = Query(None, description="accepted, no effect", examples=[False]),
    developer_data: bool | None = Query(None, description="accepted, no effect", examples=[False]),
    sparkline: bool | None = Query(None, examples=[False]),
) -> JSONResponse:
    async def work(principal: Principal) -> Any:
        for name, raw in (("community_data", community_data), ("developer_data", developer_data)):
            parse_bool(raw, name)
        return await compat.coin(
            principal,
            coin_id,
            market_data=parse_bool(market_data, "market_data", default=True),
            tickers=parse_bool(tickers, "tickers", default=True),
            localization=parse_bool(localization, "localization", default=True),
            sparkline=parse_bool(sparkline, "sparkline"),
        )

    return await answer(request, work)


@router.get(
    "/coins/{id}/tickers",
    response_model=schemas.TickersOut,
    summary="Each exchange's latest quote of a coin, with its status in our consolidation",
    description="`/api/v1/prices/{symbol}/sources` in CoinGecko's shape: `is_anomaly` = rejected as an outlier, "
    "`is_stale` = too old to count; `coinlytics_status` says used, stale or outlier.",
    responses=CG_ERRORS,
)
async def coin_tickers(
    request: Request,
    compat: Compat,
    coin_id: str = Path(alias="id", description="CoinGecko coin id", examples=["bitcoin"]),
    exchange_ids: str | None = Query(None, description="sources, comma-separated", examples=["binance"]),
    page: int | None = Query(None, ge=1, le=10_000, description="all tickers are on page 1", examples=[1]),
    order: TickerOrder | None = Query(None, description="accepted; tickers come by source", examples=["volume_desc"]),
) -> JSONResponse:
    async def work(principal: Principal) -> Any:
        number = parse_positive_int(page, "page", 1, 10_000)
        body = await compat.tickers(principal, coin_id)
        wanted = {e.lower() for e in split_list(exchange_ids)}
        if wanted:
            body["tickers"] = [t for t in body["tickers"] if t["market"]["identifier"] in wanted]
        if number > 1:
            body["tickers"] = []
        return body

    return await answer(request, work)


@router.get(
    "/coins/{id}/market_chart",
    response_model=schemas.MarketChartOut,
    summary="Price and market cap series of the last `days` days",
    description="Our candles' closes (`/api/v1/prices/{symbol}/history`), at CoinGecko's granularity: 1 day → "
    "5-minutely, 2-90 days → hourly, more → daily (or `interval=5m|hourly|daily`). Market caps are the price "
    "times the supply of our current market cap; `total_volumes` has one point, the current 24 h volume.",
    responses=CG_ERRORS,
)
async def market_chart(
    request: Request,
    compat: Compat,
    coin_id: str = Path(alias="id", description="CoinGecko coin id", examples=["bitcoin"]),
    vs_currency: str = VsCurrency,
    days: str = Days,
    interval: ChartInterval | None = Query(None, description="default: automatic", examples=["daily"]),
    precision: PrecisionChoice | None = Precision,
) -> JSONResponse:
    async def work(principal: Principal) -> Any:
        vs = compat.check_vs(vs_currency)
        span = parse_days(days)
        chosen = _chart_interval(interval)
        end = datetime.now(UTC)
        start = MAX_HISTORY_START if span is None else end - timedelta(days=float(span))
        if span is None and chosen == "auto":
            chosen = "1d"
        return await compat.market_chart(
            principal, coin_id, vs=vs, start=start, end=end, interval=chosen, precision=parse_precision(precision)
        )

    return await answer(request, work)


@router.get(
    "/coins/{id}/market_chart/range",
    response_model=schemas.MarketChartOut,
    summary="Price and market cap series between two moments",
    description="As `/market_chart`, between `from` and `to` (UNIX seconds or ISO dates).",
    responses=CG_ERRORS,
)
async def market_chart_range(
    request: Request,
    compat: Compat,
    coin_id: str = Path(alias="id", description="CoinGecko coin id", examples=["bitcoin"]),
    vs_currency: str = VsCurrency,
    from_: str = Query(
        alias="from", description="UNIX seconds or ISO date", pattern=MOMENT_PATTERN, examples=["1711929600"]
    ),
    to: str = Query(description="UNIX seconds or ISO date", pattern=MOMENT_PATTERN, examples=["1712275200"]),
    interval: ChartInterval | None = Query(None, description="default: automatic", examples=["hourly"]),
    precision: PrecisionChoice | None = Precision,
) -> JSONResponse:
    async def work(principal: Principal) -> Any:
        vs = compat.check_vs(vs_currency)
        start, end = parse_moment(from_, "from"), parse_moment(to, "to")
        if start >= end:
            raise bad_request("invalid range: from must be before to")
        return await compat.market_chart(
            principal,
            coin_id,
            vs=vs,
            start=start,
            end=end,
            interval=_chart_interval(interval),
            precision=parse_precision(precision),
        )

    return await answer(request, work)


@router.get(
    "/coins/{id}/ohlc",
    response_model=schemas.OhlcOut,
    summary="OHLC candles of the last `days` days",
    description="`[close time ms, open, high, low, close]` from our candles, at CoinGecko's granularity: 1-2 days "
    "30-minute, 3-30 days 4-hourly, 31 days and more 4-daily (or `interval=hourly|daily`).",
    responses=CG_ERRORS,
)
async def coin_ohlc(
    request: Request,
    compat: Compat,
    coin_id: str = Path(alias="id", description="CoinGecko coin id", examples=["bitcoin"]),
    vs_currency: str = VsCurrency,
    days: str = Days,
    interval: Literal["hourly", "daily"] | None = Query(None, description="default: automatic", examples=["daily"]),
    precision: PrecisionChoice | None = Precision,
) -> JSONResponse:
    async def work(principal: Principal) -> Any:
        vs = compat.check_vs(vs_currency)
        span = parse_days(days)
        if interval not in (None, "") and interval not in OHLC_INTERVALS:
            raise bad_request("invalid interval: use hourly or daily")
        chosen = OHLC_INTERVALS.get(interval or "")
        return await compat.ohlc(
            principal, coin_id, vs=vs, days=span, interval=chosen, precision=parse_precision(precision)
        )

    return await answer(request, work)


@router.get(
    "/exchange_rates",
    response_model=schemas.ExchangeRatesOut,
    summary="Every known currency's rate against BTC",
    description="`/api/v1/rates?base=BTC` in CoinGecko's shape: units of each currency per 1 BTC.",
    responses=CG_ERRORS,
)
async def exchange_rates(request: Request, compat: Compat) -> JSONResponse:
    async def work(principal: Principal) -> Any:
        return await compat.exchange_rates(principal)

    return await answer(request, work)


@router.get("/{path:path}", include_in_schema=False)
async def unknown(request: Request, path: str) -> Response:
    """An address CoinGecko has and we do not (or a typo) answers its shape, not our not-found page. A
    trailing slash, which CoinGecko accepts and pycoingecko sends (``coins/bitcoin/``), is redirected to the
    route without it."""
    if path.endswith("/") and path.strip("/"):
        query = request.url.query
        target = "/api/v3/" + path.rstrip("/") + (f"?{query}" if query else "")
        return RedirectResponse(target, status_code=307)
    return JSONResponse({"error": "Incorrect path. Please check the Coinlytics /docs for /api/v3"}, status_code=404)


def _chart_interval(raw: str | None) -> str:
    if raw is None or raw == "":
        return "auto"
    chosen = CHART_INTERVALS.get(raw.strip().lower())
    if chosen is None:
        raise bad_request("invalid interval: use 5m, hourly or daily")
    return chosen
