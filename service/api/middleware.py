"""Three small ASGI middlewares: authentication, the request body limit and the HTTP metrics.

Order, outermost first: HttpMetrics (counts every answer, refusals included), Authenticate (refuses before a
byte of the body is read), BodyLimit, then the app.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api import errors
from service.auth import Authenticator, AuthError
from service.metrics import ApiMetrics

UNMATCHED = "unmatched"  # the route label of requests no route matched (never the raw path: unbounded labels)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: paths anyone may call: probes (a Redis or key outage must not restart pods) and the API's own description
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/docs", "/redoc", "/openapi.json", "/"})
OPEN_PREFIXES = ("/docs/", "/ui/")  # the docs' files (service/api/docs.py) and the playground's (playground.py)
METRICS_PATH = "/metrics"  # open, or behind its own token (`metrics_token_hash`), never behind an API key
PRINCIPAL = "ldm.principal"  # the scope key of the authenticated caller (service.auth.Principal)


def _authorization(scope: Scope) -> str | None:
    """The Authorization header; two of them are as malformed as a bad one (raises AuthError)."""
    values = [v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"]
    if len(values) > 1:
        raise AuthError("malformed", "malformed authorization: send one Authorization header, not several")
    return values[0] if values else None


@dataclass(frozen=True)
class _Template:
    """Stands in for the matched route in a refused request's scope: HttpMetrics reads only its `path`."""

    path: str


Templates = tuple[tuple[re.Pattern[str], str, frozenset[str]], ...]


def _templates(app: Any) -> Templates:
    """(regex, path template, methods) of every route of the app's OpenAPI schema."""
    paths = app.openapi()["paths"]
    return tuple((compile_path(path)[0], path, frozenset(m.upper() for m in methods))
                 for path, methods in paths.items())


def _label_route(scope: Scope, templates: Templates) -> None:
    """Put the template of the route the request was for in the scope (a refused request never reaches the
    router), so HttpMetrics labels the refusal with it rather than "unmatched"."""
    for regex, path, methods in templates:
        if regex.match(scope["path"]) and scope["method"] in methods:
            scope["route"] = _Template(path)
            return


class Authenticate:
    """Every request but `OPEN_PATHS` and `OPEN_PREFIXES` needs an API key (service/auth.py): 401 / 403 in the
    route family's error shape, answered before the body is read, so nothing of an unauthenticated request is
    parsed, decoded or queued. /metrics needs the metrics token when one is configured. The caller goes into the scope
    (`PRINCIPAL`) for the quotas."""

    def __init__(self, app: ASGIApp, auth: Authenticator, metrics: ApiMetrics) -> None:
        self.app, self.auth, self.metrics = app, auth, metrics
        self._templates: Templates | None = None  # built at the first refusal (the routes are all there by then)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or scope["path"].startswith(OPEN_PREFIXES):
            await self.app(scope, receive, send)
            return
        try:
            if scope["path"] == METRICS_PATH:
                self.auth.check_metrics(_authorization(scope))
            else:
                scope[PRINCIPAL] = self.auth.authenticate(_authorization(scope))
        except AuthError as exc:
            self.metrics.count_auth_failure("rest", exc.reason)
            if self._templates is None and hasattr(scope.get("app"), "openapi"):
                self._templates = _templates(scope["app"])
            _label_route(scope, self._templates or ())
            response = errors.render(Request(scope), errors.to_api_error(exc))
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class BodyLimit:
    """413 once a request body passes `max_bytes`: at once from Content-Length, else while it streams in
    (chunked uploads). Raised from `receive`, so FastAPI's handlers render it in the route's error shape."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self) -> HTTPException:
        return HTTPException(413, f"request body is larger than the limit of {self.max_bytes} bytes")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            seen = self.max_bytes + 1
        else:
            seen = 0

        async def limited() -> Message:
            nonlocal seen
            if seen > self.max_bytes:
                raise self._too_large()
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise self._too_large()
            return message

        await self.app(scope, limited, send)


class HttpMetrics:
    """Count every answered request and time it (until its last byte: a stream's whole life), labelled with
    the matched route's template."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed)
        finally:
            route = getattr(scope.get("route"), "path", None) or UNMATCHED
            method = scope["method"] if scope["method"] in METHODS else "other"
            self.metrics.http_requests.labels(route, method, str(status)).inc()
            self.metrics.http_request_duration.labels(route, method).observe(time.perf_counter() - start)
