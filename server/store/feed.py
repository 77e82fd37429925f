"""The store's change feed: every change of an active pointer (or of an API key), fanned out in order to the
subscribers of this process (each replica's head bank reconciles through it)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from headswap.server.store.base import Change


class ChangeFeed:
    """Fan-out of changes to async subscribers; `publish` may be called from any thread."""

    def __init__(self) -> None:
        self._subscribers: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue[Change]]] = []
        self._lock = threading.Lock()

    def publish(self, change: Change) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        for loop, queue in subscribers:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, change)
            except RuntimeError:  # that loop is closed: its subscriber is gone
                continue

    async def subscribe(self) -> AsyncIterator[Change]:
        queue: asyncio.Queue[Change] = asyncio.Queue()
        entry = (asyncio.get_running_loop(), queue)
        with self._lock:
            self._subscribers.append(entry)
        try:
            while True:
                yield await entry[1].get()
        finally:
            with self._lock:
                self._subscribers.remove(entry)
