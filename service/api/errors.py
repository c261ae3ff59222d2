"""One mapping from every error the API can meet to an HTTP answer, in two shapes.

Native routes answer FastAPI's shape: `{"detail": "message"}`, and for validation errors (422)
`{"detail": [{"loc": [...], "msg": ..., "type": ...}, ...], "message": "field: problem; ..."}`.
OpenAI-compatible routes (`/v1/images/...`) answer OpenAI's: `{"error": {"message", "type", "param", "code"}}`,
with 400 where we would answer 422 (that is what OpenAI's API and its clients expect).

| error                              | status | notes                                   |
|------------------------------------|--------|-----------------------------------------|
| AuthError: no, malformed, unknown key | 401  | WWW-Authenticate: Bearer (service/auth.py) |
| AuthError: revoked key             | 403    |                                         |
| PriorityNotAllowed                 | 403    | priority above the key's max_priority   |
| request or admission validation    | 422    | each problem names its field            |
| ImageError                         | 413/422| 413: too many bytes or pixels           |
| body over `max_body_bytes`         | 413    |                                         |
| JobNotFound                        | 404    |                                         |
| IdempotencyConflict                | 409    | key reused for a different request      |
| QueueFull                          | 429    | Retry-After: `queue_retry_after_s`      |
| QuotaExceeded: a key's quota     | 429    | Retry-After; rate, in flight, work, stored bytes (quotas.py) |
| QuotaExceeded: streams, waiting calls | 429 | per key and per process (service/api/calls.py)     |
| QueueUnavailable (Redis down)      | 503    | Retry-After: 1                          |
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.auth import AuthError, PriorityNotAllowed
from service.images import ImageError
from service.metrics import ApiMetrics
from service.queue import IdempotencyConflict, JobNotFound, QueueFull, QueueUnavailable
from service.quotas import QuotaExceeded

log = logging.getLogger(__name__)
OPENAI_PREFIX = "/v1/images/"
_OPENAI_TYPES = {500: "server_error", 400: "invalid_request_error", 401: "authentication_error",
                 403: "permission_error", 404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error",
                 429: "rate_limit_error", 503: "server_error", 504: "timeout_error"}
_QUOTA_CODES = {"rate": "rate_limited", "in_flight": "too_many_jobs_in_flight", "work": "work_budget_exceeded",
                "stored_bytes": "storage_quota_exceeded", "streams": "too_many_streams",
                "waiting_calls": "too_many_waiting_calls", "server_streams": "server_busy",
                "server_waiting_calls": "server_busy"}


class ApiError(Exception):
    """An answer other than success: status, a message for people, and where known the offending `param`."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: Mapping[str, str] | None = None, extra: Mapping[str, Any] | None = None,
                 problems: Sequence[Mapping[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})
        self.problems = list(problems or [])


def _field(loc: Sequence[Any]) -> str:
    """('body', 'width') -> 'width'; ('header', 'Idempotency-Key') -> 'Idempotency-Key'."""
    parts = [str(p) for p in loc if p not in ("body", "query", "header", "path", "form")]
    return ".".join(parts) or "body"


def _summary(field: str, msg: str) -> str:
    return msg if msg.startswith(field) else f"{field}: {msg}"


def _short(value: Any) -> bool:
    return isinstance(value, bool | int | float) or (isinstance(value, str) and len(value) <= 64)


def validation_error(errors: Sequence[Mapping[str, Any]], *, location: str = "body") -> ApiError:
    """422 from pydantic/FastAPI errors; inputs are echoed only when short (never an image's base64)."""
    problems = []
    for e in errors:
        loc = list(e["loc"]) if e["loc"] and e["loc"][0] in ("body", "query", "header", "path") else \
            [location, *e["loc"]]
        problem = {"loc": loc, "msg": e["msg"], "type": e["type"]}
        if _short(e.get("input")):
            problem["input"] = e["input"]
        problems.append(problem)
    fields = [_field(p["loc"]) for p in problems]
    message = "; ".join(_summary(f, p["msg"]) for f, p in zip(fields, problems, strict=True))
    return ApiError(422, message, param=fields[0] if fields else None, code="invalid_value", problems=problems)


