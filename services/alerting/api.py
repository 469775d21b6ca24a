"""Routes of the alerts API: the caller's own alert rules (the gateway signs in the user)."""

from __future__ import annotations

import uuid
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Body, Depends, Path, Query, Request, Response
from fastapi.responses import HTMLResponse

from services.alerting.channels.mail import render_unsubscribe_page
from services.alerting.schemas import AlertEventsOut, AlertIn, AlertListOut, AlertOut, AlertPatch, UnsubscribeOut
from services.alerting.service import AlertService
from shared.auth import require_local_user
from shared.errors import MethodNotAllowed, error_responses
from shared.responses import DecimalJSONResponse
from shared.service_app import lifespan_state

router = APIRouter(tags=["alerts"])

Alerts = Annotated[AlertService, Depends(lifespan_state("alerts", AlertService))]


User = Annotated[str, Depends(require_local_user)]
AlertId = Annotated[uuid.UUID, Path(description="the alert's id", examples=["0b9d3f7e-2f43-4a5e-9a55-3f1c2d9e8a10"])]

CREATE_DESCRIPTION = """
Creates an alert on a tracked coin in a published currency.

**Conditions.** `above` / `below`: the consolidated price crosses `threshold` (a price). `pct_change_up` /
`pct_change_down`: the price change over `window_minutes` (1 to 10080, required for these two only) reaches
`threshold` percent. `spread_above`: the spread between the highest and lowest used source exceeds `threshold`
percent.

**Channels** (1 to 5, each once): `{"type":"webhook","url":…}` (http or https on a public address; a host that
is or resolves to a private, loopback, link-local or CGNAT address is refused unless
`COINLYTICS_WEBHOOK_ALLOW_PRIVATE` is set), `{"type":"email","to":…}` (needs `COINLYTICS_SMTP_URL`),
`{"type":"sms","to":"+E.164"}` (needs `COINLYTICS_SMS_URL`). A channel the deployment has not configured is
refused now (422), never failing silently later. Each webhook gets a Standard Webhooks signing secret
(`whsec_…`), **shown only in this response**.

`cooldown_seconds` (0 to 604800, default 300), `one_shot`, `expires_at` (in the future; an expired alert is
listed as `expired` for a day, then deleted). At most `COINLYTICS_ALERTS_MAX_PER_USER` (100) alerts per user.
"""

EXAMPLES = {
    "above": {
        "summary": "BTC above 100,000 USD, by webhook",
        "value": {
            "symbol": "BTC",
            "vs": "USD",
            "condition": "above",
            "threshold": 100000,
            "channels": [{"type": "webhook", "url": "https://example.com/hooks/coinlytics"}],
            "cooldown_seconds": 300,
        },
    },
    "pct": {
        "summary": "ETH down 5 % within an hour, once",
        "value": {
            "symbol": "ETH",
            "vs": "EUR",
            "condition": "pct_change_down",
            "threshold": 5,
            "window_minutes": 60,
            "channels": [{"type": "webhook", "url": "https://example.com/hooks/coinlytics"}],
            "one_shot": True,
            "expires_at": "2030-01-01T00:00:00Z",
        },
    },
}


def _client(request: Request) -> str | None:
    # The client as the gateway resolved it; only for the activity log.
    return request.headers.get("x-forwarded-for")


UNSUBSCRIBE_DESCRIPTION = """
The link in every alert email stops that alert's emails to that address, without signing in: the signed,
single-purpose `token` (bound to the alert, the channel and the address) is the proof. `GET` shows a page
that asks to confirm (mail scanners open links); `POST`, from its button or from a mail client's one-click
unsubscribe (RFC 8058), does it. The alert and its other channels carry on. Doing it again changes nothing.
"""


@router.get(
    "/api/v1/alerts/unsubscribe",
    response_class=HTMLResponse,
    summary="The email's unsubscribe link: a page that asks to confirm",
    description=UNSUBSCRIBE_DESCRIPTION,
    responses=error_responses(422),
    operation_id="unsubscribe_alert_email_page",
)
async def unsubscribe_page(request: Request, token: str = Query(max_length=512)) -> HTMLResponse:
    # Opening the link changes nothing: mail scanners open every link. The button POSTs to the same URL.
    return HTMLResponse(
        render_unsubscribe_page(
            title="Unsubscribe from this alert's emails?",
            message="This alert will stop emailing this address. The alert itself and its other channels carry on.",
            action=f"/api/v1/alerts/unsubscribe?token={quote(token)}",
        ),
        headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"},
    )


@router.post(
    "/api/v1/alerts/unsubscribe",
    response_model=UnsubscribeOut,
    summary="Unsubscribe an address from an alert's emails (the page's button, and one-click RFC 8058)",
    description=UNSUBSCRIBE_DESCRIPTION,
    responses=error_responses(404, 422),
    operation_id="unsubscribe_alert_email",
)
async def unsubscribe(request: Request, service: Alerts, token: str = Query(max_length=512)) -> Response:
    done = await service.unsubscribe(token, _client(request))
    if "text/html" in request.headers.get("accept", ""):
        return HTMLResponse(
            render_unsubscribe_page(
                title="Unsubscribed",
                message=f"No more emails from this alert will go to {done['to']}.",
            ),
            headers={"Cache-Control": "no-store"},
        )
    return DecimalJSONResponse(done)


