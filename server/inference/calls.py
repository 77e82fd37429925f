"""A call in a batcher (`Request`) and each of its inputs once prepared (`Item`): what the queue
(`pending.py`) holds and a batch is made of."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from headswap.server.inference.protocols import Prepared


@dataclass(eq=False)
class Request:
    future: asyncio.Future[None]
    slot: int | None  # head slot for Classify, None for Embed
    flow: str
    enqueued: float
    truncated: np.ndarray
    rows: list[Any]
    remaining: int
    preprocess_s: float = 0.0
    items: list[Item] = field(default_factory=list)
    waiting: int = 0  # items in the queue now
    room: asyncio.Event = field(default_factory=asyncio.Event)  # set: time to prepare its next slice
    started: float = 0.0
    backbone_s: float = 0.0
    head_s: float = 0.0

    @property
    def cancelled(self) -> bool:
        return self.future.done()


_arrival = itertools.count()


@dataclass(eq=False, slots=True)
class Item:
    request: Request
    index: int
    prepared: Prepared
    taken: bool = False  # in a batch, or withdrawn with its cancelled request
    seq: int = field(default_factory=lambda: next(_arrival))

    @property
    def flow(self) -> str:
        return self.request.flow

    @property
    def arrived(self) -> float:
        return self.request.enqueued
