"""The browser playground at `/`: static HTML, CSS and JavaScript (service/api/static/) that the API serves itself.

No CDN and no build step: the page is plain JavaScript over the native REST API, so it works air-gapped and needs
nothing but this package. The page and its files are open (they hold no data); every call the page makes carries
the API key typed into it (kept in the tab's sessionStorage), and the API checks it as for any client.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"
PAGE = "/"
#: this origin only, no inline script; images also from blob: (results) and data: (uploads)
CSP = "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; connect-src 'self' blob:"
ASSETS = "/ui"  # the Authenticate middleware leaves "/" and "/ui/..." open (OPEN_PATHS, OPEN_PREFIXES)


def install(app: FastAPI) -> None:
    """Add the page at `PAGE` and its files under `ASSETS` to `app`."""
    app.mount(ASSETS, StaticFiles(directory=STATIC), name="playground")

    @app.get(PAGE, include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache",
                                                                  "Content-Security-Policy": CSP})
