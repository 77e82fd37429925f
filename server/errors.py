"""One error tree, one status table.

Domain code raises these; the interceptor in `headswap.server.interceptors` maps each to its gRPC status.
Anything else that escapes a handler is a bug: it becomes INTERNAL with a logged traceback.
"""

from __future__ import annotations

import grpc


class HeadswapError(Exception):
    """An error whose message is meant for the caller, with the gRPC status it maps to."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(HeadswapError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(HeadswapError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(HeadswapError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(HeadswapError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class PermissionDenied(HeadswapError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unavailable(HeadswapError):
    code = grpc.StatusCode.UNAVAILABLE


class Cancelled(HeadswapError):
    code = grpc.StatusCode.CANCELLED
