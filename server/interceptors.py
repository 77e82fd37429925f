"""The one place where errors become gRPC statuses, and where every call is counted, timed and logged."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

from headswap.server.errors import HeadswapError
from headswap.server.metrics import Metrics

log = logging.getLogger(__name__)
access = logging.getLogger("headswap.access")

REQUEST_ID = "x-request-id"
_OUR_SERVICE = "/headswap.v1.HeadswapService/"


def _rpc_name(method: str) -> str:
    return method.removeprefix(_OUR_SERVICE) if method.startswith(_OUR_SERVICE) else method.lstrip("/")


def _request_id(context: aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID and isinstance(value, str) and 0 < len(value) <= 128:
            return value
    return uuid.uuid4().hex


class ErrorInterceptor(aio.ServerInterceptor):
    """Maps `HeadswapError` to its status; anything else is a bug: INTERNAL with a logged traceback.
    Counts and times every call by method and code, and logs it with its request id."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self.metrics = metrics

    def _done(
        self, rpc: str, request_id: str, code: grpc.StatusCode, started: float, message: str = ""
    ) -> None:
        seconds = time.perf_counter() - started
        if self.metrics is not None:
            self.metrics.requests.labels(rpc, code.name).inc()
            self.metrics.request_duration.labels(rpc).observe(seconds)
        level = logging.INFO if code in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED) else logging.WARNING
        if code == grpc.StatusCode.INTERNAL:
            level = logging.ERROR
        if access.isEnabledFor(level):
            access.log(
                level,
                "%s %s %.1fms%s",
                rpc,
                code.name,
                seconds * 1000,
                f": {message}" if message else "",
                extra={
                    "request_id": request_id,
                    "rpc": rpc,
                    "code": code.name,
                    "duration_ms": round(seconds * 1000, 3),
                },
            )

    async def _fail(
        self, context: aio.ServicerContext, rpc: str, request_id: str, started: float, exc: BaseException
    ) -> None:
        if isinstance(exc, HeadswapError):
            self._done(rpc, request_id, exc.code, started, exc.message)
            await context.abort(exc.code, exc.message)
        log.error("unexpected error in %s (request %s)", rpc, request_id, exc_info=exc)
        self._done(rpc, request_id, grpc.StatusCode.INTERNAL, started, type(exc).__name__)
        await context.abort(
            grpc.StatusCode.INTERNAL,
            f"internal error in {rpc} (request id {request_id}): {type(exc).__name__}",
        )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        rpc = _rpc_name(handler_call_details.method)
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary_unary(request: Any, context: aio.ServicerContext) -> Any:
                started = time.perf_counter()
                request_id = _request_id(context)
                context.set_trailing_metadata(((REQUEST_ID, request_id),))
                try:
                    reply = await inner(request, context)
                except aio.AbortError:
                    self._done(rpc, request_id, context.code() or grpc.StatusCode.UNKNOWN, started)
                    raise
                except BaseException as exc:
                    if isinstance(exc, Exception):
                        await self._fail(context, rpc, request_id, started, exc)
                    self._done(rpc, request_id, grpc.StatusCode.CANCELLED, started)
                    raise
                self._done(rpc, request_id, grpc.StatusCode.OK, started)
                return reply

            return grpc.unary_unary_rpc_method_handler(
                unary_unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def unary_stream(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
                started = time.perf_counter()
                request_id = _request_id(context)
                context.set_trailing_metadata(((REQUEST_ID, request_id),))
                try:
                    async for item in inner_stream(request, context):
                        yield item
                except aio.AbortError:
                    self._done(rpc, request_id, context.code() or grpc.StatusCode.UNKNOWN, started)
                    raise
                except BaseException as exc:
                    if isinstance(exc, Exception):
                        await self._fail(context, rpc, request_id, started, exc)
                    self._done(rpc, request_id, grpc.StatusCode.CANCELLED, started)
                    raise
                self._done(rpc, request_id, grpc.StatusCode.OK, started)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler
