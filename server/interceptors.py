"""The one place where errors become gRPC statuses."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

from headswap.server.errors import HeadswapError

log = logging.getLogger(__name__)


async def _abort(context: aio.ServicerContext, method: str, exc: BaseException) -> None:
    if isinstance(exc, HeadswapError):
        await context.abort(exc.code, exc.message)
    log.error("unexpected error in %s", method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}: {type(exc).__name__}")


class ErrorInterceptor(aio.ServerInterceptor):
    """Maps `HeadswapError` to its status; anything else is a bug: INTERNAL with a logged traceback."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary_unary(request: Any, context: aio.ServicerContext) -> Any:
                try:
                    return await inner(request, context)
                except aio.AbortError:
                    raise
                except Exception as exc:
                    await _abort(context, method, exc)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def unary_stream(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
                try:
                    async for item in inner_stream(request, context):
                        yield item
                except aio.AbortError:
                    raise
                except Exception as exc:
                    await _abort(context, method, exc)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler
