"""The items waiting for the backbone, and how a batch is formed from them.

Items are kept twice: by grouping key (a text's token length; arrival order within a key), so that a batch
takes the items nearest its first one's length without looking at the rest of the queue, and by flow (a
tenant, a key or a single call), so that batches take turns between flows: each batch is led by the oldest
item of the flow whose turn it is, then the flow goes to the back of the line; a flow that had nothing
waiting joins at the front. A caller with a mountain of
work therefore leads one batch a round like everyone else (it still fills the room other flows leave in a
batch, so the backbone is never idle for fairness' sake).

Items leave by being taken or withdrawn (a cancelled call); both mark them and drop them lazily from the
fronts of their queues, so every operation costs the items it touches, never the length of the queue.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Iterable, MutableMapping
from typing import Any, Protocol

from headswap.server.inference.buckets import ShapeBuckets
from headswap.server.inference.protocols import Prepared

# Items whose calls were admitted longer ago than this share of the queue's bound on expected wait
# (`max_queue_wait_s`) join a batch before any younger one: see `Pending.take`.
OLD_SHARE = 0.5


class Item(Protocol):
    prepared: Prepared
    taken: bool
    seq: int

    @property
    def flow(self) -> str: ...
    @property
    def arrived(self) -> float: ...  # when its call was admitted (perf_counter)


class Policy(Protocol):
    @property
    def max_batch_cost(self) -> int: ...
    @property
    def max_batch_items(self) -> int: ...
    @property
    def max_padding(self) -> float: ...
    @property
    def max_queue_wait_s(self) -> float: ...


class Pending:
    def __init__(self) -> None:
        self._keys: dict[int, deque[Any]] = {}
        self._flows: OrderedDict[str, deque[Any]] = OrderedDict()  # the first one leads the next batch
        self.count = 0  # items waiting
        self.cost = 0  # their costs, summed

    def add(self, items: Iterable[Item]) -> None:
        for item in items:
            key = item.prepared.group_key
            by_key = self._keys.get(key)
            if by_key is None:
                by_key = self._keys[key] = deque()
            by_key.append(item)
            by_flow = self._flows.get(item.flow)
            if by_flow is None:
                # A flow with nothing waiting goes first (as fq_codel serves new flows first): a lone small
                # call waits for the batch in flight, not for a round of everyone else's turns.
                by_flow = self._flows[item.flow] = deque()
                self._flows.move_to_end(item.flow, last=False)
            by_flow.append(item)
            self.count += 1
            self.cost += item.prepared.cost

    def withdraw(self, items: Iterable[Item]) -> tuple[int, int]:
        """Take waiting items out (a cancelled call's); returns how many were still waiting and their cost."""
        gone = [item for item in items if not item.taken]
        for item in gone:
            item.taken = True
        self._settle(gone)
        return len(gone), sum(item.prepared.cost for item in gone)

    def leader(self) -> Item | None:
        """The item the next batch is built around: the oldest of the flow whose turn it is."""
        while self._flows:
            flow, queue = next(iter(self._flows.items()))
            while queue and queue[0].taken:
                queue.popleft()
            if queue:
                return queue[0]  # type: ignore[no-any-return]
            del self._flows[flow]
        return None

    def take(
        self, policy: Policy, buckets: ShapeBuckets | None = None, now: float | None = None
    ) -> list[Any]:
        """A batch around the leader: items of the nearest keys first (arrival order within a key), within
        the cost budget, the item cap and the padding cap; with shape buckets, no more items than fill a
        bucket well. The leader's flow goes to the back of the line. Returned in arrival order.

        Old items (admitted more than OLD_SHARE of the queue's bound before `now`, perf_counter) are taken
        first, then the rest: nearest-first over the whole queue alone let later items of lengths near the
        leaders' pass an item of another length again and again until it was the oldest of its flow, and
        under overload accepted calls then waited twice the bound they were admitted on (issue 23.6)."""
        leader = self.leader()
        if leader is None:
            return []
        key = leader.prepared.group_key
        keys = sorted(self._keys, key=lambda k: (abs(k - key), k))
        batch = _Batch(policy, leader)
        now = time.perf_counter() if now is None else now
        old = now - OLD_SHARE * policy.max_queue_wait_s
        if batch.fill(self._keys, keys, before=old):
            batch.fill(self._keys, keys, before=None)
        chosen = batch.items
        if buckets is not None:
            chosen = chosen[: buckets.items_to_take(len(chosen), policy.max_padding)]
        for item in chosen:
            item.taken = True
        self._settle(chosen)
        if leader.flow in self._flows:  # it has more waiting: to the back of the line
            self._flows.move_to_end(leader.flow)
        chosen.sort(key=lambda item: item.seq)
        return chosen

    def _settle(self, gone: list[Any]) -> None:
        """Account for items just marked taken, and drop taken items from the fronts of their queues (one
        further in goes when it reaches the front: `leader` and `take` skip it meanwhile)."""
        self.count -= len(gone)
        self.cost -= sum(item.prepared.cost for item in gone)
        _drop_taken(self._keys, {item.prepared.group_key for item in gone})
        _drop_taken(self._flows, {item.flow for item in gone})

    def __len__(self) -> int:
        return self.count


class _Batch:
    """A batch being formed around its leader, within a policy's cost, item and padding caps."""

    def __init__(self, policy: Policy, leader: Any) -> None:
        self.policy = policy
        self.items: list[Any] = [leader]
        self.ids = {id(leader)}
        self.largest = self.real = leader.prepared.cost

    def fill(self, by_key: dict[int, deque[Any]], keys: list[int], before: float | None) -> bool:
        """Add items key by key (in `keys`' order; arrival order within a key), only those of calls admitted
        at or before `before` if given; returns whether there is room left."""
        policy = self.policy
        for k in keys:
            if len(self.items) >= policy.max_batch_items:
                return False
            for item in by_key[k]:
                if item.taken or id(item) in self.ids:
                    continue
                if before is not None and item.arrived > before:
                    break  # the rest of this key came later still
                item_cost = item.prepared.cost
                cost = max(self.largest, item_cost)
                padded = cost * (len(self.items) + 1)
                if padded > policy.max_batch_cost:
                    break
                if padded - (self.real + item_cost) > policy.max_padding * padded:
                    break
                self.items.append(item)
                self.ids.add(id(item))
                self.largest = cost
                self.real += item_cost
                if len(self.items) >= policy.max_batch_items:
                    return False
        return True


def _drop_taken(queues: MutableMapping[Any, deque[Any]], names: Iterable[Any]) -> None:
    """Drop the taken items from the front of each named queue, and the queues left empty."""
    for name in names:
        queue = queues.get(name)
        if queue is not None:
            while queue and queue[0].taken:
                queue.popleft()
            if not queue:
                del queues[name]
