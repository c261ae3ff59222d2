"""`StatusInterceptor`: wraps every method of ldm.v1.Diffusion, so that no method picks a status code.

Before the method: the API key is checked from the call's metadata when the method is looked up, before the request
message is received (`guard.CallGuard.authenticate`: a refused call is answered by a handler that never reads its
message, so an unauthenticated caller cannot make the server buffer and parse up to `grpc_max_message_bytes`); then
a message longer than its method's limit (`guard.request_limit`) is refused unparsed (RESOURCE_EXHAUSTED), request
bytes that do not parse become INVALID_ARGUMENT (instead of grpc's UNKNOWN), and the call takes its place among the
process's streams or waiting calls and spends the key's rate (`CallGuard.admit`, held until the call ends). After
it: its exception becomes its status (`status.status_of`), a client that left counts as CANCELLED, and the call is
counted in the metrics. Each method runs in a task of its
own (`_cancellable`), so a cancellation always reaches it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from service.api.grpc.errors import BadRequest, JobEnded, MessageTooLarge
from service.api.grpc.guard import CallGuard, short_name
from service.api.grpc.status import status_of
from service.api.grpc.stubs import SERVICE_NAME
from service.auth import ANONYMOUS, AuthError, Principal, current_principal
from service.metrics import ApiMetrics
from service.quotas import QuotaExceeded

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class _Undecodable:
    """What the tolerant deserializer hands on instead of raising, so the behaviour can answer for it."""

    error: str


@dataclass(frozen=True)
class _TooLarge:
    """A message over its method's limit, handed on unparsed."""

    size: int
    limit: int


def _tolerant(deserialize: Callable[[bytes], Any] | None, limit: int | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        if limit is not None and len(data) > limit:
            return _TooLarge(len(data), limit)
        try:
            return deserialize(data)
        except Exception as exc:  # any parse failure is the client's bytes' fault; the parser's text stays here
            log.debug("event=grpc_undecodable error=%s", exc)
            return _Undecodable(type(exc).__name__)

    return parse


def _parsed(request: Any, method: str) -> Any:
    if isinstance(request, _TooLarge):
        raise MessageTooLarge(short_name(method), request.size, request.limit)
    if isinstance(request, _Undecodable):
        raise BadRequest("request", f"the request bytes are not a valid message for {method} ({request.error})")
    return request


class _Answer:
    """The outcome of one call: an exception becomes its status (`status_of`; the call is aborted with it), a
    client that left or whose deadline passed counts as CANCELLED, and the call is recorded in the metrics."""

    def __init__(self, context: grpc.aio.ServicerContext, method: str, metrics: ApiMetrics | None) -> None:
        self.context, self.method, self.metrics = context, method, metrics
        self.started = time.perf_counter()

    async def __aenter__(self) -> _Answer:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> bool:
        code = grpc.StatusCode.OK
        try:
            if isinstance(exc, Exception) and not isinstance(exc, grpc.aio.AbortError):
                self._count_refusal(exc)
                code, message, trailing = status_of(exc)
                if code == grpc.StatusCode.INTERNAL and not isinstance(exc, JobEnded):
                    log.error("%s failed", self.method, exc_info=exc)
                elif code == grpc.StatusCode.UNAVAILABLE:  # the client reads a fixed text; the detail is here
                    log.warning("event=queue_unavailable method=%s error=%s", self.method, exc)
                await self.context.abort(code, message, trailing_metadata=trailing)
            elif exc is not None:  # the client left, its deadline passed (CancelledError, GeneratorExit), ...
                code = self.context.code() if isinstance(exc, grpc.aio.AbortError) else grpc.StatusCode.CANCELLED
            return False
        finally:
            if self.metrics is not None:
                name = getattr(code, "name", "UNKNOWN")
                self.metrics.observe_grpc(self.method.rsplit("/", 1)[-1], name, time.perf_counter() - self.started)

    def _count_refusal(self, exc: Exception) -> None:
        if self.metrics is not None and isinstance(exc, AuthError):
            self.metrics.count_auth_failure("grpc", exc.reason)
        elif self.metrics is not None and isinstance(exc, QuotaExceeded):
            self.metrics.count_quota_rejection("grpc", exc.quota)


class StatusInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpcio ships no type hints
    """Wraps every method of ldm.v1.Diffusion: its exceptions become status codes (`status_of`), request bytes
    that do not parse become INVALID_ARGUMENT, and every call is counted (`ApiMetrics.observe_grpc`, when
    given). Other services (health, reflection) pass untouched."""

    def __init__(self, metrics: ApiMetrics | None = None, guard: CallGuard | None = None) -> None:
        self.metrics, self.guard = metrics, guard

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or not method.startswith(f"/{SERVICE_NAME}/"):
            return handler
        try:
            principal = ANONYMOUS if self.guard is None else self.guard.authenticate(
                handler_call_details.invocation_metadata)
        except AuthError as exc:
            return _refusal(exc, method, self.metrics, streaming=handler.unary_stream is not None)
        limit = None if self.guard is None else self.guard.request_limit(method)
        options = {"request_deserializer": _tolerant(handler.request_deserializer, limit),
                   "response_serializer": handler.response_serializer}
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _unary(handler.unary_unary, method, self.metrics, self.guard, principal), **options)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _streaming(handler.unary_stream, method, self.metrics, self.guard, principal), **options)
        return handler  # no client-streaming methods in this service


