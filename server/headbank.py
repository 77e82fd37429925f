"""The head bank: the live heads, one immutable `LiveHead` per (tenant, version) in memory.

Every swap takes one path, `reconcile(change)`: a local AdaptHead, ActivateHeadVersion or DeleteHead, and a
change published by the store (from this process or, with a shared store, another replica) all end there.
It loads the new version first, then moves the pointer in one dict assignment. A request takes its head
once, at its start, and uses only that object, so it finishes on the version it started with; once no
request holds a retired version, nothing refers to it and its memory is freed.

Each change carries a sequence number; the bank remembers the newest it has seen per tenant, so a notice
that arrives late never moves a pointer back, and a head loaded lazily from an older state is not kept.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from headswap.adapters import head_from_bytes
from headswap.adapters.grouped import HeadStack
from headswap.server.errors import FailedPrecondition
from headswap.server.store import Change, HeadStore, StoredVersion


@dataclass(frozen=True)
class LiveHead:
    """One head version in memory: its weights sit in the shared `HeadStack` at `slot`, which is released
    when the last reference to this object goes (no request can use the version any more)."""

    tenant: str
    version: int
    labels: tuple[str, ...]
    fingerprint: str
    slot: int
    stack: HeadStack

    def predict(self, embeddings: np.ndarray) -> list[np.ndarray]:
        return self.stack.apply(embeddings, [self.slot] * len(embeddings))

    @property
    def nbytes(self) -> int:
        return self.stack.nbytes(self.slot)


def live_head(
    tenant: str, version: int, manifest: dict[str, Any], weights: bytes, stack: HeadStack
) -> LiveHead:
    loaded = head_from_bytes(weights, manifest)
    slot = stack.add(loaded.spec, loaded.state)
    head = LiveHead(
        tenant=tenant,
        version=version,
        labels=tuple(manifest["labels"]),
        fingerprint=str(manifest["backbone_fingerprint"]),
        slot=slot,
        stack=stack,
    )
    weakref.finalize(head, stack.release, slot)
    return head


class HeadBank:
    def __init__(
        self, store: HeadStore, fingerprint: str, stack: HeadStack, pinned_capacity: int = 64
    ) -> None:
        self.store = store
        self.fingerprint = fingerprint
        self.stack = stack
        self._active: dict[str, LiveHead] = {}
        # Versions asked for by number (pins and rollbacks in flight): a few, least recently used first out.
        self._pinned: OrderedDict[tuple[str, int], LiveHead] = OrderedDict()
        self._pinned_capacity = pinned_capacity
        self._seen: dict[str, int] = {}  # newest change sequence seen per tenant
        self._lock = threading.Lock()
        self.on_swap: Callable[[], None] | None = None

    def check(self, head: LiveHead) -> LiveHead:
        """FAILED_PRECONDITION for a head trained on another backbone."""
        if head.fingerprint != self.fingerprint:
            raise FailedPrecondition(
                f"tenant {head.tenant!r} version {head.version} was trained on backbone "
                f"{head.fingerprint[:12]}, but this server runs {self.fingerprint[:12]}: retrain it with AdaptHead"
            )
        return head

    def load(self, tenant: str, version: int, stored: StoredVersion | None = None) -> LiveHead:
        """A version in memory (blocking: reads the store unless `stored` is given); not yet swapped in."""
        if stored is None:
            stored = self.store.load_version(tenant, version)
        return live_head(tenant, version, stored.manifest, stored.weights, self.stack)

    def peek(self, tenant: str, version: int = 0) -> LiveHead | None:
        """The head if it is already in memory (no I/O, safe on the event loop), else None."""
        head = self._active.get(tenant)
        if head is not None and version in (0, head.version):
            return self.check(head)
        return None

    def get(self, tenant: str, version: int = 0) -> LiveHead:
        """The head to use for one request: the active version, or `version` when pinned. Blocking."""
        if version == 0:
            return self.check(self._active_head(tenant))
        active = self._active.get(tenant)
        if active is not None and active.version == version:
            return self.check(active)
        with self._lock:
            pinned = self._pinned.get((tenant, version))
            if pinned is not None:
                self._pinned.move_to_end((tenant, version))
                return self.check(pinned)
        head = self.load(tenant, version)  # NotFound for an unknown tenant or version
        with self._lock:
            self._pinned[(tenant, version)] = head
            while len(self._pinned) > self._pinned_capacity:
                self._pinned.popitem(last=False)
        return self.check(head)

    def _active_head(self, tenant: str) -> LiveHead:
        retries = 2  # a change newer than the state read came in while loading: read again, twice at most
        while True:
            head = self._active.get(tenant)
            if head is not None:
                return head
            state = self.store.state(tenant)  # NotFound for an unknown tenant
            if state.active_version == 0:
                raise FailedPrecondition(
                    f"tenant {tenant!r} has no active version (every training so far was negative "
                    "transfer): activate one with ActivateHeadVersion or retrain"
                )
            loaded = self.load(tenant, state.active_version)
            with self._lock:
                if self._seen.get(tenant, -1) > state.seq and retries:
                    retries -= 1
                    continue
                self._seen[tenant] = max(state.seq, self._seen.get(tenant, -1))
                return self._active.setdefault(tenant, loaded)

    def reconcile(self, change: Change, stored: StoredVersion | None = None) -> None:
        """Bring the tenant to `change` (blocking). Loads first, then swaps; stale changes are ignored.
        A tenant not in memory is only marked (its next request loads the state it finds then), unless the
        new version's bytes are at hand in `stored` (a training that just finished here)."""
        tenant = change.tenant
        with self._lock:
            if change.seq <= self._seen.get(tenant, -1):
                return
            current = self._active.get(tenant)
            gone = change.deleted or change.active_version == 0
            if gone or (current is None and stored is None):
                self._seen[tenant] = change.seq
                if gone:
                    self._active.pop(tenant, None)
                if change.deleted:
                    for key in [k for k in self._pinned if k[0] == tenant]:
                        del self._pinned[key]
                return
            if current is not None and current.version == change.active_version:
                self._seen[tenant] = change.seq
                return
        try:
            head = self.check(self.load(tenant, change.active_version, stored))
        except Exception:
            with self._lock:  # never keep serving the old version: the next request meets the error itself
                if change.seq > self._seen.get(tenant, -1):
                    self._seen[tenant] = change.seq
                    self._active.pop(tenant, None)
            raise
        with self._lock:
            if change.seq <= self._seen.get(tenant, -1):
                return  # a newer change won the race while this one loaded
            self._seen[tenant] = change.seq
            self._active[tenant] = head
            self._pinned.pop((tenant, head.version), None)
        if self.on_swap is not None:
            self.on_swap()

    def resident(self) -> tuple[int, int]:
        """(heads in memory, their bytes)."""
        with self._lock:
            heads = list(self._active.values()) + list(self._pinned.values())
        return len(heads), sum(h.nbytes for h in heads)
