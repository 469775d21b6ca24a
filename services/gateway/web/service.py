"""What the dashboard's routes need: the templates, who is signed in, and the cookie session's sign-in,
refresh and sign-out (the accounts service does the work; services/gateway/web/session.py the cookies)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jinja2
from fastapi import Request, Response
from fastapi.responses import HTMLResponse

from services.gateway.auth.schemas import TokenOut
from services.gateway.auth.service import AuthService
from services.gateway.guard import client_address, resolve
from services.gateway.web.session import (
    ACCESS_COOKIE,
    CSRF_COOKIE,
    REFRESH_COOKIE,
    check_csrf,
    check_same_origin,
    clear_session,
    secure_cookies,
    set_session,
)
from shared.auth import ANONYMOUS, Authenticator, Principal
from shared.errors import AppError, Unauthorized
from shared.settings import Settings

HERE = Path(__file__).parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"
# Pages run the platform's own scripts only and talk to this origin only (the API, the live websocket).
PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
    "font-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'; "
    "object-src 'none'"
)
NAV = (
    ("/", "Markets"),
    ("/compare", "Compare"),
    ("/convert", "Convert"),
    ("/alerts", "Alerts"),
)


@functools.cache
def templates() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html",), default_for_string=True),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


class WebService:
    def __init__(self, settings: Settings, auth: AuthService) -> None:
        self.settings = settings
        self.auth = auth

    # --- pages ---------------------------------------------------------------------------------

    async def viewer(self, request: Request) -> tuple[Principal, bool]:
        """Who is looking (anonymous without a session), and whether a session cookie was there but its access
        token no longer works (the page then says so and its script tries a refresh)."""
        try:
            return await resolve(request), False
        except AppError:
            return ANONYMOUS, ACCESS_COOKIE in request.cookies or REFRESH_COOKIE in request.cookies

    async def page(self, request: Request, template: str, *, title: str, **context: Any) -> HTMLResponse:
        principal, expired = await self.viewer(request)
        signed_in = principal.user_id is not None
        html = (
            templates()
            .get_template(template)
            .render(
                title=title,
                path=request.url.path,
                nav=NAV,
                signed_in=signed_in,
                is_admin=signed_in and principal.is_admin,
                session_expired=expired and not signed_in,
                vs_currencies=self.settings.vs_currencies,
                **context,
            )
        )
        return HTMLResponse(html, headers=page_headers())

    # --- the cookie session --------------------------------------------------------------------

    async def sign_in(self, request: Request, response: Response, email: str, password: str) -> dict[str, Any]:
        check_same_origin(request, self.settings)
        tokens = await self.auth.login(email, password, client_address(request))
        return self._issue(request, response, tokens)

    async def refresh(self, request: Request, response: Response) -> dict[str, Any]:
        check_csrf(request)
        token = request.cookies.get(REFRESH_COOKIE)
        if not token:
            clear_session(response, secure=secure_cookies(self.settings, request))
            raise Unauthorized("your session has ended: sign in again")
        tokens = await self.auth.refresh(token, client_address(request))
        return self._issue(request, response, tokens)

    async def sign_out(self, request: Request, response: Response) -> None:
        check_csrf(request)
        try:
            principal = await resolve(request)
        except AppError:
            principal = ANONYMOUS
        if principal.user_id is not None:
            await self.auth.logout(principal, client_address(request))
        elif token := request.cookies.get(REFRESH_COOKIE):
            # The access token had expired: spending the refresh token still ends that sign-in.
            try:
                tokens = await self.auth.refresh(token, client_address(request))
                authenticator: Authenticator = request.app.state.authenticator
                principal = await authenticator.authenticate(tokens.access_token)
                await self.auth.logout(principal, client_address(request))
            except AppError:
                pass  # already spent or revoked: nothing left to end
        clear_session(response, secure=secure_cookies(self.settings, request))

    async def state(self, request: Request) -> dict[str, Any]:
        principal = await resolve(request)
        if principal.user_id is None:
            raise Unauthorized("not signed in")
        user = await self.auth.me(principal.user_id)
        return {
            "signed_in": True,
            "user": {
                "id": str(user.id),
                "email": user.email,
                "role": user.role,
                "vs_currency": user.vs_currency,
                "watchlist": list(user.watchlist or []),
            },
            "csrf_cookie": CSRF_COOKIE,
        }

    def _issue(self, request: Request, response: Response, tokens: TokenOut) -> dict[str, Any]:
        secure = secure_cookies(self.settings, request)
        set_session(response, tokens, secure=secure, refresh_days=self.settings.refresh_token_days)
        response.headers["Cache-Control"] = "no-store"
        # The tokens stay in HttpOnly cookies; the page only learns when to refresh.
        return {"signed_in": True, "expires_in": tokens.expires_in}


def page_headers() -> dict[str, str]:
    return {"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-store", "Referrer-Policy": "same-origin"}
