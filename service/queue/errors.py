"""The queue's errors; the front ends map each to one HTTP status and one gRPC code (service/api/errors.py)."""

from __future__ import annotations


class QueueError(Exception):
    """Base of the queue's errors."""


class QueueUnavailable(QueueError):
    """Redis could not be reached after the configured retries (-> 503 / UNAVAILABLE)."""


class QueueFull(QueueError):
    """The model's queue holds its limit of unfinished jobs (-> 429 / RESOURCE_EXHAUSTED with Retry-After)."""

    def __init__(self, model: str, depth: int, limit: int, retry_after_s: int) -> None:
        super().__init__(f"the queue of model {model!r} is full ({depth} of {limit} jobs); retry in {retry_after_s} s")
        self.model, self.depth, self.limit, self.retry_after_s = model, depth, limit, retry_after_s


class JobNotFound(QueueError, KeyError):
    """No job with that id (never existed, or its record expired) (-> 404 / NOT_FOUND)."""

    def __str__(self) -> str:
        return f"no job {self.args[0]!r}"


class IdempotencyConflict(QueueError):
    """The idempotency key names a job submitted with a different request (409 over REST, ALREADY_EXISTS gRPC)."""
