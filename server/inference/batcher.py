"""One dynamic batcher in front of a backbone, for every RPC and every tenant.

A call is admitted only if it can be served in time (`admission.py`: the queue's bound is an expected
wait). A request is prepared on arrival (off the event loop, in the preprocessing pool) into items, one per input,
each with a cost and a grouping key; they wait in one bounded queue. A batch costs its largest item's cost
times its size (everything is padded to the largest); it closes when that would pass the cost budget, when
it holds the most items allowed, or when its oldest item has waited the longest allowed. A batch is built
around the oldest waiting item (so nothing starves) from the items whose keys are nearest (so little is
padding), and no batch carries more padding than the policy allows. Items of cancelled requests are dropped
before they cost backbone time. Up to two batches are in flight: while the encoder runs one, the next is
prepared, formed and collated.

Classify items carry their tenant's head slot; after the forward pass the heads of all tenants in the batch
are applied in one grouped operation.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from headswap.server.domain import Input
from headswap.server.inference.admission import Admission
from headswap.server.inference.protocols import Backbone, Prepared

log = logging.getLogger(__name__)


class GroupedHeads(Protocol):
    def apply(self, embeddings: np.ndarray, slots: list[int]) -> list[np.ndarray]: ...


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_cost: int = 16384  # padded cost (items x largest item's cost) of one forward pass
    max_batch_items: int = 256
    max_wait_s: float = 0.002  # how long the oldest item may wait for company
    max_queue_items: int = 8192  # past this, new calls get RESOURCE_EXHAUSTED at once
    max_queue_wait_s: float = 1.0  # past this much expected wait, new calls get RESOURCE_EXHAUSTED at once
    max_in_flight: int = 2
    # Most padding a batch may carry, as a share of its padded cost (1 = no cap). The oldest item always goes;
    # an item that would push the batch past the cap waits for a batch nearer its own length.
    max_padding: float = 1.0


@dataclass(frozen=True)
class BatchStats:
    items: int
    requests: int
    padded_cost: int
    real_cost: int
    run_s: float


@dataclass(eq=False)
class _Request:
    future: asyncio.Future[None]
    slot: int | None  # head slot for Classify, None for Embed
    enqueued: float
    preprocess_s: float
    truncated: np.ndarray
    rows: list[Any]
    remaining: int
    started: float = 0.0
    backbone_s: float = 0.0
    head_s: float = 0.0

    @property
    def cancelled(self) -> bool:
        return self.future.done()


@dataclass(eq=False, slots=True)
class _Item:
    request: _Request
    index: int
    prepared: Prepared


@dataclass(frozen=True)
class BatchResult:
    rows: list[Any]  # per input: embedding (dim,) for Embed, probabilities (classes,) for Classify
    truncated: np.ndarray
    queue_s: float
    preprocess_s: float
    backbone_s: float
    head_s: float


class Batcher:
    def __init__(
        self,
        backbone: Backbone,
        policy: BatchPolicy,
        preprocess_executor: Executor,
        backbone_executor: Executor,
        heads: GroupedHeads | None = None,
        on_batch: Callable[[BatchStats], None] | None = None,
    ) -> None:
        self.preprocessor = backbone.preprocessor
        self.encoder = backbone.encoder
        self.policy = policy
        self.preprocess_executor = preprocess_executor
        self.backbone_executor = backbone_executor
        self.heads = heads
        self.on_batch = on_batch
        self._pending: list[_Item] = []
        self._reserved = 0  # items admitted but still being prepared
        self.admission = Admission(policy.max_queue_items, policy.max_queue_wait_s)
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(policy.max_in_flight)
        self._task: asyncio.Task[None] | None = None
        self._in_flight = 0
        self.batches_run = 0

    @property
    def queue_depth(self) -> int:
        return len(self._pending) + self._reserved

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="headswap-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def submit(
        self, inputs: Sequence[Input], slot: int | None = None, deadline: float | None = None
    ) -> BatchResult:
        """Embed `inputs` (and apply the head in `slot`, if given) as part of whatever batches form.
        `deadline` (time.monotonic()) lets the batcher refuse at once a call it cannot serve in time."""
        estimate = self.admission.admit(len(inputs), self.queue_depth, deadline)
        loop = asyncio.get_running_loop()
        enqueued = time.perf_counter()
        self._reserved += len(inputs)
        try:
            prepared = await loop.run_in_executor(
                self.preprocess_executor, self.preprocessor.prepare, list(inputs)
            )
        except BaseException:
            self.admission.release(estimate, len(inputs))
            raise
        finally:
            self._reserved -= len(inputs)
        self.admission.prepared(estimate, float(sum(p.cost for p in prepared)), len(prepared))
        request = _Request(
            future=loop.create_future(),
            slot=slot,
            enqueued=enqueued,
            preprocess_s=time.perf_counter() - enqueued,
            truncated=np.fromiter((p.truncated for p in prepared), dtype=bool, count=len(prepared)),
            rows=[None] * len(prepared),
            remaining=len(prepared),
        )
        self._pending.extend(_Item(request, i, p) for i, p in enumerate(prepared))
        self._wake.set()
        try:
            await request.future
        except asyncio.CancelledError:
            # The caller went away (cancelled, or its deadline passed): its items are skipped from now on.
            request.future.cancel()
            raise
        return BatchResult(
            rows=request.rows,
            truncated=request.truncated,
            queue_s=max(0.0, request.started - request.enqueued - request.preprocess_s),
            preprocess_s=request.preprocess_s,
            backbone_s=request.backbone_s,
            head_s=request.head_s,
        )

    # -- forming batches -----------------------------------------------------------------------------

    def _drop_cancelled(self) -> None:
        if any(item.request.cancelled for item in self._pending):
            kept = [item for item in self._pending if not item.request.cancelled]
            self.admission.release(
                sum(i.prepared.cost for i in self._pending) - sum(i.prepared.cost for i in kept),
                len(self._pending) - len(kept),
            )
            self._pending = kept

    def _full(self) -> bool:
        p = self.policy
        if len(self._pending) >= p.max_batch_items:
            return True
        # Enough work waiting to fill a batch (padding aside): no reason to wait longer.
        return sum(item.prepared.cost for item in self._pending) >= p.max_batch_cost

    def _take(self) -> list[_Item]:
        self._drop_cancelled()
        if not self._pending:
            return []
        key = self._pending[0].prepared.group_key
        # Candidates nearest the oldest item's key first; ties keep arrival order.
        order = sorted(
            range(len(self._pending)), key=lambda i: abs(self._pending[i].prepared.group_key - key)
        )
        chosen: list[int] = []
        largest = real = 0
        for i in order:
            item_cost = self._pending[i].prepared.cost
            cost = max(largest, item_cost)
            padded = cost * (len(chosen) + 1)
            if chosen and padded > self.policy.max_batch_cost:
                continue
            if chosen and padded - (real + item_cost) > self.policy.max_padding * padded:
                continue
            chosen.append(i)
            largest = cost
            real += item_cost
            if len(chosen) >= self.policy.max_batch_items:
                break
        taken = set(chosen)
        batch = [self._pending[i] for i in sorted(chosen)]
        self._pending = [item for i, item in enumerate(self._pending) if i not in taken]
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._drop_cancelled()
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            # Wait for a free slot first: while the encoder is busy, more items join the next batch.
            await self._slots.acquire()
            idle = self._in_flight == 0
            oldest = self._pending[0].request
            deadline = oldest.enqueued + oldest.preprocess_s + self.policy.max_wait_s
            # An idle encoder starts at once: waiting for company only pays while another batch runs.
            while not idle and not self._full():
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), remaining)
                except TimeoutError:
                    break
            batch = self._take()
            if not batch:
                self._slots.release()
                continue
            self._in_flight += 1
            future = loop.run_in_executor(self.backbone_executor, self._run, batch)
            future.add_done_callback(lambda f, b=batch: self._finish(b, f))  # type: ignore[misc]

    # -- running them ----------------------------------------------------------------------------------

    def _run(self, batch: list[_Item]) -> tuple[list[Any], float, float]:
        """In the backbone thread: one forward pass, then every tenant's head in one grouped operation."""
        # A caller may have gone while this batch waited behind the previous one: drop its items now, before
        # they cost backbone time. (Reading a future's state from this thread is a plain attribute read.)
        live = [i for i, item in enumerate(batch) if not item.request.cancelled]
        rows: list[Any] = [None] * len(batch)
        if not live:
            return rows, 0.0, 0.0
        t0 = time.perf_counter()
        for i in live:
            # Stamped here, in the backbone thread: time waiting behind the previous batch is queue time.
            if not batch[i].request.started:
                batch[i].request.started = t0
        items = [batch[i] for i in live]
        embeddings = self.encoder.run(self.preprocessor.collate([item.prepared for item in items]))
        t1 = time.perf_counter()
        for i, row in zip(live, embeddings, strict=True):
            rows[i] = row
        with_head = [i for i, item in enumerate(items) if item.request.slot is not None]
        if with_head:
            if self.heads is None:
                raise RuntimeError("a Classify item reached a batcher without heads")
            slots = [int(items[i].request.slot) for i in with_head]  # type: ignore[arg-type]
            for i, probs in zip(with_head, self.heads.apply(embeddings[with_head], slots), strict=True):
                rows[live[i]] = probs
        t2 = time.perf_counter()
        if self.on_batch is not None:
            costs = [item.prepared.cost for item in items]
            self.on_batch(
                BatchStats(
                    items=len(items),
                    requests=len({id(item.request) for item in items}),
                    padded_cost=max(costs) * len(items),
                    real_cost=sum(costs),
                    run_s=t1 - t0,
                )
            )
        return rows, t1 - t0, t2 - t1

    def _finish(self, batch: list[_Item], future: asyncio.Future[tuple[list[Any], float, float]]) -> None:
        self.admission.release(sum(item.prepared.cost for item in batch), len(batch))
        self._slots.release()
        self._in_flight -= 1
        self.batches_run += 1
        error = future.exception()
        if error is not None:
            log.error("backbone batch failed", exc_info=error)
            for item in batch:
                if not item.request.future.done():
                    item.request.future.set_exception(error)
            return
        rows, run_s, head_s = future.result()
        self.admission.ran(
            sum(i.prepared.cost for i, row in zip(batch, rows, strict=True) if row is not None), run_s
        )
        seen: set[int] = set()
        for item, row in zip(batch, rows, strict=True):
            request = item.request
            if row is None or request.future.done():
                continue
            request.rows[item.index] = row
            request.remaining -= 1
            if id(request) not in seen:
                seen.add(id(request))
                request.backbone_s += run_s
                if request.slot is not None:
                    request.head_s += head_s
            if request.remaining == 0 and not request.future.done():
                request.future.set_result(None)
