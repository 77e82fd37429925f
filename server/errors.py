"""One error tree for the domain; it knows nothing of any transport.

Services raise these with a message meant for the caller. The gRPC edge maps each class to its status in
one table (`headswap.server.rpc.interceptors.STATUS`); anything else that escapes a handler is a bug and
becomes INTERNAL with a logged traceback.

    HeadswapError
     ├── InvalidArgument      the request itself is wrong (empty batch, bad name, too few classes...)
     │    └── InputError      one input is unusable (an image that does not decode); knows its index
     ├── NotFound             unknown tenant or version
     ├── FailedPrecondition   valid, but not in this state (a head from another backbone, none active)
     ├── ResourceExhausted    over a configured bound (queue, batch, reply size)
     │    └── DiskFull        the store's disk is full (counted: headswap_store_disk_full_total)
     ├── Unavailable          not now: starting up, draining; safe to retry
     ├── Unauthenticated      no API key, or one the server does not accept (unknown, revoked, expired)
     ├── PermissionDenied     a valid key that may not do this (another tenant, an admin-only call)
     └── DataLoss             stored data is damaged (a quarantined tenant); the message says how to repair
"""

from __future__ import annotations


class HeadswapError(Exception):
    """An error whose message is meant for the caller."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(HeadswapError):
    """The request itself is wrong."""


class InputError(InvalidArgument):
    """One input is unusable; `index` is its place in the inputs handed to a preprocessor's `prepare`, so
    that the batcher and the services can say which of the caller's inputs it was."""

    def __init__(self, index: int, reason: str, what: str = "inputs") -> None:
        super().__init__(f"{what}[{index}] {reason}")
        self.index = index
        self.reason = reason


class NotFound(HeadswapError):
    """No such tenant or version."""


class FailedPrecondition(HeadswapError):
    """A valid request the current state does not allow."""


class ResourceExhausted(HeadswapError):
    """Over a configured bound; the message says which and what to do."""


class DiskFull(ResourceExhausted):
    """The store's disk (or the database's) is full: nothing was changed; free space, then retry."""

    def __init__(self, what: str = "") -> None:
        super().__init__(
            "the store's disk is full"
            + (f" ({what})" if what else "")
            + ": nothing was changed; retry once the operator has freed space"
        )


class Unavailable(HeadswapError):
    """Not now (starting up, draining, a dependency down); safe to retry."""


class DataLoss(HeadswapError):
    """Stored data is damaged: the tenant is quarantined until repaired or deleted."""


class Unauthenticated(HeadswapError):
    """The call carries no valid credentials."""


class PermissionDenied(HeadswapError):
    """Valid credentials that do not allow this call."""
