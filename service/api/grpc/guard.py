"""`CallGuard`: what every call of ldm.v1.Diffusion passes before its method runs (`interceptor.py` runs it).

The API key comes as metadata `authorization: Bearer <key>` (UNAUTHENTICATED, or PERMISSION_DENIED for a revoked
key; service/auth.py). It is checked from the call's metadata alone, when the server looks up the method
(`authenticate`), before the request message is received or parsed: an unauthenticated caller cannot make the server
read, buffer and parse a message. Then (`admit`): the call takes its place among the process's progress streams
(WatchJob) or waiting calls (every method that generates: it waits for its images), within the key's and the
process's caps (service/api/calls.py), and the calls that submit a job spend the key's rate (service/quotas.py);
both refusals are RESOURCE_EXHAUSTED + `retry-after`.

Sizes (`request_limits`): each method receives at most what it needs: `grpc_max_request_bytes` for its parameters,
plus `max_image_bytes` for each image it carries (Inpaint: image and mask). The server's own receive limit is the
largest of them (capped by `grpc_max_message_bytes`), and the interceptor checks a message against its method's
limit before parsing it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

from service.api.calls import CallLimits, Kind
from service.auth import Authenticator, AuthError, Principal
from service.config import Settings
from service.quotas import Quotas

AUTHORIZATION_METADATA = "authorization"  # "Bearer <API key>"
#: the calls that spend the key's rate, and wait for their job's images
SUBMITTING_METHODS = frozenset({"Generate", "GenerateStream", "Inpaint", "Img2Img", "Upscale", "ClassToImage",
                                "LayoutToImage", "SemanticToImage", "Unconditional"})
#: the calls that only follow a job's events, for as long as it runs
STREAMING_READS = frozenset({"WatchJob"})
#: images (bytes fields of up to max_image_bytes) in each method's request; the others carry none
IMAGES_PER_REQUEST = {"Inpaint": 2, "Img2Img": 1, "Upscale": 1, "SemanticToImage": 1}


def short_name(method: str) -> str:
    """'/ldm.v1.Diffusion/Generate' -> 'Generate'."""
    return method.rsplit("/", 1)[-1]


def request_limit(settings: Settings, method: str) -> int:
    """The largest request message `method` (short name) takes, in bytes."""
    images = IMAGES_PER_REQUEST.get(method, 0)
    return min(settings.grpc_max_message_bytes, settings.grpc_max_request_bytes + images * settings.max_image_bytes)


def receive_limit(settings: Settings) -> int:
    """The server's receive limit: the largest method's (grpc core buffers no longer message)."""
    return max(request_limit(settings, method) for method in [*IMAGES_PER_REQUEST, "Generate"])


def _kind(method: str) -> Kind | None:
    name = short_name(method)
    return "waiting_calls" if name in SUBMITTING_METHODS else "streams" if name in STREAMING_READS else None


class CallGuard:
    """What every call of ldm.v1.Diffusion passes first: its API key (from the metadata, before the message), then
    its place among streams or waiting calls and, for the calls that submit a job, the key's rate."""

    def __init__(self, auth: Authenticator, quotas: Quotas, limits: CallLimits) -> None:
        self.auth, self.quotas, self.limits = auth, quotas, limits

    def request_limit(self, method: str) -> int:
        """The largest request message of `method` (full or short name), in bytes."""
        return request_limit(self.limits.settings, short_name(method))

    def authenticate(self, metadata: Sequence[tuple[str, Any]] | None) -> Principal:
        """The caller of a call with this invocation metadata. Raises AuthError."""
        values = [str(v) for k, v in metadata or () if k.lower() == AUTHORIZATION_METADATA]
        if len(values) > 1:
            raise AuthError("malformed", "malformed authorization: send one authorization metadata entry")
        return self.auth.authenticate(values[0] if values else None)

    @contextlib.asynccontextmanager
    async def admit(self, method: str, principal: Principal) -> AsyncIterator[None]:
        """While the block runs, hold the call's place (a stream or a waiting call), having spent one unit of
        `principal`'s rate when `method` submits a job. Raises QuotaExceeded."""
        kind = _kind(method)
        with self.limits.hold(kind, principal) if kind is not None else contextlib.nullcontext():
            if short_name(method) in SUBMITTING_METHODS:
                await self.quotas.take_token(principal)
            yield
