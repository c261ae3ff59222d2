"""Liveness, readiness and the Prometheus scrape endpoint of the API process."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request, Response, Security
from fastapi.responses import JSONResponse

from service.api.deps import METRICS_BEARER, QueueDep, SettingsDep
from service.metrics import ApiMetrics
from service.queue import QueueUnavailable

log = logging.getLogger(__name__)
router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="Liveness")
async def healthz() -> dict[str, str]:
    """The process answers; touches nothing else (no Redis), so a Redis outage does not restart API pods."""
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness", responses={503: {"description": "not ready, with the reason"}})
async def readyz(queue: QueueDep, settings: SettingsDep) -> JSONResponse:
    """Ready when Redis answers and a live worker serves the default model; 503 with the reason otherwise."""
    body: dict[str, Any] = {"model": settings.default_model}
    try:
        await queue.ping()
        workers = await queue.workers(settings.default_model)
    except QueueUnavailable as exc:  # the detail names Redis's address: the log has it, the open endpoint does not
        log.warning("event=readyz_redis_unavailable error=%s", exc)
        return JSONResponse({**body, "status": "unavailable", "reason": "Redis unreachable"}, status_code=503)
    if not workers:
        return JSONResponse({**body, "status": "unavailable", "workers": 0,
                             "reason": f"no live worker serves the default model {settings.default_model!r}"},
                            status_code=503)
    return JSONResponse({**body, "status": "ready", "workers": len(workers)})


@router.get("/metrics", response_class=Response, summary="Prometheus metrics",
            dependencies=[Security(METRICS_BEARER)],
            responses={200: {"content": {"text/plain": {}}}, 401: {"description": "the metrics token is set and "
                                                                   "was not sent"}})
async def metrics(request: Request, queue: QueueDep) -> Response:
    """The API process's metrics in the Prometheus text format (queue statistics read from Redis at most once a
    second; `ldm_redis_up` is 0 when that fails). Open, unless the server sets a metrics token
    (LDM_METRICS_TOKEN_HASH): then `Authorization: Bearer <token>`."""
    api_metrics: ApiMetrics = request.app.state.metrics
    body, content_type = await api_metrics.render(queue)
    return Response(body, media_type=content_type)
