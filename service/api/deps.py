"""Dependencies of the route handlers: the settings and the job queue of the app serving the request.

Both live on `app.state` (set by `create_app` and its lifespan), never in module globals, so a test can run
several apps against different Redis servers in one process.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from service.config import Settings
from service.jobs import IDEMPOTENCY_KEY, JobQueue


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_queue(request: Request) -> JobQueue:
    queue: JobQueue = request.app.state.queue
    return queue


SettingsDep = Annotated[Settings, Depends(get_settings)]
QueueDep = Annotated[JobQueue, Depends(get_queue)]
IdempotencyKey = Annotated[str | None, Header(
    alias="Idempotency-Key", pattern=IDEMPOTENCY_KEY.pattern,
    description="Resubmitting with the same key answers with the same job (1-255 printable ASCII characters)")]
