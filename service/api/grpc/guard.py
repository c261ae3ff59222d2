"""`CallGuard`: what every call of ldm.v1.Diffusion passes before its method runs (`interceptor.py` runs it).

The API key comes as metadata `authorization: Bearer <key>` (UNAUTHENTICATED, or PERMISSION_DENIED for a revoked
key; service/auth.py). It is checked from the call's metadata alone, when the server looks up the method
(`authenticate`), before the request message is received or parsed: an unauthenticated caller cannot make the server
read, buffer and parse a message of up to `grpc_max_message_bytes`. The calls that submit a job then spend the key's
rate (`admit`: RESOURCE_EXHAUSTED + `retry-after`; service/quotas.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from service.auth import Authenticator, AuthError, Principal
from service.quotas import Quotas

AUTHORIZATION_METADATA = "authorization"  # "Bearer <API key>"
#: the calls that spend the key's rate
SUBMITTING_METHODS = frozenset({"Generate", "GenerateStream", "Inpaint", "Img2Img", "Upscale", "ClassToImage",
                                "LayoutToImage", "SemanticToImage", "Unconditional"})


class CallGuard:
    """What every call of ldm.v1.Diffusion passes first: its API key (from the metadata, before the message), and
    for the calls that submit a job, the key's rate."""

    def __init__(self, auth: Authenticator, quotas: Quotas) -> None:
        self.auth, self.quotas = auth, quotas

    def authenticate(self, metadata: Sequence[tuple[str, Any]] | None) -> Principal:
        """The caller of a call with this invocation metadata. Raises AuthError."""
        values = [str(v) for k, v in metadata or () if k.lower() == AUTHORIZATION_METADATA]
        if len(values) > 1:
            raise AuthError("malformed", "malformed authorization: send one authorization metadata entry")
        return self.auth.authenticate(values[0] if values else None)

    async def admit(self, method: str, principal: Principal) -> None:
        """Spend one unit of `principal`'s rate when `method` submits a job. Raises QuotaExceeded."""
        if method.rsplit("/", 1)[-1] in SUBMITTING_METHODS:
            await self.quotas.take_token(principal)
