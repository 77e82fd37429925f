"""One dynamic batcher in front of a backbone, for every RPC and every tenant.

A call is admitted only if it can be served in time (`admission.py`: the queue's bound is an expected
wait, a fair one). Its inputs are prepared off the event loop (`preparing.py`: in the preprocessing pool,
together with the other calls that arrive meanwhile) and enter the queue in slices: a call of a thousand
inputs holds a slice or two at a time, not the whole of them tokenized, so its memory is bounded by what is
in flight and others' items interleave with its. Each input becomes an item with a cost and a grouping key.
Items belong to a flow (a tenant, a key or one call: the caller says), and batches take turns between flows
(`pending.py`): each batch is led by the oldest item of the flow whose turn it is, and filled from the items
whose keys are nearest its own (so little is padding) within the cost budget, the item cap and the padding
cap. With shape buckets (`buckets.py`, on CUDA) a batch is padded to one of a few fixed shapes run at
warm-up, and takes no more items than fill its bucket well. A batch closes when that would pass the budget,
when it holds the most items allowed, or when its leader has waited the longest allowed; an idle encoder
starts at once. Items of cancelled requests are dropped before they cost backbone time. Up to two batches
are in flight: while the encoder runs one, the next is formed and collated.

Classify items carry their tenant's head slot; after the forward pass (`forward.py`, in the backbone's
thread) the heads of all tenants in the batch are applied in one grouped operation. The bounds it keeps are
its `BatchPolicy` (`policy.py`); a call and its prepared inputs are `calls.py`'s `Request` and `Item`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numpy as np

from headswap.server.domain import Input
from headswap.server.errors import InputError
from headswap.server.inference.admission import Admission
from headswap.server.inference.buckets import ShapeBuckets
from headswap.server.inference.calls import Item, Request
from headswap.server.inference.forward import BatchStats, Forward, GroupedHeads
from headswap.server.inference.pending import Pending
from headswap.server.inference.policy import FORM_LEAD_S, SLICE_INPUTS, BatchPolicy
from headswap.server.inference.preparing import Preparer
from headswap.server.inference.protocols import Backbone
from headswap.server.tasks import cancel

log = logging.getLogger(__name__)

__all__ = ["BatchResult", "Batcher"]

_calls = itertools.count()


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
        *,
        prepare_workers: int,
    ) -> None:
        self.policy = policy
        self.backbone_executor = backbone_executor
        self.buckets = buckets
        self.forward = Forward(backbone, heads, buckets, on_batch)
        self.preparer = Preparer(backbone.preprocessor, preprocess_executor, prepare_workers)
        self.pending = Pending()
        self.slice_inputs = max(SLICE_INPUTS, 2 * policy.max_batch_items)
        self._reserved = 0  # inputs of slices being prepared
        self.admission = Admission(policy.max_queue_items, policy.max_queue_wait_s)
        self._wake = asyncio.Event()
        self._ended = asyncio.Event()  # set as each batch ends
        self._slots = asyncio.Semaphore(policy.max_in_flight)
        self._task: asyncio.Task[None] | None = None
        self._in_flight = 0
        self._busy_until = 0.0  # when the batches in flight should be done (perf_counter)
        self.batches_run = 0

    @property
    def queue_depth(self) -> int:
        return len(self.pending) + self._reserved

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="headswap-batcher")

    async def stop(self) -> None:
        await cancel(self._task)

    async def submit(
        self,
        inputs: Sequence[Input],
        slot: int | None = None,
        deadline: float | None = None,
        flow: str = "",
    ) -> BatchResult:
        """Embed `inputs` (and apply the head in `slot`, if given) as part of whatever batches form.
        `deadline` (time.monotonic()) lets the batcher refuse at once a call it cannot serve in time; `flow`
        names whose work this is (a tenant, a key; by default the call alone), for taking turns."""
        inputs = list(inputs)
        n = len(inputs)
        flow = flow or f"call:{next(_calls)}"
        estimate = self.admission.admit(n, self.queue_depth, deadline, flow, holds=min(n, self.slice_inputs))
        predicted = self.admission.predicted  # what admit just reckoned, not summed over the flows again
        loop = asyncio.get_running_loop()
        request = Request(
            future=loop.create_future(),
            slot=slot,
            flow=flow,
            enqueued=time.perf_counter(),
            truncated=np.zeros(n, dtype=bool),
            rows=[None] * n,
            remaining=n,
        )
        feed = self._feed(request, inputs, estimate / max(1, n))
        feeder: asyncio.Task[None] | None = None
        try:
            if n <= self.slice_inputs:
                # One slice (every Classify of a few texts): fed here, without a task of its own to make,
                # schedule and collect per call. Its errors land on the future, as from a task.
                await feed
            else:
                feeder = loop.create_task(feed)
            await request.future
        except asyncio.CancelledError:
            # The caller went away (cancelled, or its deadline passed): its waiting items go now, before they
            # cost backbone time; items already in a batch are skipped when it runs.
            request.future.cancel()
            raise
        finally:
            if feeder is not None and not feeder.done():
                feeder.cancel()
            self._withdraw(request)
        self.admission.waited(predicted, time.perf_counter() - request.enqueued)
        return BatchResult(
            rows=request.rows,
            truncated=request.truncated,
            queue_s=max(0.0, request.started - request.enqueued - request.preprocess_s),
            preprocess_s=request.preprocess_s,
            backbone_s=request.backbone_s,
            head_s=request.head_s,
        )

    async def _feed(self, request: Request, inputs: list[Input], per_input: float) -> None:
        """Prepare the call's inputs a slice at a time and queue them; the next slice once the call has less
        than a batch of items waiting. Errors end the call; the unprepared rest leaves admission."""
        n, done = len(inputs), 0
        try:
            for offset in range(0, n, self.slice_inputs):
                part = inputs[offset : offset + self.slice_inputs]
                if offset:
                    await request.room.wait()
                self._reserved += len(part)
                try:
                    prepared = await self.preparer.prepare(part)
                except InputError as exc:  # its index is within the slice: say which input it is
                    raise InputError(offset + exc.index, exc.reason) from None
                finally:
                    self._reserved -= len(part)
                done += len(part)
                self.admission.prepared(
                    per_input * len(part), float(sum(p.cost for p in prepared)), len(part), request.flow
                )
                if not offset:
                    request.preprocess_s = time.perf_counter() - request.enqueued
                items = [Item(request, offset + i, p) for i, p in enumerate(prepared)]
                request.truncated[offset : offset + len(part)] = [p.truncated for p in prepared]
                request.items.extend(items)
                request.waiting += len(items)
                if request.waiting >= self.policy.max_batch_items:
                    request.room.clear()
                self.pending.add(items)
                self._wake.set()
        except BaseException as exc:
            if n > done:
                self.admission.release(per_input * (n - done), n - done, request.flow)
            if not request.future.done() and not isinstance(exc, asyncio.CancelledError):
                request.future.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise

    def _withdraw(self, request: Request) -> None:
        """Take a finished or cancelled call's waiting items out of the queue, and their cost out of
        admission (a call that finished has none left)."""
        count, cost = self.pending.withdraw(request.items)
        if count:
            request.waiting -= count
            self.admission.release(cost, count, request.flow)

    # -- forming batches -----------------------------------------------------------------------------

    def _full(self) -> bool:
        p = self.policy
        # Enough work waiting to fill a batch (padding aside): no reason to wait longer.
        return len(self.pending) >= p.max_batch_items or self.pending.cost >= p.max_batch_cost

    def _take(self) -> list[Item]:
        policy = self.policy
        leader: Item | None = self.pending.leader()  # type: ignore[assignment]
        if leader is not None and leader.request.waiting > policy.max_batch_items:
            policy = policy.for_turn(self.admission.rate, leader.prepared.cost)
        batch: list[Item] = self.pending.take(policy, self.buckets)
        for request in {id(item.request): item.request for item in batch}.values():
            request.waiting -= sum(1 for item in batch if item.request is request)
            if request.waiting < self.policy.max_batch_items:
                request.room.set()
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if self.pending.leader() is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            # Wait for a free slot first: while the encoder is busy, more items join the next batch.
            await self._slots.acquire()
            idle = self._in_flight == 0
            leader = self.pending.leader()
            if leader is None:
                self._slots.release()
                continue
            request = leader.request  # type: ignore[attr-defined]
            ran = self.batches_run
            deadline = request.enqueued + request.preprocess_s + self.policy.max_wait_s
            # An idle encoder starts at once: waiting for company only pays while another batch runs.
            while not idle and not self._full():
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._wake.clear()
                try:
                    # asyncio.timeout, not wait_for: no task of its own to make for each wake (while a batch
                    # runs, every call that arrives wakes this loop).
                    async with asyncio.timeout(remaining):
                        await self._wake.wait()
                except TimeoutError:
                    break
            if not idle:
                # The next batch is formed just before the running one should end, not as soon as a slot is
                # free: a call arriving meanwhile (another flow's) can still lead it, instead of waiting
                # behind a batch already formed from a big call's items (issue 23: 2 batches of long texts
                # are a second on a CPU). A batch that ends sooner than expected ends the wait: the encoder
                # is never left idle for an estimate.
                await self._until_due(ran)
            batch = self._take()
            if not batch:
                self._slots.release()
                continue
            now = time.perf_counter()
            run_s = self._expected_run_s(batch)
            self._busy_until = (now if idle else max(now, self._busy_until)) + run_s
            self._in_flight += 1
            spare = self.admission.refusing()
            future = loop.run_in_executor(self.backbone_executor, self.forward.run, batch, spare)
            future.add_done_callback(lambda f, b=batch, t=now: self._finish(b, f, t))  # type: ignore[misc]

    async def _until_due(self, ran: int) -> None:
        """Sleep until the batches in flight should be nearly done, or until one of them ends (`ran`: how
        many batches had run when the slot was taken)."""
        delay = self._busy_until - FORM_LEAD_S - time.perf_counter()
        if delay <= 0 or self.batches_run != ran:
            return
        self._ended.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._ended.wait()

    def _expected_run_s(self, batch: list[Item]) -> float:
        """How long the encoder should take over `batch`, from the rate measured so far (0: not yet known)."""
        rate = self.admission.rate
        return sum(item.prepared.cost for item in batch) / rate if rate else 0.0

    # -- warming up -----------------------------------------------------------------------------------

    async def warm_up_buckets(self) -> int:
        """Run every bucket's shape once, in the backbone's thread; returns how many ran (0: no buckets)."""
        return await asyncio.get_running_loop().run_in_executor(
            self.backbone_executor, self.forward.warm_buckets
        )

    def _finish(
        self, batch: list[Item], future: asyncio.Future[tuple[list[Any], float, float]], started: float
    ) -> None:
        by_flow: dict[str, list[Item]] = {}
        for item in batch:
            by_flow.setdefault(item.flow, []).append(item)
        for flow, items in by_flow.items():
            self.admission.release(sum(item.prepared.cost for item in items), len(items), flow)
        self._slots.release()
        self._in_flight -= 1
        self.batches_run += 1
        self._ended.set()
        error = future.exception()
        if error is not None:
            log.error("backbone batch failed", exc_info=error)
            for item in batch:
                if not item.request.future.done():
                    item.request.future.set_exception(error)
            return
        rows, run_s, head_s = future.result()
        self.admission.ran(
            sum(i.prepared.cost for i, row in zip(batch, rows, strict=True) if row is not None),
            run_s,
            started,
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
