"""The API explorer (Swagger UI at /docs, ReDoc at /redoc) with every asset served by the platform itself.

The scripts, styles and favicon come from the fastapi-offline package's data, so the explorer works on a
machine without internet access and no page of ours makes a browser talk to a CDN."""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

DOCS_STATIC_URL = "/docs-static"
OAUTH2_REDIRECT_URL = "/docs/oauth2-redirect"
FAVICON = "favicon.png"


# Belt and braces: the bundles hold a few hard-coded outside links (ReDoc's sidebar shows its vendor's logo
# from a CDN); the browser is told to fetch nothing but this origin. Swagger UI's page boots from an inline
# script and ReDoc runs its search in a blob worker.
DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline' blob:; worker-src 'self' blob:; "
    "style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; font-src 'self' data:; connect-src 'self'; "
    "frame-ancestors 'none'"
)


def docs_assets_dir() -> Path:
    return Path(fastapi_offline.__file__).resolve().parent / "static"


def install_docs(app: FastAPI, *, openapi_url: str, title: str) -> None:
    """Adds /docs, /redoc and the static assets they load to ``app``."""
    app.mount(DOCS_STATIC_URL, StaticFiles(directory=docs_assets_dir()), name="docs-static")
    app.include_router(_docs_router(openapi_url, title))


def _docs_router(openapi_url: str, title: str) -> APIRouter:
    router = APIRouter()

    def url(request: Request, path: str) -> str:
        # root_path keeps the links right when a proxy serves the app under a prefix.
        return f"{request.scope.get('root_path', '')}{path}"

    def asset(request: Request, name: str) -> str:
        return url(request, f"{DOCS_STATIC_URL}/{name}")

    @router.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        return _restricted(
            get_swagger_ui_html(
                openapi_url=url(request, openapi_url),
                title=f"{title} explorer",
                swagger_js_url=asset(request, "swagger-ui-bundle.js"),
                swagger_css_url=asset(request, "swagger-ui.css"),
                swagger_favicon_url=asset(request, FAVICON),
                oauth2_redirect_url=url(request, OAUTH2_REDIRECT_URL),
                # Swagger UI would otherwise send the spec's URL to its public online validator.
                swagger_ui_parameters={"validatorUrl": None},
            )
        )

    @router.get(OAUTH2_REDIRECT_URL, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @router.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        return _restricted(
            get_redoc_html(
                openapi_url=url(request, openapi_url),
                title=f"{title} reference",
                redoc_js_url=asset(request, "redoc.standalone.js"),
                redoc_favicon_url=asset(request, FAVICON),
                with_google_fonts=False,
            )
        )

    return router


def _restricted(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = DOCS_CSP
    return page
