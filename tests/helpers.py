"""Test helpers: where the repository and the shared data are, and waiting for an observable condition;
servers come from headswap.server.testing."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path

from headswap.server.inference.policy import BatchPolicy
from headswap.server.testing import ServerProcess, free_port

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("HEADSWAP_DATA", REPO.parent / "shared" / "data"))

HANG = 60.0  # seconds: a bound on a hang, never a claim about speed (figures are bench/'s)


def until(condition: Callable[[], bool], what: str = "the condition", timeout: float = HANG) -> None:
    """Poll `condition` until it holds; fail, saying `what`, only if it never does within `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not after {timeout:.0f} s"
        time.sleep(0.02)


def raises(call: Callable[[], object], error: type[BaseException]) -> Callable[[], bool]:
    """A condition for `until`: whether `call()` now fails with `error`."""

    def condition() -> bool:
        try:
            call()
        except error:
            return True
        return False

    return condition


async def eventually(
    condition: Callable[[], bool], what: str = "the condition", timeout: float = HANG
) -> None:
    """`until` for a test on the event loop: polls without blocking it."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not after {timeout:.0f} s"
        await asyncio.sleep(0.01)


def batch_policy(**bounds: float) -> BatchPolicy:
    """A batcher's policy for tests: generous bounds, any of them named to change it (a policy has no
    defaults of its own: a server's come from its settings, by device)."""
    generous = {
        "max_batch_cost": 16384,
        "max_batch_items": 256,
        "max_wait_s": 0.002,
        "max_queue_items": 8192,
        "max_queue_wait_s": 1.0,
        "max_padding": 1.0,
    }
    return BatchPolicy(**{**generous, **bounds})  # type: ignore[arg-type]


__all__ = [
    "DATA",
    "HANG",
    "REPO",
    "ServerProcess",
    "batch_policy",
    "eventually",
    "free_port",
    "raises",
    "until",
]
