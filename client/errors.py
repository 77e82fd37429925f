"""What a failed call raises: one `HeadswapError` subclass per gRPC status, so callers can write
`except NotFound`. Every error keeps `.code` (the `grpc.StatusCode`) and `.details` (the server's message).

    HeadswapError
     ├── InvalidArgument      the request is wrong; fix it before retrying
     ├── NotFound             unknown tenant or version
     ├── FailedPrecondition   valid, but not now (no active head, a head from another backbone)
     ├── ResourceExhausted    over a limit or the server's queue is full: send less, or back off
     ├── Unauthenticated      no key, or a key the server does not accept
     ├── PermissionDenied     the key may not do this
     ├── Unavailable          starting, draining or unreachable (retried by the client)
     ├── DeadlineExceeded     the call's timeout passed
     ├── Cancelled
     ├── DataLoss             stored data is damaged
     ├── Internal             a server bug
     └── Unknown              anything else
"""

from __future__ import annotations

import grpc


class HeadswapError(Exception):
    """A call failed; `code` is the gRPC status code and `details` the server's message."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class InvalidArgument(HeadswapError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(HeadswapError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(HeadswapError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(HeadswapError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unauthenticated(HeadswapError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(HeadswapError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unavailable(HeadswapError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(HeadswapError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(HeadswapError):
    code = grpc.StatusCode.CANCELLED


class DataLoss(HeadswapError):
    code = grpc.StatusCode.DATA_LOSS


class Internal(HeadswapError):
    code = grpc.StatusCode.INTERNAL


class Unknown(HeadswapError):
    code = grpc.StatusCode.UNKNOWN


_BY_CODE: dict[grpc.StatusCode, type[HeadswapError]] = {
    cls.code: cls for cls in HeadswapError.__subclasses__()
}
_BY_CODE[grpc.StatusCode.OUT_OF_RANGE] = InvalidArgument


def error(code: grpc.StatusCode, details: str) -> HeadswapError:
    return _BY_CODE.get(code, Unknown)(code, details)


def from_rpc_error(exc: grpc.RpcError) -> HeadswapError:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return error(code, details or "")