def _refusal(exc: Exception) -> ApiError | None:
    """Refusals of a caller (credentials, quotas, a full queue), or None."""
    match exc:
        case AuthError():
            return ApiError(exc.status, str(exc), code="key_revoked" if exc.status == 403 else "invalid_api_key",
                            headers={"WWW-Authenticate": exc.challenge})
        case PriorityNotAllowed():
            return ApiError(403, str(exc), param="priority", code="priority_not_allowed")
        case QueueFull() | QuotaExceeded():
            code = "queue_full" if isinstance(exc, QueueFull) else _QUOTA_CODES[exc.quota]
            return ApiError(429, str(exc), code=code, headers={"Retry-After": str(exc.retry_after_s)})
    return None


def to_api_error(exc: Exception) -> ApiError:
    """The ApiError for any exception the handlers are registered for."""
    refusal = _refusal(exc)
    if refusal is not None:
        return refusal
    match exc:
        case ApiError():
            return exc
        case RequestValidationError():
            return validation_error(exc.errors())
        case ValidationError():
            return validation_error(exc.errors(include_url=False))
        case ImageError() if exc.status == 422:
            return validation_error([{"loc": ("body", exc.field), "msg": exc.message, "type": "invalid_image"}])
        case ImageError():
            return ApiError(exc.status, exc.message, param=exc.field, code="image_too_large")
        case QueueUnavailable():  # its detail (Redis's address, the driver's text) goes to the log, not to clients
            log.warning("event=queue_unavailable error=%s", exc)
            return ApiError(503, "the job queue is unavailable; retry shortly", code="queue_unavailable",
                            headers={"Retry-After": "1"})
        case JobNotFound():
            return ApiError(404, str(exc), code="job_not_found")
        case IdempotencyConflict():
            return ApiError(409, str(exc), param="Idempotency-Key", code="idempotency_conflict")
        case StarletteHTTPException():
            return ApiError(exc.status_code, str(exc.detail), headers=exc.headers)
    raise TypeError(f"no mapping for {type(exc).__name__}") from exc


def render(request: Request, error: ApiError) -> JSONResponse:
    """The error in the shape of the route family the request went to."""
    if request.url.path.startswith(OPENAI_PREFIX):
        status = 400 if error.status == 422 else error.status
        body: dict[str, Any] = {"error": {"message": error.message, "type": _OPENAI_TYPES.get(status, "api_error"),
                                          "param": error.param, "code": error.code}}
    else:
        status = error.status
        body = {"detail": error.problems, "message": error.message} if error.problems else {"detail": error.message}
        if error.code:
            body["code"] = error.code  # a stable reason code beside the short text
    body.update(error.extra)
    return JSONResponse(body, status_code=status, headers=error.headers)


async def _handle(request: Request, exc: Exception) -> JSONResponse:
    return render(request, to_api_error(exc))


async def _quota(request: Request, exc: Exception) -> JSONResponse:
    """A quota refusal is counted (ldm_quota_rejections_total), then answered like any error."""
    if isinstance(exc, QuotaExceeded):
        metrics: ApiMetrics = request.app.state.metrics
        metrics.count_quota_rejection("rest", exc.quota)
    return await _handle(request, exc)


async def _internal(request: Request, exc: Exception) -> JSONResponse:
    """A bug: 500 in the route's shape, no details (Starlette still raises it on, so the server logs it)."""
    return render(request, ApiError(500, "internal error", code="internal_error"))


def install(app: FastAPI) -> None:
    """Register the handlers on `app`."""
    for kind in (ApiError, RequestValidationError, ValidationError, ImageError, QueueFull, QueueUnavailable,
                 JobNotFound, IdempotencyConflict, StarletteHTTPException, AuthError, PriorityNotAllowed):
        app.add_exception_handler(kind, _handle)
    app.add_exception_handler(QuotaExceeded, _quota)
    app.add_exception_handler(Exception, _internal)
