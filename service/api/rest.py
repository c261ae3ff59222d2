"""The REST front end: `create_app(settings)` builds the FastAPI app; `build_server` wraps it in uvicorn.

Nothing connects at import time, nor when the app is built: the job queue (a Redis client) is made in the
app's lifespan, on the server's event loop, unless the caller hands one in (then the caller closes it).

Routes (one router per resource, service/api/routes/):
- native jobs:      POST /v1/jobs, GET /v1/jobs/{id}, GET /v1/jobs/{id}/images/{i}, GET /v1/jobs/{id}/events (SSE),
                    DELETE /v1/jobs/{id}
- synchronous:      POST /v1/txt2img, /v1/inpaint, /v1/class2img, /v1/layout2img, /v1/semantic2img,
                    /v1/unconditional (answer image/png)
- OpenAI-compatible: POST /v1/images/generations (JSON), POST /v1/images/edits (multipart)
- AUTOMATIC1111-compatible: /sdapi/v1/txt2img, img2img, progress, interrupt, options, ... (routes/sdapi.py)
- the browser playground at / (playground.py)
- GET /v1/models, /healthz, /readyz, /metrics; OpenAPI docs at /docs and /redoc, offline (docs.py; schema at
  /openapi.json)
Errors and their statuses: service/api/errors.py.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI

from service.api import docs, errors, playground
from service.api.calls import CallLimits
from service.api.middleware import Authenticate, BodyLimit, HttpMetrics
from service.api.routes import health, jobs, models, openai, sdapi, sync
from service.auth import Authenticator, check_exposure
from service.config import Settings
from service.metrics import ApiMetrics
from service.queue import JobQueue
from service.quotas import Quotas
from service.tls import rest_scheme, uvicorn_tls
from service.webhooks import Webhooks

log = logging.getLogger(__name__)


def _version() -> str:
    try:
        return importlib.metadata.version("ldm-serve")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"

DESCRIPTION = """Latent Diffusion Model image generation.

* **Native API**: submit a job (`POST /v1/jobs`, images as base64 in JSON), follow it (`GET /v1/jobs/{id}`,
  server-sent events at `/v1/jobs/{id}/events`), fetch its PNGs, cancel it; or call `POST /v1/txt2img` /
  `POST /v1/inpaint` and get the PNG back directly. Besides prompts: `class` (`class_label`), `layout` (boxes
  with labels), `semantic` (a label-map PNG) and `unconditional` jobs, for models conditioned that way
  (synchronous: `/v1/class2img`, `/v1/layout2img`, `/v1/semantic2img`, `/v1/unconditional`).
* **OpenAI-compatible**: `POST /v1/images/generations` and `POST /v1/images/edits` work with the official
  `openai` client (`base_url="http://host:port/v1"`).
* **AUTOMATIC1111-compatible**: `/sdapi/v1/txt2img`, `/sdapi/v1/img2img` (with `mask`), `progress`, `interrupt`,
  `options` (`sd_model_checkpoint`), `sd-models`, `samplers`, `png-info`, ...: A1111 clients such as `webuiapi`
  work as they are (send the API key as `Authorization: Bearer`). Every A1111 field: docs/a1111.md.
* **Authentication**: `Authorization: Bearer <API key>` on every route but `/healthz`, `/readyz` and the docs
  (401: no, malformed or unknown key; 403: revoked key), unless the server runs without keys. Per-key quotas
  (submission rate, jobs in flight, work, stored result bytes) and caps on open progress streams and waiting
  synchronous calls answer 429 with Retry-After and a `code` saying which.
"""


@asynccontextmanager
async def _webhook_loop(app: FastAPI) -> AsyncIterator[None]:
    """The webhook delivery loop (service/webhooks.py), beside the app while it runs, when webhooks are on."""
    app.state.webhooks = Webhooks(app.state.queue, app.state.metrics)
    if not app.state.settings.webhook_allowed_hosts:
        yield
        return
    stop = asyncio.Event()
    task = asyncio.create_task(app.state.webhooks.run(stop), name="webhooks")
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=app.state.settings.webhook_timeout_s + 5)


def create_app(settings: Settings, queue: JobQueue | None = None, *, metrics: ApiMetrics | None = None,
               limits: CallLimits | None = None) -> FastAPI:
    """The app. `queue`: an open JobQueue to use (tests, or one shared with the gRPC server); by default one is
    made from `settings.redis_url` when the app starts and closed when it stops. `metrics` and `limits` (the caps
    on streams and waiting calls): the API process's, shared with the gRPC server when both run in one process;
    by default the app's own."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.queue = queue or JobQueue(settings)
        app.state.quotas = Quotas(app.state.queue)
        try:
            async with _webhook_loop(app):
                yield
        finally:
            if queue is None:
                await app.state.queue.aclose()

    app = FastAPI(title="ldm-serve", version=_version(), description=DESCRIPTION, lifespan=lifespan,
                  docs_url=None, redoc_url=None)  # docs.install serves them without CDNs
    app.state.settings = settings
    app.state.metrics = metrics or ApiMetrics()
    app.state.limits = limits or CallLimits(settings, app.state.metrics)
    errors.install(app)
    for router in (jobs.router, sync.router, openai.router, models.router, health.router, sdapi.router,
                   sdapi.internal):
        app.include_router(router)
    docs.install(app)
    playground.install(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(Authenticate, auth=Authenticator(settings), metrics=app.state.metrics)
    app.add_middleware(HttpMetrics, metrics=app.state.metrics)
    return app


def uvicorn_config(app: FastAPI, settings: Settings, *, host: str | None = None, port: int | None = None,
                   log_level: str = "info", **options: Any) -> uvicorn.Config:
    """uvicorn's config for `app`: at most `rest_max_concurrency` connections and requests at once (503 beyond),
    TLS when configured (service/tls.py); `options`: more of uvicorn.Config's."""
    return uvicorn.Config(app, host=host or settings.rest_host, port=settings.rest_port if port is None else port,
                          log_level=log_level, timeout_graceful_shutdown=5,
                          limit_concurrency=settings.rest_max_concurrency, **uvicorn_tls(settings), **options)


def build_server(settings: Settings, queue: JobQueue | None = None, *, metrics: ApiMetrics | None = None,
                 host: str | None = None, port: int | None = None, log_level: str = "info") -> uvicorn.Server:
    """A uvicorn server for the app on `rest_host`:`rest_port` (or `host`/`port`); `await server.serve()` or
    `server.run()`; set `server.should_exit = True` to stop it gracefully."""
    config = uvicorn_config(create_app(settings, queue, metrics=metrics), settings, host=host, port=port,
                            log_level=log_level, proxy_headers=False)
    return uvicorn.Server(config)


def serve(settings: Settings) -> None:
    """Run the REST API alone until interrupted (`ldm api` runs it beside gRPC: service/serve.py)."""
    log.info("REST API on %s://%s:%d (docs at /docs); %s", rest_scheme(settings), settings.rest_host,
             settings.rest_port, check_exposure(settings))
    build_server(settings).run()
