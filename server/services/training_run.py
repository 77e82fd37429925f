"""One AdaptHead call as TrainingService's steps take it: what it was asked, what it gathered, what each
step produced; and how a step's progress reaches the caller while its work runs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from headswap.adapters import TrainConfig, TrainedHead
from headswap.server.domain import AdaptRequest, Example, Progress
from headswap.server.inference.lanes import Lane
from headswap.server.services.locks import TenantLock


@dataclass(eq=False)
class TrainingRun:
    """One AdaptHead call as its steps go: what it was asked, what it gathered, what each step produced."""

    tenant: str
    request: AdaptRequest
    config: TrainConfig
    digest: str
    lock: TenantLock
    deadline: float
    lane: Lane
    stored: list[Example]
    new: list[Example]
    expect_seq: int | None
    events: asyncio.Queue[Progress] = field(default_factory=asyncio.Queue)  # both steps' progress
    examples: list[Example] = field(init=False)  # the stored ones, then the new
    labels: list[str] = field(init=False)  # set by _gather, unless store_only
    y: np.ndarray = field(init=False)
    vectors: np.ndarray = field(init=False)  # set by _embed
    embedded: int = field(init=False)
    hits: int = field(init=False)
    to_save: dict[bytes, np.ndarray] = field(init=False)
    head: TrainedHead = field(init=False)  # set by _train

    def __post_init__(self) -> None:
        self.examples = [*self.stored, *self.new]

    def name(self, i: int) -> str:
        """An example's place, as the caller knows it."""
        return f"examples[{i - len(self.stored)}]" if i >= len(self.stored) else f"stored example {i}"


async def drain(events: asyncio.Queue[Progress], task: asyncio.Future[Any]) -> AsyncIterator[Progress]:
    """Yield queued events until `task` is done, then whatever is left."""
    while not task.done():
        getter = asyncio.ensure_future(events.get())
        await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
        if getter.done():
            yield getter.result()
        else:
            getter.cancel()
    while not events.empty():
        yield events.get_nowait()
