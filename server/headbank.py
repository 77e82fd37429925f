"""The head bank: the live heads, one immutable `LiveHead` per (tenant, version) in memory.

A swap replaces the tenant's entry in one dict assignment. A request takes the entry once, at its start,
and uses only that object, so it finishes on the version it started with; once no request holds a retired
version, nothing refers to it and its memory is freed.
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
from headswap.server.store import HeadStore


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
        self._lock = threading.Lock()
        self.swaps = 0
        self.on_swap: Callable[[], None] | None = None

    def _check(self, head: LiveHead) -> LiveHead:
        if head.fingerprint != self.fingerprint:
            raise FailedPrecondition(
                f"tenant {head.tenant!r} version {head.version} was trained on backbone "
                f"{head.fingerprint[:12]}, but this server runs {self.fingerprint[:12]}: retrain it with AdaptHead"
            )
        return head

    def _load(self, tenant: str, version: int) -> LiveHead:
        stored = self.store.load_version(tenant, version)
        return self.make_live(tenant, version, stored.manifest, stored.weights)

    def make_live(self, tenant: str, version: int, manifest: dict[str, Any], weights: bytes) -> LiveHead:
        return live_head(tenant, version, manifest, weights, self.stack)

    def peek(self, tenant: str, version: int = 0) -> LiveHead | None:
        """The head if it is already in memory (no I/O, safe on the event loop), else None."""
        head = self._active.get(tenant)
        if head is not None and version in (0, head.version):
            return self._check(head)
        return None

    def get(self, tenant: str, version: int = 0) -> LiveHead:
        """The head to use for one request: the active version, or `version` when pinned. Blocking."""
        if version == 0:
            head = self._active.get(tenant)
            if head is None:
                state = self.store.state(tenant)  # NotFound for an unknown tenant
                if state.active_version == 0:
                    raise FailedPrecondition(
                        f"tenant {tenant!r} has no active version (every training so far was negative "
                        "transfer): activate one with ActivateHeadVersion or retrain"
                    )
                head = self._load(tenant, state.active_version)
                with self._lock:
                    head = self._active.setdefault(tenant, head)
            return self._check(head)
        active = self._active.get(tenant)
        if active is not None and active.version == version:
            return self._check(active)
        with self._lock:
            pinned = self._pinned.get((tenant, version))
            if pinned is not None:
                self._pinned.move_to_end((tenant, version))
                return self._check(pinned)
        head = self._load(tenant, version)  # NotFound for an unknown tenant or version
        with self._lock:
            self._pinned[(tenant, version)] = head
            while len(self._pinned) > self._pinned_capacity:
                self._pinned.popitem(last=False)
        return self._check(head)

    def swap(self, head: LiveHead) -> None:
        """Make `head` the tenant's active head. Requests already running keep the head they took."""
        self._check(head)
        with self._lock:
            self._active[head.tenant] = head
            self._pinned.pop((head.tenant, head.version), None)
            self.swaps += 1
        if self.on_swap is not None:
            self.on_swap()

    def evict(self, tenant: str) -> None:
        with self._lock:
            self._active.pop(tenant, None)
            for key in [k for k in self._pinned if k[0] == tenant]:
                del self._pinned[key]

    def resident(self) -> tuple[int, int]:
        """(heads in memory, their bytes)."""
        with self._lock:
            heads = list(self._active.values()) + list(self._pinned.values())
        return len(heads), sum(h.nbytes for h in heads)
