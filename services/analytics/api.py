"""Routes of the analytics service: comparisons, one coin's statistics, charts, saved comparisons."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request, Response

from services.analytics.schemas import (
    AnalysisOut,
    ChartFormat,
    ChartKind,
    CompareOut,
    ComparisonIn,
    ComparisonOut,
    ComparisonsOut,
    Interval,
)
from services.analytics.service import AnalyticsService, Cached, chart_asset, symbols_of
from shared.auth import require_local_user
from shared.errors import NotFound, error_responses
from shared.responses import DecimalJSONResponse
from shared.service_app import lifespan_state
from shared.timeparse import parse_time
from shared.validation import SYMBOL_PATTERN, TIME_DESCRIPTION, TIME_SCHEMA, symbol_list_pattern

router = APIRouter(tags=["analytics"])

Analytics = Annotated[AnalyticsService, Depends(lifespan_state("analytics", AnalyticsService))]
ASSETS_PATH = "/api/v1/charts/assets"
CACHE_HEADER = "X-Cache"
# The chart pages run only the platform's own scripts (Plotly and a small renderer) and load nothing else.
CHART_PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
    "font-src 'self' data:; connect-src 'self'; frame-ancestors 'self'; base-uri 'none'; form-action 'none'"
)


User = Annotated[str, Depends(require_local_user)]
Symbol = Annotated[str, Path(description="coin symbol, case-insensitive", pattern=SYMBOL_PATTERN, examples=["BTC"])]
Vs = Annotated[str, Query(description="currency", pattern=SYMBOL_PATTERN, examples=["USD"])]
Start = Annotated[
    str | None, Query(description=f"{TIME_DESCRIPTION}; default 30 days before end", json_schema_extra=TIME_SCHEMA)
]
End = Annotated[str | None, Query(description=f"{TIME_DESCRIPTION}; default now", json_schema_extra=TIME_SCHEMA)]
IntervalQ = Annotated[
    Interval, Query(description="1m, 5m, 15m, 1h, 4h, 1d, or auto (5m up to a day, 1h up to 90 days, 1d beyond)")
]
SymbolList = Annotated[
    str, Query(description="2 to 20 coins, comma-separated", pattern=symbol_list_pattern(20), examples=["BTC,ETH,SOL"])
]
ComparisonId = Annotated[uuid.UUID, Path(description="the saved comparison's id")]


def _answer(result: Cached, *, filename: str | None = None) -> Response:
    headers = {CACHE_HEADER: "hit" if result.hit else "miss"}
    if result.media_type.startswith("text/csv") and filename:
        headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    if result.media_type.startswith("text/html"):
        headers["Content-Security-Policy"] = CHART_PAGE_CSP
    return Response(content=result.body, media_type=result.media_type, headers=headers)


def _times(start: str | None, end: str | None) -> tuple[datetime | None, datetime | None]:
    return (
        parse_time(start, "start") if start is not None else None,
        parse_time(end, "end") if end is not None else None,
    )


COMPARE_DESCRIPTION = """
For 2 to 20 coins over one range: each coin's total and per-interval returns, annualised volatility, maximum
drawdown (with its peak, trough and recovery), a Sharpe-like ratio (`risk_free_rate`, annual, default 0), beta
against `benchmark` (default BTC), the normalised series (start = 100) and the correlation matrix of returns.

Missing candles are not invented: gaps of up to 3 intervals are carried forward, longer ones stay empty, and
each coin's `coverage` says what share of the expected candles was there. A value that can't be computed is
null, with the reason under `nulls`. Results are cached until a new candle for one of the coins lands
(`X-Cache: hit` or `miss`). `format=csv` gives the normalised series as a spreadsheet.

