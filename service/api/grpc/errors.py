"""What the servicer raises that is neither a schema nor a queue exception; `status.py` maps each to its code."""

from __future__ import annotations

from service.queue import Job, JobStatus


class BadRequest(ValueError):
    """A request the schemas cannot even be asked about (-> INVALID_ARGUMENT); `field` names the culprit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class WaitTimeout(Exception):
    """The job did not end before the call's deadline (-> DEADLINE_EXCEEDED)."""

    def __init__(self, job_id: str, kept: bool) -> None:
        fate = ("it is left to finish: resend the request with the same idempotency key for its result" if kept
                else "it was cancelled")
        super().__init__(f"job {job_id} did not finish before the call's deadline; {fate}")


class JobEnded(Exception):
    """The job ended without images: cancelled (-> CANCELLED) or failed (-> the code of its reason, see
    `status._FAILURE_CODES`; INTERNAL when none applies)."""

    def __init__(self, job: Job) -> None:
        detail = f"failed: {job.error}" if job.status == JobStatus.failed else f"was {job.status.value}"
        super().__init__(f"job {job.id} {detail}")
        self.job = job


class ResultsExpired(Exception):
    """The job succeeded but its PNGs are gone (result TTL) (-> NOT_FOUND)."""


class MessageTooLarge(Exception):
    """A request message longer than its method's limit (`guard.request_limit`) (-> RESOURCE_EXHAUSTED, as grpc's
    own receive limit answers); never parsed."""

    def __init__(self, method: str, size: int, limit: int) -> None:
        super().__init__(f"the {method} request is {size} bytes, more than the {limit} bytes it may be "
                         "(grpc_max_request_bytes, plus max_image_bytes per image it carries)")
