"""/docs and /redoc work air-gapped: their HTML names no external URL and every asset it names is served by the API
itself, open even on a keyed server. (That they render in a real Chromium: test_playground.py.)"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator

import pytest

from service.config import Settings
from tests.integration.secure import Keys
from tests.integration.test_rest import Api, serving

pytestmark = pytest.mark.timeout(60)
#: an absolute URL (with a scheme, or protocol-relative) anywhere in a page
EXTERNAL = re.compile(r"""(?:[a-z][a-z0-9+.-]*:)?//[^\s"'<>]+""", re.IGNORECASE)
ASSET = re.compile(r"""(?:src|href)=["']([^"']+)["']""")
TYPES = {".js": "javascript", ".css": "text/css", ".png": "image/png"}


@pytest.fixture
def keyed(make_settings: Callable[..., Settings]) -> Iterator[Api]:
    with contextlib.ExitStack() as stack:
        yield stack.enter_context(serving(make_settings(**Keys.fresh().settings())))


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_name_no_external_url_and_their_assets_are_served_without_a_key(keyed: Api, page: str) -> None:
    resp = keyed.client.get(page)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    assert EXTERNAL.findall(resp.text) == []
    assets = ASSET.findall(resp.text)
    assert any(a.endswith(".js") for a in assets), assets
    for asset in assets:
        got = keyed.client.get(asset)
        assert got.status_code == 200, asset
        kind = next(t for ext, t in TYPES.items() if asset.endswith(ext))
        assert kind in got.headers["content-type"] and len(got.content) > 1000, asset
    assert "/openapi.json" in resp.text and keyed.client.get("/openapi.json").status_code == 200


def test_swagger_ui_has_no_online_validator_and_keeps_the_api_key(keyed: Api) -> None:
    """Swagger UI's validator badge would call validator.swagger.io from the reader's browser."""
    html = keyed.client.get("/docs").text
    assert '"validatorUrl": null' in html and '"persistAuthorization": true' in html
    assert keyed.client.get("/docs/oauth2-redirect").status_code == 200
    assert keyed.client.get("/docs/assets/nothing.js").status_code == 404
    assert keyed.client.get("/v1/models").status_code == 401  # the rest stays keyed
