"""Load shedding at the door: how far behind the event loop runs, and calls refused before any work.

Admission control (inference/admission.py) bounds the wait for the backbone. When the event loop itself is
the bottleneck (single-text calls on a small machine: gRPC, protobuf and bookkeeping take more CPU than
the forward pass), calls wait before any handler runs, where admission cannot see them: at 1,200 calls/s on
2 cores accepted calls waited 2.7 s against a 1 s bound and refusals took 258 ms. `LoopLag` measures that
wait (a ticker's lateness: the least of its last few ticks, so that one pause, a garbage collection or one
slow step, refuses nobody, while a loop that is behind on every tick is), and the interceptor refuses new Embed and Classify calls with RESOURCE_EXHAUSTED
while it is over `limit_s`, before decoding or authenticating anything: a refusal costs microseconds of
the loop, so shedding brings the lag back down and keeps both the refusals and the calls let in close to
their bounds. Trainings (few, and admitted by their own rules) and management calls always go through.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

from headswap.server.errors import ResourceExhausted
from headswap.server.tasks import cancel

SHED_RPCS = frozenset({"Embed", "Classify"})
TICKS = 8  # a loop is behind when it was late on each of this many ticks in a row


class LoopLag:
    def __init__(self, limit_s: float, interval_s: float = 0.005) -> None:
        self.limit_s = limit_s
        self.interval_s = interval_s
        self.lag_s = 0.0  # the least lateness of the last `TICKS` ticks
        self._recent: deque[float] = deque(maxlen=TICKS)
        self.shed = 0  # calls refused so far
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._tick(), name="headswap-loop-lag")

    async def stop(self) -> None:
        await cancel(self._task)

    async def _tick(self) -> None:
        while True:
            due = time.perf_counter() + self.interval_s
            await asyncio.sleep(self.interval_s)
            self.observe(max(0.0, time.perf_counter() - due))

    def observe(self, late_s: float) -> None:
        self._recent.append(late_s)
        self.lag_s = min(self._recent) if len(self._recent) == self._recent.maxlen else 0.0

    def check(self, rpc: str) -> None:
        """RESOURCE_EXHAUSTED for a data-plane call while the loop is too far behind."""
        if rpc in SHED_RPCS and self.lag_s > self.limit_s:
            self.shed += 1
            raise ResourceExhausted(
                f"the server is overloaded: its event loop runs {self.lag_s * 1000:.0f} ms behind (limit "
                f"{self.limit_s * 1000:.0f} ms): retry later, with backoff, or on another replica"
            )
