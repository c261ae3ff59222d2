"""Dependencies of the route handlers: the settings, the job queue, the caller and what submits for it.

All live on `app.state` (set by `create_app` and its lifespan) or in the request's scope (the caller, put there
by the `Authenticate` middleware), never in module globals, so a test can run several apps against different
Redis servers in one process.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, Header, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.api.calls import CallLimits
from service.api.middleware import PRINCIPAL
from service.api.submit import Submitter
from service.auth import ANONYMOUS, Principal
from service.config import Settings
from service.queue import IDEMPOTENCY_KEY, JobQueue
from service.quotas import Quotas

#: the API key scheme, as /docs shows it (its Authorize button); the `Authenticate` middleware enforces it
BEARER = HTTPBearer(auto_error=False, scheme_name="ApiKey", bearerFormat="ldm_...",
                    description="An API key: `Authorization: Bearer <key>` (`ldm keys new` makes one). Needed "
                    "unless the server runs without keys (loopback, or LDM_AUTH_DISABLED).")
METRICS_BEARER = HTTPBearer(auto_error=False, scheme_name="MetricsToken",
                            description="The metrics token, when the server sets LDM_METRICS_TOKEN_HASH.")
AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "no API key, a malformed one or an unknown one (WWW-Authenticate: Bearer)"},
    403: {"description": "a revoked API key"}}
QUOTA_RESPONSES: dict[int | str, dict[str, Any]] = {
    429: {"description": "the queue is full, or the API key is over a quota (rate, jobs in flight, work, stored "
                         "bytes) or a cap on concurrent calls; see Retry-After and the error's code"}}


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_queue(request: Request) -> JobQueue:
    queue: JobQueue = request.app.state.queue
    return queue


def get_principal(request: Request,
                  _: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)] = None) -> Principal:
    """The caller the middleware let in (ANONYMOUS without keys). Declaring BEARER here puts the scheme on every
    protected operation of the OpenAPI schema."""
    principal: Principal = request.scope.get(PRINCIPAL, ANONYMOUS)
    return principal


def get_limits(request: Request) -> CallLimits:
    limits: CallLimits = request.app.state.limits
    return limits


async def hold_waiting_call(request: Request, principal: Annotated[Principal, Depends(get_principal)],
                            ) -> AsyncIterator[None]:
    """A place among the waiting synchronous calls (service/api/calls.py) for as long as the call runs; 429 when the
    key or the process is at its cap, before the key's rate is spent or anything is queued. A router dependency of
    the synchronous routes, so it runs before their other dependencies."""
    with get_limits(request).hold("waiting_calls", principal):
        yield


SettingsDep = Annotated[Settings, Depends(get_settings)]
QueueDep = Annotated[JobQueue, Depends(get_queue)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
IdempotencyKey = Annotated[str | None, Header(
    alias="Idempotency-Key", pattern=IDEMPOTENCY_KEY.pattern,
    description="Resubmitting with the same key answers with the same job (1-255 printable ASCII characters)")]


async def get_submitter(request: Request, queue: QueueDep, settings: SettingsDep,
                        principal: PrincipalDep) -> Submitter:
    """A submitter for the caller, after spending one unit of its rate (429 here, before any image is decoded)."""
    quotas: Quotas = request.app.state.quotas
    await quotas.take_token(principal)
    return Submitter(queue, settings, quotas, principal)


SubmitterDep = Annotated[Submitter, Depends(get_submitter)]
