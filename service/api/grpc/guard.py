"""`CallGuard`: what every call of ldm.v1.Diffusion passes before its method runs (`interceptor.py` runs it).

The API key comes as metadata `authorization: Bearer <key>` (UNAUTHENTICATED, or PERMISSION_DENIED for a revoked
key; service/auth.py); the calls that submit a job also spend the key's rate (RESOURCE_EXHAUSTED +
`retry-after`; service/quotas.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc

from service.auth import Authenticator, AuthError, current_principal
from service.quotas import Quotas

AUTHORIZATION_METADATA = "authorization"  # "Bearer <API key>"
#: the calls that spend the key's rate
SUBMITTING_METHODS = frozenset({"Generate", "GenerateStream", "Inpaint", "Img2Img", "Upscale", "ClassToImage",
                                "LayoutToImage", "SemanticToImage", "Unconditional"})


class CallGuard:
    """What every call of ldm.v1.Diffusion passes first: its API key, and for the calls that submit a job, the
    key's rate. The caller is left in `current_principal` for the servicer (its jobs-in-flight cap)."""

    def __init__(self, auth: Authenticator, quotas: Quotas) -> None:
        self.auth, self.quotas = auth, quotas

    async def __call__(self, method: str, context: grpc.aio.ServicerContext) -> None:
        metadata = [str(v) for k, v in context.invocation_metadata() or () if k.lower() == AUTHORIZATION_METADATA]
        if len(metadata) > 1:
            raise AuthError("malformed", "malformed authorization: send one authorization metadata entry")
        principal = self.auth.authenticate(metadata[0] if metadata else None)
        current_principal.set(principal)
        if method.rsplit("/", 1)[-1] in SUBMITTING_METHODS:
            await self.quotas.take_token(principal)


Guard = Callable[[str, grpc.aio.ServicerContext], Awaitable[None]]
