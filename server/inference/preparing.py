"""Preparing inputs off the event loop, many calls at a time.

Calls that arrive while the preprocessing pool is busy are prepared together: the text preprocessor
tokenizes a whole group in one Rust batch call (it releases the GIL and spreads over every core) instead of
one thread hop per call. While nothing else is being prepared, a request the preprocessor calls cheap (a few
short texts: tens of microseconds of tokenizing, less than the hop to a thread and back) is prepared on the
loop; under load such requests go to the pool together, where tokenizing runs beside the loop. A request the
preprocessor prepares inline (`prepare_inline` gives its items) is prepared on the loop even under load: its
tokenizer holds the GIL, so in the pool it would not run beside the loop anyway, and the hop there and back
costs more than it does.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Executor
from typing import Any

from headswap.server.domain import Input
from headswap.server.inference.protocols import Prepared

# Requests prepared together take up to this many inputs (one larger request goes alone): enough for the
# tokenizer's batch call to spread over every core, small enough that a group's wait stays short.
PREPARE_GROUP_INPUTS = 1024


def prepare_groups(preprocessor: Any, groups: Sequence[list[Input]]) -> list[list[Prepared] | BaseException]:
    """Blocking (the preprocessing pool): each group's prepared items, or the error that group alone gets.
    A preprocessor with `prepare_many` prepares them in one call (the text one: one tokenizer batch)."""
    many = getattr(preprocessor, "prepare_many", None)
    if many is not None and len(groups) > 1:
        try:
            return list(many(groups))
        except Exception:
            pass  # one group's bad input: prepared one by one below, so that only that group gets it
    out: list[list[Prepared] | BaseException] = []
    for inputs in groups:
        try:
            out.append(preprocessor.prepare(inputs))
        except Exception as exc:
            out.append(exc)
    return out


class Preparer:
    def __init__(self, preprocessor: Any, executor: Executor, workers: int = 2) -> None:
        self.preprocessor = preprocessor
        self.executor = executor
        self.workers = max(1, workers)
        self._waiting: deque[tuple[list[Input], asyncio.Future[list[Prepared]]]] = deque()
        self._running = 0
        self._tasks: set[asyncio.Task[None]] = set()  # held, so that a running drain is never collected

    async def prepare(self, inputs: list[Input]) -> list[Prepared]:
        inline = getattr(self.preprocessor, "prepare_inline", None)
        if inline is not None and (prepared := inline(inputs)) is not None:
            return list(prepared)
        cheap = getattr(self.preprocessor, "cheap", None)
        if cheap is not None and not self._running and not self._waiting and cheap(inputs):
            return list(self.preprocessor.prepare(inputs))
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Prepared]] = loop.create_future()
        self._waiting.append((inputs, future))
        if self._running < self.workers:
            self._running += 1
            task = loop.create_task(self._drain())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._waiting:
                group: list[tuple[list[Input], asyncio.Future[list[Prepared]]]] = []
                count = 0
                while self._waiting and (not group or count < PREPARE_GROUP_INPUTS):
                    inputs, future = self._waiting.popleft()
                    if not future.done():  # a caller that left before its turn costs nothing
                        group.append((inputs, future))
                        count += len(inputs)
                if not group:
                    continue
                results = await loop.run_in_executor(
                    self.executor, prepare_groups, self.preprocessor, [inputs for inputs, _ in group]
                )
                for (_, future), result in zip(group, results, strict=True):
                    if future.done():
                        continue
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        finally:
            self._running -= 1
