"""Browser sessions: the same access and refresh tokens as API clients get, carried in cookies.

- ``coinlytics_access``: the access token; HttpOnly, SameSite=Lax, Secure outside plain-HTTP development,
  path ``/`` (the API and the live websocket read it).
- ``coinlytics_refresh``: the refresh token; HttpOnly, SameSite=Strict, sent only to ``/web/session``.
- ``coinlytics_csrf``: a random value the page's scripts read and send back as ``X-CSRF-Token`` on every
  state-changing request (double submit). A cross-site page can make the browser send the cookies but can't
  read this one, so it can't forge the header.

API clients keep sending ``Authorization: Bearer``; a request with that header is never treated as a browser
session (no cookie is consulted, no CSRF token asked for).
"""

from __future__ import annotations

import hmac
import secrets
import time
from typing import Any

from fastapi import Request, Response

from shared.errors import Forbidden, UnsupportedMediaType
from shared.settings import Settings

ACCESS_COOKIE = "coinlytics_access"
REFRESH_COOKIE = "coinlytics_refresh"
CSRF_COOKIE = "coinlytics_csrf"
# When the access token expires (Unix seconds), readable by the page: it refreshes a minute before.
EXPIRES_COOKIE = "coinlytics_expires"
CSRF_HEADER = "x-csrf-token"
SESSION_PATH = "/web/session"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def secure_cookies(settings: Settings, request: Request) -> bool:
    """Secure everywhere except plain-HTTP development on this machine (where the browser would drop them)."""
    if settings.https_only or request.url.scheme == "https":
        return True
    return not (settings.env in ("development", "test") and request.url.scheme == "http")


def set_session(response: Response, tokens: Any, *, secure: bool, refresh_days: int) -> str:
    """Puts a token pair in the cookies; returns the CSRF value (the page keeps using the cookie's)."""
    csrf = secrets.token_urlsafe(32)
    response.set_cookie(
        ACCESS_COOKIE, tokens.access_token, max_age=int(tokens.expires_in), path="/",
        httponly=True, secure=secure, samesite="lax",
    )  # fmt: skip
    response.set_cookie(
        REFRESH_COOKIE, tokens.refresh_token, max_age=refresh_days * 86_400, path=SESSION_PATH,
        httponly=True, secure=secure, samesite="strict",
    )  # fmt: skip
    response.set_cookie(
        CSRF_COOKIE, csrf, max_age=refresh_days * 86_400, path="/", httponly=False, secure=secure, samesite="lax"
    )
    expires = str(int(time.time()) + int(tokens.expires_in))
    response.set_cookie(
        EXPIRES_COOKIE, expires, max_age=refresh_days * 86_400, path="/", httponly=False, secure=secure,
        samesite="lax",
    )  # fmt: skip
    return csrf


def clear_session(response: Response, *, secure: bool) -> None:
    cookies = ((ACCESS_COOKIE, "/"), (REFRESH_COOKIE, SESSION_PATH), (CSRF_COOKIE, "/"), (EXPIRES_COOKIE, "/"))
    for name, path in cookies:
        readable = name in (CSRF_COOKIE, EXPIRES_COOKIE)
        response.delete_cookie(name, path=path, secure=secure, httponly=not readable, samesite="lax")


def check_csrf(request: Request) -> None:
    """A state-changing request signed in by cookie must carry the CSRF cookie's value in the header."""
    if request.method in SAFE_METHODS:
        return
    cookie = request.cookies.get(CSRF_COOKIE, "")
    header = request.headers.get(CSRF_HEADER, "")
    if not cookie or not header or not hmac.compare_digest(cookie.encode(), header.encode()):
        raise Forbidden(
            "missing or wrong CSRF token: a signed-in page sends the coinlytics_csrf cookie's value as "
            "X-CSRF-Token (API clients send Authorization: Bearer instead)"
        )


def cookie_token(request: Request) -> str | None:
    """The access token of a browser session, checked against CSRF; None without a session cookie."""
    token = request.cookies.get(ACCESS_COOKIE)
    if not token:
        return None
    check_csrf(request)
    return token


def check_same_origin(request: Request, settings: Settings) -> None:
    """Sign-in from this site's own pages only: it takes no CSRF token (there is no session yet), so a page of
    another origin, even one on the same site (another port, a sibling host), must not be able to sign the
    browser in to an account of its choosing."""
    fetch_site = request.headers.get("sec-fetch-site")
    if fetch_site is not None and fetch_site not in ("same-origin", "none"):
        raise Forbidden("sign in from this site's own sign-in page")
    origin = request.headers.get("origin")
    if origin is not None:
        own = {settings.public_url.rstrip("/"), f"{request.url.scheme}://{request.headers.get('host', '')}"}
        if origin.rstrip("/") not in own:
            raise Forbidden("sign in from this site's own sign-in page")
    if not request.headers.get("content-type", "").startswith("application/json"):
        raise UnsupportedMediaType("send the sign-in as JSON (Content-Type: application/json)")