@router.api_route("/api/v1/alerts/unsubscribe", methods=["PUT", "PATCH", "DELETE"], include_in_schema=False)
async def unsubscribe_other_methods() -> None:
    # Without this, these methods would reach /api/v1/alerts/{alert_id} and read "unsubscribe" as an id.
    raise MethodNotAllowed("the unsubscribe link takes GET or POST", headers={"Allow": "GET, POST"})


@router.post(
    "/api/v1/alerts",
    status_code=201,
    response_model=AlertOut,
    summary="Create an alert",
    description=CREATE_DESCRIPTION,
    responses=error_responses(401, 404, 422),
)
async def create_alert(
    request: Request,
    service: Alerts,
    user_id: User,
    body: Annotated[AlertIn, Body(openapi_examples=EXAMPLES)],
) -> DecimalJSONResponse:
    created = await service.create(user_id, body, _client(request))
    return DecimalJSONResponse(created, status_code=201)


@router.get(
    "/api/v1/alerts",
    response_model=AlertListOut,
    summary="Your alerts",
    description="Newest first, with each one's `status` (active, paused, expired). Webhook secrets are never "
    "shown again. Example: `GET /api/v1/alerts?page=1&per_page=50`.",
    responses=error_responses(401, 422),
)
async def list_alerts(
    service: Alerts,
    user_id: User,
    page: int = Query(default=1, ge=1, le=10_000, examples=[1]),
    per_page: int = Query(default=50, ge=1, le=100, examples=[50]),
) -> DecimalJSONResponse:
    return DecimalJSONResponse(await service.list_alerts(user_id, page=page, per_page=per_page))


@router.get(
    "/api/v1/alerts/{alert_id}",
    response_model=AlertOut,
    summary="One of your alerts",
    responses=error_responses(401, 404, 422),
)
async def get_alert(service: Alerts, user_id: User, alert_id: AlertId) -> DecimalJSONResponse:
    return DecimalJSONResponse(await service.get(user_id, alert_id))


@router.patch(
    "/api/v1/alerts/{alert_id}",
    response_model=AlertOut,
    summary="Change an alert",
    description="Any subset of the creation fields, plus `paused`; the result is checked as a new alert would "
    "be. `null` leaves a field unchanged, except `expires_at: null` (never expires) and `window_minutes`. "
    "`channels` replaces the list: a webhook URL already on the alert keeps its secret, a new one gets a secret "
    'shown in this response only. Example: `{"threshold": 95000, "paused": false}`.',
    responses=error_responses(401, 404, 422),
)
async def update_alert(
    request: Request,
    service: Alerts,
    user_id: User,
    alert_id: AlertId,
    body: Annotated[AlertPatch, Body(openapi_examples={"threshold": {"value": {"threshold": 95000}}})],
) -> DecimalJSONResponse:
    return DecimalJSONResponse(await service.update(user_id, alert_id, body, _client(request)))


@router.delete(
    "/api/v1/alerts/{alert_id}",
    status_code=204,
    summary="Delete an alert",
    responses=error_responses(401, 404, 422),
)
async def delete_alert(request: Request, service: Alerts, user_id: User, alert_id: AlertId) -> Response:
    await service.delete(user_id, alert_id, _client(request))
    return Response(status_code=204)


@router.post(
    "/api/v1/alerts/{alert_id}/pause",
    response_model=AlertOut,
    summary="Pause an alert (it keeps its settings and does not fire)",
    description='Same as `PATCH {"paused": true}`; pausing a paused alert changes nothing.',
    responses=error_responses(401, 404, 422),
)
async def pause_alert(request: Request, service: Alerts, user_id: User, alert_id: AlertId) -> DecimalJSONResponse:
    return DecimalJSONResponse(await service.set_paused(user_id, alert_id, True, _client(request)))


@router.post(
    "/api/v1/alerts/{alert_id}/resume",
    response_model=AlertOut,
    summary="Resume a paused alert",
    description='Same as `PATCH {"paused": false}`.',
    responses=error_responses(401, 404, 422),
)
async def resume_alert(request: Request, service: Alerts, user_id: User, alert_id: AlertId) -> DecimalJSONResponse:
    return DecimalJSONResponse(await service.set_paused(user_id, alert_id, False, _client(request)))


@router.get(
    "/api/v1/alerts/{alert_id}/events",
    response_model=AlertEventsOut,
    summary="An alert's triggers, newest first, with each channel's delivery status",
    responses=error_responses(401, 404, 422),
)
async def alert_events(
    service: Alerts,
    user_id: User,
    alert_id: AlertId,
    limit: int = Query(default=50, ge=1, le=100, examples=[50]),
) -> DecimalJSONResponse:
    return DecimalJSONResponse(await service.events(user_id, alert_id, limit=limit))