Example: `/api/v1/analytics/compare?symbols=BTC,ETH,SOL&vs=USD&start=2024-01-01&end=2024-07-01&interval=1d`
"""


@router.get(
    "/api/v1/analytics/compare",
    response_model=CompareOut,
    summary="Compare coins: returns, risk, drawdown, beta, correlation",
    description=COMPARE_DESCRIPTION,
    responses=error_responses(404, 422),
)
async def compare(
    service: Analytics,
    symbols: SymbolList,
    vs: Vs = "USD",
    start: Start = None,
    end: End = None,
    interval: IntervalQ = "auto",
    benchmark: Annotated[str | None, Query(pattern=SYMBOL_PATTERN, description="beta against (BTC)")] = None,
    risk_free_rate: Annotated[float, Query(gt=-1, lt=1, description="annual, as a fraction (0.04 is 4%)")] = 0.0,
    format: Annotated[str, Query(pattern="^(json|csv)$", description="json or csv")] = "json",
) -> Response:
    lo, hi = _times(start, end)
    result = await service.compare(
        symbols_of(symbols), vs.upper(), lo, hi, interval,
        benchmark=benchmark, risk_free_rate=risk_free_rate, fmt=format,
    )  # fmt: skip
    return _answer(result, filename="compare.csv")


@router.get(
    "/api/v1/analytics/comparisons",
    response_model=ComparisonsOut,
    summary="Your saved comparisons",
    responses=error_responses(401),
)
async def list_comparisons(service: Analytics, user_id: User) -> DecimalJSONResponse:
    return DecimalJSONResponse(await service.list_comparisons(user_id))


@router.post(
    "/api/v1/analytics/comparisons",
    status_code=201,
    response_model=ComparisonOut,
    summary="Save a comparison (a named set of coins, a currency and a range)",
    description="`period` (such as `30d`) is relative: each run covers the last 30 days. Or give a fixed "
    "`start` (and `end`). Names are unique per user (409 otherwise).",
    responses=error_responses(401, 404, 409, 422),
)
async def save_comparison(service: Analytics, user_id: User, body: ComparisonIn) -> DecimalJSONResponse:
    return DecimalJSONResponse(await service.save_comparison(user_id, body.model_dump()), status_code=201)


@router.get(
    "/api/v1/analytics/comparisons/{comparison_id}",
    response_model=ComparisonOut,
    summary="One saved comparison",
    responses=error_responses(401, 404, 422),
)
async def get_comparison(service: Analytics, user_id: User, comparison_id: ComparisonId) -> DecimalJSONResponse:
    return DecimalJSONResponse(await service.get_comparison(user_id, comparison_id))


@router.delete(
    "/api/v1/analytics/comparisons/{comparison_id}",
    status_code=204,
    summary="Delete a saved comparison",
    responses=error_responses(401, 404, 422),
)
async def delete_comparison(service: Analytics, user_id: User, comparison_id: ComparisonId) -> Response:
    await service.delete_comparison(user_id, comparison_id)
    return Response(status_code=204)


@router.get(
    "/api/v1/analytics/comparisons/{comparison_id}/run",
    response_model=CompareOut,
    summary="Run a saved comparison now",
    responses=error_responses(401, 404, 422),
)
async def run_comparison(
    service: Analytics,
    user_id: User,
    comparison_id: ComparisonId,
    format: Annotated[str, Query(pattern="^(json|csv)$")] = "json",
) -> Response:
    return _answer(await service.run_comparison(user_id, comparison_id, fmt=format), filename="compare.csv")


ANALYSIS_DESCRIPTION = """
Summary statistics, simple (20, 50) and exponential (12, 26) moving averages, RSI (14, Wilder), Bollinger
bands (20, 2 standard deviations), and anomalies: intervals whose return or volume is unusual against the
previous 48 intervals' rolling median and MAD, each with its time, size and score.

Example: `/api/v1/analytics/BTC?vs=USD&start=2024-06-01&interval=1h`
"""


@router.get(
    "/api/v1/analytics/{symbol}",
    response_model=AnalysisOut,
    summary="A coin's statistics, indicators and anomalies",
    description=ANALYSIS_DESCRIPTION,
    responses=error_responses(404, 422),
)
async def analysis(
    service: Analytics,
    symbol: Symbol,
    vs: Vs = "USD",
    start: Start = None,
    end: End = None,
    interval: IntervalQ = "auto",
) -> Response:
    lo, hi = _times(start, end)
    return _answer(await service.analysis(symbol.upper(), vs.upper(), lo, hi, interval))


@router.get(
    f"{ASSETS_PATH}/{{name}}",
    summary="The chart pages' scripts (Plotly from the installed plotly package, and the renderer)",
    include_in_schema=False,
)
async def get_chart_asset(request: Request, name: str) -> Response:
    found = chart_asset(name)
    if found is None:
        raise NotFound(f"no such asset: {name}")
    body, media_type, etag = found
    headers = {"ETag": etag, "Cache-Control": "public, max-age=86400"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(content=body, media_type=media_type, headers=headers)


CHART_DESCRIPTION = f"""
Interactive Plotly charts: `format=json` is the figure (for `Plotly.newPlot` or the dashboard), `format=html` a
page that works offline (Plotly's script comes from this platform at `{ASSETS_PATH}/plotly.min.js`, never from
a CDN), `format=csv` the data (history and compare).

- `history` (`symbol`): price with volume, anomalies marked
- `candles` (`symbol`): candlesticks
- `compare` (`symbols`): normalised performance (start = 100)
- `correlation` (`symbols`): heatmap of the correlation of returns
- `sources` (`symbol`, at most 2 days): each exchange's price around the consolidated one, points more than
  `outlier_pct` percent away marked

Example: `/api/v1/charts/history?symbol=BTC&vs=USD&start=2024-06-01&format=html`
"""


@router.get(
    "/api/v1/charts/{kind}",
    summary="A chart: Plotly figure JSON, a standalone HTML page, or CSV",
    description=CHART_DESCRIPTION,
    responses=error_responses(404, 422),
)
async def chart(
    request: Request,
    service: Analytics,
    kind: Annotated[ChartKind, Path(description="history, candles, compare, correlation or sources")],
    symbol: Annotated[str | None, Query(pattern=SYMBOL_PATTERN, description="the coin (one-coin charts)")] = None,
    symbols: Annotated[
        str | None, Query(pattern=symbol_list_pattern(20), description="the coins (compare, correlation)")
    ] = None,
    vs: Vs = "USD",
    start: Start = None,
    end: End = None,
    interval: IntervalQ = "auto",
    format: Annotated[ChartFormat, Query(description="json, html or csv")] = "json",
    outlier_pct: Annotated[float, Query(gt=0, le=100, description="sources: mark prices this far off")] = 1.0,
) -> Response:
    lo, hi = _times(start, end)
    result = await service.chart(
        kind,
        symbol=symbol.upper() if symbol else None,
        symbols=symbols_of(symbols) if symbols else None,
        vs=vs.upper(),
        start=lo,
        end=hi,
        interval=interval,
        fmt=format,
        outlier_pct=outlier_pct,
        assets_url=ASSETS_PATH,
    )
    return _answer(result, filename=f"{kind}.csv")
