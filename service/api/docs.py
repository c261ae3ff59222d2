"""The API's own documentation pages, /docs (Swagger UI) and /redoc (ReDoc), served without the internet.

FastAPI's stock pages load their scripts, styles, favicon and (ReDoc) fonts from CDNs, so on an air-gapped
machine /docs is a blank page. Here the same pages point at assets that the `fastapi-offline` wheel ships
(Swagger UI's bundle and CSS, ReDoc's standalone bundle, a favicon), served under `ASSETS` by the API itself;
Swagger UI's online validator badge (a request to validator.swagger.io) is turned off, and the pages carry a
Content-Security-Policy that lets them load nothing from another origin: ReDoc's bundle still links the Redocly logo
from its CDN (a tracker-like request on every visit, and a broken image offline); the policy stops it.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS = "/docs/assets"  # under /docs/, which the Authenticate middleware leaves open (OPEN_PREFIXES)
SWAGGER = "/docs"
OAUTH2_REDIRECT = "/docs/oauth2-redirect"
REDOC = "/redoc"
#: this origin only; inline scripts (FastAPI's page starts Swagger UI inline) and styles (ReDoc's styled components)
CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
       "img-src 'self' data: blob:; font-src 'self' data:; worker-src 'self' blob:; connect-src 'self'")


def asset_folder() -> Path:
    """The folder of the wheel's Swagger UI and ReDoc files."""
    return Path(str(importlib.resources.files("fastapi_offline") / "static"))


def _local(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = CSP
    return page


def install(app: FastAPI) -> None:
    """Add /docs, /docs/oauth2-redirect, /redoc and the assets to `app`, which was built with docs_url=None
    and redoc_url=None (FastAPI's CDN pages)."""
    openapi_url = app.openapi_url or "/openapi.json"
    title = app.title
    app.mount(ASSETS, StaticFiles(directory=asset_folder()), name="docs-assets")

    @app.get(SWAGGER, include_in_schema=False)
    async def swagger() -> HTMLResponse:
        return _local(get_swagger_ui_html(
            openapi_url=openapi_url, title=f"{title} - API docs", oauth2_redirect_url=OAUTH2_REDIRECT,
            swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js", swagger_css_url=f"{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS}/favicon.png",
            swagger_ui_parameters={"validatorUrl": None, "persistAuthorization": True}))

    @app.get(OAUTH2_REDIRECT, include_in_schema=False)
    async def oauth2_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(REDOC, include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return _local(get_redoc_html(openapi_url=openapi_url, title=f"{title} - API reference",
                                     redoc_js_url=f"{ASSETS}/redoc.standalone.js",
                                     redoc_favicon_url=f"{ASSETS}/favicon.png", with_google_fonts=False))
