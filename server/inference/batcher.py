"""One dynamic batcher in front of a backbone, for every RPC and every tenant.

A call is admitted only if it can be served in time (`admission.py`: the queue's bound is an expected
wait). A request is prepared on arrival (off the event loop, in the preprocessing pool, together with the
other requests that arrive meanwhile: one tokenizer batch call for many small calls) into items, one per
input, each with a cost and a grouping key; they wait in one bounded queue, kept per key, so that forming a
batch costs the items it takes and never the length of the queue. A batch costs its largest item's cost
times its size (everything is padded to the largest); it closes when that would pass the cost budget, when
it holds the most items allowed, or when its oldest item has waited the longest allowed. A batch is built
around the oldest waiting item (so nothing starves) from the items whose keys are nearest (so little is
padding), and no batch carries more padding than the policy allows. With shape buckets (`buckets.py`, on
CUDA) a batch is padded to one of a few fixed shapes run at warm-up, and takes no more items than fill its
bucket well. Items of cancelled requests are dropped before they cost backbone time. Up to two batches are in flight: while the encoder runs one, the next is
prepared, formed and collated.

Classify items carry their tenant's head slot; after the forward pass the heads of all tenants in the batch
are applied in one grouped operation.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from headswap.server.domain import Input
from headswap.server.inference.admission import Admission
from headswap.server.inference.buckets import ShapeBuckets
from headswap.server.inference.protocols import Backbone, Prepared

log = logging.getLogger(__name__)


# Requests prepared together take up to this many inputs (one larger request goes alone): enough for the
# tokenizer's batch call to spread over every core, small enough that a group's wait stays short.
PREPARE_GROUP_INPUTS = 1024


def prepare_groups(preprocessor: Any, groups: list[list[Input]]) -> list[list[Prepared] | BaseException]:
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
    items: list[_Item] = field(default_factory=list)
    started: float = 0.0
    backbone_s: float = 0.0
    head_s: float = 0.0

    @property
    def cancelled(self) -> bool:
        return self.future.done()


_arrival = itertools.count()


@dataclass(eq=False, slots=True)
class _Item:
    request: _Request
    index: int
    prepared: Prepared
    taken: bool = False  # in a batch, or withdrawn with its cancelled request
    seq: int = field(default_factory=lambda: next(_arrival))


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
        buckets: ShapeBuckets | None = None,
        prepare_workers: int = 2,
    ) -> None:
        self.preprocessor = backbone.preprocessor
        self.encoder = backbone.encoder
        self.policy = policy
        self.preprocess_executor = preprocess_executor
        self.backbone_executor = backbone_executor
        self.heads = heads
        self.on_batch = on_batch
        self.buckets = buckets
        # Items waiting for the backbone, by grouping key (arrival order within a key), and all of them in
        # arrival order (to find the oldest). An item leaves both when taken; `_arrivals` drops taken items
        # lazily, from its front. Forming a batch costs the items it takes, not the queue's length.
        self._queues: dict[int, deque[_Item]] = {}
        self._arrivals: deque[_Item] = deque()
        self._waiting = 0  # items in _queues
        self._waiting_cost = 0  # their costs, summed
        self._reserved = 0  # items admitted but still being prepared
        # Requests waiting to be prepared, tokenized together (one Rust batch call per group) by up to
        # `prepare_workers` jobs in the preprocessing pool.
        self._to_prepare: deque[tuple[list[Input], asyncio.Future[list[Prepared]]]] = deque()
        self._preparing = 0
        self._prepare_workers = max(1, prepare_workers)
        self.admission = Admission(policy.max_queue_items, policy.max_queue_wait_s)
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(policy.max_in_flight)
        self._task: asyncio.Task[None] | None = None
        self._in_flight = 0
        self.batches_run = 0

    @property
    def queue_depth(self) -> int:
        return self._waiting + self._reserved

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
            prepared = await self._prepare(list(inputs))
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
        items = [_Item(request, i, p) for i, p in enumerate(prepared)]
        request.items = items
        self._enqueue(items)
        self._wake.set()
        try:
            await request.future
        except asyncio.CancelledError:
            # The caller went away (cancelled, or its deadline passed): its waiting items go now, before they
            # cost backbone time; items already in a batch are skipped when it runs.
            request.future.cancel()
            self._withdraw(request)
            raise
        return BatchResult(
            rows=request.rows,
            truncated=request.truncated,
            queue_s=max(0.0, request.started - request.enqueued - request.preprocess_s),
            preprocess_s=request.preprocess_s,
            backbone_s=request.backbone_s,
            head_s=request.head_s,
        )

    # -- preparing ----------------------------------------------------------------------------------------

    async def _prepare(self, inputs: list[Input]) -> list[Prepared]:
        """The inputs prepared in the preprocessing pool, together with whatever other calls arrive while
        the pool is busy: one tokenizer call for many small requests instead of one thread hop each. While
        nothing else is being prepared, a request the preprocessor calls cheap (a few short texts: tens of
        microseconds of tokenizing, less than the hop to a thread and back) is prepared here, on the loop;
        under load such requests go to the pool together, where tokenizing runs beside the loop."""
        cheap = getattr(self.preprocessor, "cheap", None)
        if cheap is not None and not self._preparing and not self._to_prepare and cheap(inputs):
            return self.preprocessor.prepare(inputs)
        future: asyncio.Future[list[Prepared]] = asyncio.get_running_loop().create_future()
        self._to_prepare.append((inputs, future))
        if self._preparing < self._prepare_workers:
            self._preparing += 1
            asyncio.get_running_loop().create_task(self._prepare_waiting())
        return await future

    async def _prepare_waiting(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._to_prepare:
                group: list[tuple[list[Input], asyncio.Future[list[Prepared]]]] = []
                count = 0
                while self._to_prepare and (not group or count < PREPARE_GROUP_INPUTS):
                    inputs, future = self._to_prepare.popleft()
                    if not future.done():  # a caller that left before its turn costs nothing
                        group.append((inputs, future))
                        count += len(inputs)
                if not group:
                    continue
                results = await loop.run_in_executor(
                    self.preprocess_executor, prepare_groups, self.preprocessor, [g[0] for g in group]
                )
                for (_, future), result in zip(group, results, strict=True):
                    if future.done():
                        continue
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        finally:
            self._preparing -= 1

    # -- forming batches -----------------------------------------------------------------------------

    def _enqueue(self, items: list[_Item]) -> None:
        for item in items:
            key = item.prepared.group_key
            queue = self._queues.get(key)
            if queue is None:
                queue = self._queues[key] = deque()
            queue.append(item)
            self._arrivals.append(item)
            self._waiting_cost += item.prepared.cost
        self._waiting += len(items)

    def _withdraw(self, request: _Request) -> None:
        """Take a cancelled request's waiting items out of the queue, and their cost out of admission. They
        are marked taken; each key's queue drops taken items from its front (so a withdrawal costs the
        request's items, never the queue's length)."""
        gone = [item for item in request.items if not item.taken]
        for item in gone:
            item.taken = True
        for key in {item.prepared.group_key for item in gone}:
            self._purge(key)
        cost = sum(item.prepared.cost for item in gone)
        self._waiting -= len(gone)
        self._waiting_cost -= cost
        self.admission.release(cost, len(gone))

    def _purge(self, key: int) -> None:
        queue = self._queues.get(key)
        if queue is None:
            return
        while queue and queue[0].taken:
            queue.popleft()
        if not queue:
            del self._queues[key]

    def _oldest(self) -> _Item | None:
        arrivals = self._arrivals
        while arrivals and arrivals[0].taken:
            arrivals.popleft()
        return arrivals[0] if arrivals else None

    def _full(self) -> bool:
        p = self.policy
        # Enough work waiting to fill a batch (padding aside): no reason to wait longer.
        return self._waiting >= p.max_batch_items or self._waiting_cost >= p.max_batch_cost

    def _take(self) -> list[_Item]:
        """A batch around the oldest item: items of the nearest keys first, within the cost budget, the item
        cap and the padding cap; with shape buckets, no more items than fill a bucket well."""
        oldest = self._oldest()
        if oldest is None:
            return []
        policy = self.policy
        key = oldest.prepared.group_key
        order = sorted(self._queues, key=lambda k: (abs(k - key), k))
        chosen: list[_Item] = []
        largest = real = 0
        for k in order:
            queue = self._queues[k]
            for item in queue:
                if item.taken:
                    continue
                item_cost = item.prepared.cost
                cost = max(largest, item_cost)
                padded = cost * (len(chosen) + 1)
                if chosen and padded > policy.max_batch_cost:
                    break
                if chosen and padded - (real + item_cost) > policy.max_padding * padded:
                    break
                chosen.append(item)
                largest = cost
                real += item_cost
                if len(chosen) >= policy.max_batch_items:
                    break
            if len(chosen) >= policy.max_batch_items:
                break
        if self.buckets is not None:
            chosen = chosen[: self.buckets.items_to_take(len(chosen), policy.max_padding)]
        for item in chosen:
            item.taken = True
        # What each key gave is the front of its live items, so dropping taken items from the front clears it.
        for k in {item.prepared.group_key for item in chosen}:
            self._purge(k)
        self._waiting -= len(chosen)
        self._waiting_cost -= sum(item.prepared.cost for item in chosen)
        chosen.sort(key=lambda item: item.seq)
        return chosen

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            oldest = self._oldest()
            if oldest is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            # Wait for a free slot first: while the encoder is busy, more items join the next batch.
            await self._slots.acquire()
            idle = self._in_flight == 0
            oldest = self._oldest()
            if oldest is None:
                self._slots.release()
                continue
            request = oldest.request
            deadline = request.enqueued + request.preprocess_s + self.policy.max_wait_s
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

    # -- warming up -----------------------------------------------------------------------------------

    async def warm_up_buckets(self) -> int:
        """Run every bucket's shape once, in the backbone's thread; returns how many ran (0: no buckets)."""
        return await asyncio.get_running_loop().run_in_executor(self.backbone_executor, self.warm_buckets)

    def warm_buckets(self) -> int:
        """Blocking (the backbone's thread): run every bucket's shape once; returns how many ran."""
        if self.buckets is None:
            return 0
        shapes = self.buckets.shapes()
        for rows, length in shapes:
            item = self.preprocessor.placeholder(length)  # type: ignore[attr-defined]
            self.encoder.run(self.preprocessor.collate([item], (rows, length)))  # type: ignore[call-arg]
        return len(shapes)

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
        prepared = [item.prepared for item in items]
        costs = [p.cost for p in prepared]
        if self.buckets is None:
            embeddings = self.encoder.run(self.preprocessor.collate(prepared))
            padded_cost = max(costs) * len(items)
        else:
            # A text's group key is its token length; images have no length axis (their buckets: rows only).
            shape = self.buckets.shape(len(prepared), max(p.group_key for p in prepared))
            embeddings = self.encoder.run(self.preprocessor.collate(prepared, shape))[: len(prepared)]
            padded_cost = shape[0] * (shape[1] or max(costs))
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
            self.on_batch(
                BatchStats(
                    items=len(items),
                    requests=len({id(item.request) for item in items}),
                    padded_cost=padded_cost,
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
