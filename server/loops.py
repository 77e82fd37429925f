"""The event loop a process runs on: uvloop where it is installed (`--event-loop auto`, the default), else
asyncio's own. uvloop runs the loop itself in C (libuv): measured with the free encoder on 2 cores, a
single-text Classify took about a tenth less server CPU (docs/BENCHMARKS.md, "The pipeline's ceiling").
The benchmark's load and echo processes use it too (`run`), so that they take less of the machine."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def loop_factory(choice: str = "auto") -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The loop `choice` asks for: uvloop's (where installed, for auto), or None: asyncio's own."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ValueError(
                "--event-loop uvloop: uvloop is not installed (pip install uvloop; it has no Windows build)"
            ) from None
        return None
    return uvloop.new_event_loop  # type: ignore[no-any-return]


def run(main: Coroutine[Any, Any, T], choice: str = "auto") -> T:
    """`asyncio.run(main)` on the loop `choice` asks for."""
    with asyncio.Runner(loop_factory=loop_factory(choice)) as runner:
        return runner.run(main)


def running_name() -> str:
    """The running loop's kind, as the SERVING line names it: uvloop or asyncio."""
    return "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"