def _refusal(exc: AuthError, method: str, metrics: ApiMetrics | None, *, streaming: bool) -> grpc.RpcMethodHandler:
    """A handler answering `exc` (UNAUTHENTICATED / PERMISSION_DENIED) without reading the request: it takes the
    request as a client stream it never iterates, and has no deserializer, so the message is neither received
    whole nor parsed (the client's unary call sees only the status)."""

    async def refuse(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        async with _Answer(context, method, metrics):
            raise exc

    async def refuse_stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async with _Answer(context, method, metrics):
            raise exc
        yield  # an async generator: the method streams its answer

    if streaming:
        return grpc.stream_stream_rpc_method_handler(refuse_stream)
    return grpc.stream_unary_rpc_method_handler(refuse)


async def _cancellable(awaitable: Awaitable[T]) -> T:
    """Await `awaitable` in a task of its own, so that cancelling the caller takes effect at once, always.

    grpc cancels a handler's task when its client leaves or its deadline passes, and the Redis client can swallow
    that CancelledError (seen with redis-py 8 on Python 3.11: a handler kept following its job's events for a
    caller long gone). Waiting on a separate task cannot lose the cancellation: the handler ends, grpc runs the
    call's done-callbacks (which cancel the abandoned job and mark the call ended), and the child task, cancelled
    too, stops by itself at the latest when its loop sees the call has ended.
    """
    task = asyncio.ensure_future(awaitable)
    task.add_done_callback(_retrieve)
    try:
        await asyncio.wait({task})
    except asyncio.CancelledError:
        task.cancel()
        raise
    return task.result()


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark a child task's outcome as seen (its caller may have been cancelled before it ended)."""
    if not task.cancelled():
        task.exception()


def _admitted(guard: CallGuard | None, method: str,
              principal: Principal) -> contextlib.AbstractAsyncContextManager[None]:
    """Leave the caller in `current_principal` for the servicer (ownership, its quotas), then hold the call's place
    and spend its rate (`CallGuard.admit`) while the block runs."""
    current_principal.set(principal)
    return contextlib.nullcontext() if guard is None else guard.admit(method, principal)


def _unary(behavior: Callable[..., Awaitable[Any]], method: str, metrics: ApiMetrics | None, guard: CallGuard | None,
           principal: Principal) -> Callable[..., Coroutine[Any, Any, Any]]:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        async with _Answer(context, method, metrics):
            request = _parsed(request, method)
            async with _admitted(guard, method, principal):
                return await _cancellable(behavior(request, context))

    return call


def _streaming(behavior: Callable[..., AsyncGenerator[Any, None]], method: str, metrics: ApiMetrics | None,
               guard: CallGuard | None, principal: Principal) -> Callable[..., AsyncIterator[Any]]:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async with _Answer(context, method, metrics):
            request = _parsed(request, method)
            async with _admitted(guard, method, principal):
                messages = behavior(request, context)
                try:
                    while True:
                        try:
                            message = await _cancellable(anext(messages))
                        except StopAsyncIteration:
                            return
                        yield message
                finally:  # grpc closed us (the client left) between two messages: close the servicer's generator too
                    if not getattr(messages, "ag_running", False):
                        await messages.aclose()

    return call
