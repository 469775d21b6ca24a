"""Routes of the web dashboard: the pages, the cookie session, and the pages' static files."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request, Response
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.gateway.guard import guard_anonymous
from services.gateway.web.service import WebService
from shared.errors import error_responses
from shared.service_app import lifespan_getter, lifespan_state
from shared.validation import SYMBOL_PATTERN, normalise_email

router = APIRouter(include_in_schema=False)
session_router = APIRouter(tags=["dashboard session"])

# Also called directly: the not-found route is a plain Starlette route, without dependency injection.
_web = lifespan_getter("web", WebService)
_own_routes = lifespan_getter("own_routes", list)
Web = Annotated[WebService, Depends(lifespan_state("web", WebService))]


class SignIn(BaseModel):
    email: str = Field(max_length=320)
    password: str = Field(max_length=1024)


# The pages without parameters: address, template, title.
PAGES = (
    ("/", "markets.html", "Markets"),
    ("/compare", "compare.html", "Compare"),
    ("/convert", "convert.html", "Convert"),
    ("/alerts", "alerts.html", "Alerts"),
    ("/account", "account.html", "Account"),
    ("/login", "login.html", "Sign in"),
    ("/register", "register.html", "Create an account"),
    ("/reset-password", "reset.html", "Reset your password"),
    ("/admin", "admin.html", "Administration"),
    ("/admin/tasks", "tasks.html", "Task monitor"),
)


def _page(template: str, title: str) -> Callable[[Request, WebService], Awaitable[HTMLResponse]]:
    async def page(request: Request, web: Web) -> HTMLResponse:
        return await web.page(request, template, title=title)

    return page


for _path, _template, _title in PAGES:
    router.add_api_route(
        _path, _page(_template, _title), methods=["GET"], response_class=HTMLResponse, name=_template.split(".")[0]
    )


@router.get("/coins/{symbol}", response_class=HTMLResponse)
async def coin(request: Request, web: Web, symbol: Annotated[str, Path(pattern=SYMBOL_PATTERN)]) -> HTMLResponse:
    return await web.page(request, "coin.html", title=symbol.upper(), symbol=symbol.upper())


@session_router.post(
    "/web/session",
    summary="Dashboard sign-in: sets the session cookies",
    description="Body `{email, password}`. The tokens go into HttpOnly cookies, never into the page; the "
    "answer says when the access token expires. API clients use `POST /api/v1/auth/login` instead.",
    responses=error_responses(401, 403, 415, 422, 429),
    dependencies=[Depends(guard_anonymous)],
)
async def sign_in(request: Request, response: Response, web: Web, body: SignIn) -> dict[str, object]:
    try:
        email = normalise_email(body.email)
    except ValueError:
        email = body.email.strip().lower()  # refused by the login like any unknown address
    return await web.sign_in(request, response, email, body.password)


@session_router.get("/web/session", summary="Who the dashboard session belongs to", responses=error_responses(401, 429))
async def session_state(request: Request, web: Web) -> dict[str, object]:
    return await web.state(request)


@session_router.post(
    "/web/session/refresh",
    summary="Renew the dashboard session's tokens (the page does it before the access token expires)",
    responses=error_responses(401, 403, 429),
    dependencies=[Depends(guard_anonymous)],
)
async def refresh(request: Request, response: Response, web: Web) -> dict[str, object]:
    return await web.refresh(request, response)


@session_router.delete(
    "/web/session",
    status_code=204,
    summary="Dashboard sign-out: revokes the tokens and clears the cookies",
    responses=error_responses(403, 429),
)
async def sign_out(request: Request, web: Web) -> Response:
    response = Response(status_code=204)
    await web.sign_out(request, response)
    return response


async def not_found_page(request: Request) -> Response:
    """Any other address: a page that says so for a browser, the API's error shape for everyone else. A plain
    Starlette route, added after every other one (services/gateway/app.py)."""
    # A path another route serves with other methods: 405 with those methods, as it would be without this.
    allowed: set[str] = set()
    for route in _own_routes(request):
        if route.path_regex.match(request.url.path):
            allowed |= route.methods or set()
    if allowed:
        raise StarletteHTTPException(405, headers={"Allow": ", ".join(sorted(allowed))})
    if "text/html" not in request.headers.get("accept", ""):
        raise StarletteHTTPException(404)
    page = await _web(request).page(request, "not_found.html", title="Page not found")
    page.status_code = 404
    return page
