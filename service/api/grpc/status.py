"""The one place exceptions become gRPC status codes (`status_of`), for every method of ldm.v1.Diffusion.

Validation -> INVALID_ARGUMENT (each problem named by its proto field), a bad API key -> UNAUTHENTICATED or
PERMISSION_DENIED, a full queue or an exhausted quota -> RESOURCE_EXHAUSTED and a queue that does not answer ->
UNAVAILABLE (both with `retry-after`), an unknown job -> NOT_FOUND, a failed job -> the code of its reason; only
real faults -> INTERNAL.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
from pydantic import ValidationError

from service.api.grpc.errors import BadRequest, JobEnded, MessageTooLarge, ResultsExpired, WaitTimeout
from service.api.grpc.stubs import pb
from service.auth import AuthError, PriorityNotAllowed
from service.images import ImageError
from service.queue import IdempotencyConflict, Job, JobNotFound, JobStatus, QueueFull, QueueUnavailable
from service.quotas import QuotaExceeded

RETRY_AFTER_METADATA = "retry-after"  # trailing metadata of RESOURCE_EXHAUSTED and UNAVAILABLE (seconds)
_PARAMETER_FIELDS = frozenset(pb.GenerationParameters.DESCRIPTOR.fields_by_name)

Metadata = tuple[tuple[str, str], ...]
_CODES: dict[type[Exception], grpc.StatusCode] = {
    ImageError: grpc.StatusCode.INVALID_ARGUMENT,
    BadRequest: grpc.StatusCode.INVALID_ARGUMENT,
    JobNotFound: grpc.StatusCode.NOT_FOUND,
    ResultsExpired: grpc.StatusCode.NOT_FOUND,
    IdempotencyConflict: grpc.StatusCode.ALREADY_EXISTS,
    WaitTimeout: grpc.StatusCode.DEADLINE_EXCEEDED,
    MessageTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


#: a failed job's error starts with its reason (the worker's JobFailure: "reason: message"; the queue's own
#: "deadline exceeded: ..."); reasons not listed (internal, gave up after N attempts) answer INTERNAL
_FAILURE_CODES = {
    "deadline exceeded": grpc.StatusCode.DEADLINE_EXCEEDED,  # not started within job_deadline_s
    "unsupported": grpc.StatusCode.INVALID_ARGUMENT,  # the model cannot do this task
    "invalid_input": grpc.StatusCode.INVALID_ARGUMENT,  # an input the worker could not use
    "out_of_memory": grpc.StatusCode.RESOURCE_EXHAUSTED,  # even one sample does not fit the device
}


def _job_ended_code(job: Job) -> grpc.StatusCode:
    if job.status == JobStatus.cancelled:
        return grpc.StatusCode.CANCELLED
    reason = (job.error or "").split(":", 1)[0]
    return _FAILURE_CODES.get(reason, grpc.StatusCode.INTERNAL)


def _field_path(loc: Sequence[Any]) -> str:
    """A schema field's place in the proto request: width -> parameters.width; image stays image."""
    name = ".".join(str(p) for p in loc) or "request"
    return f"parameters.{name}" if loc and loc[0] in _PARAMETER_FIELDS else name


def validation_message(exc: ValidationError) -> str:
    """Every problem, each with its field: 'parameters.width: width must be a multiple of 8, got 100; ...'."""
    return "; ".join(f"{_field_path(e['loc'])}: {e['msg']}" for e in exc.errors(include_url=False))


def status_of(exc: Exception) -> tuple[grpc.StatusCode, str, Metadata]:
    """The status code, message and trailing metadata that answer `exc`."""
    if isinstance(exc, ValidationError):
        return grpc.StatusCode.INVALID_ARGUMENT, f"invalid request: {validation_message(exc)}", ()
    if isinstance(exc, AuthError):
        code = grpc.StatusCode.PERMISSION_DENIED if exc.status == 403 else grpc.StatusCode.UNAUTHENTICATED
        return code, str(exc), ()
    if isinstance(exc, PriorityNotAllowed):
        return grpc.StatusCode.PERMISSION_DENIED, str(exc), ()
    if isinstance(exc, QueueFull | QuotaExceeded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), ((RETRY_AFTER_METADATA, str(exc.retry_after_s)),)
    if isinstance(exc, QueueUnavailable):
        # its detail (Redis's address, the driver's text) is for the log (the interceptor logs it), not for clients
        return (grpc.StatusCode.UNAVAILABLE, "the job queue is unavailable; retry shortly",
                ((RETRY_AFTER_METADATA, "1"),))
    if isinstance(exc, JobEnded):
        return _job_ended_code(exc.job), str(exc), ()
    code = next((c for kind, c in _CODES.items() if isinstance(exc, kind)), None)
    if code is not None:
        return code, str(exc), ()
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the server log", ()
