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

import numpy as np

from headswap.adapters import HeadFormatError, head_from_bytes
from headswap.adapters.grouped import HeadStack
from headswap.server.binding import Bindings, HeadBinding, ServedBackbone
from headswap.server.errors import FailedPrecondition
from headswap.server.manifest import HeadManifest
from headswap.server.store import Change, HeadStore, StoredVersion
from headswap.server.store.base import damaged


@dataclass(frozen=True)
class LiveHead:
    """One head version in memory: its weights sit in the shared `HeadStack` at `slot`, which is released
    when the last reference to this object goes (no request can use the version any more)."""

    tenant: str
    version: int
    labels: tuple[str, ...]
    binding: HeadBinding  # the backbone weights and precision it was trained on
    slot: int
    stack: HeadStack
    max_label_bytes: int  # to size a reply before it is built
    weights_sha256: str  # with the version, the head's identity
    # Above this out-of-distribution score an input is out_of_distribution (learned on the held-out folds);
    # None for a version without one (trained without validation, or before thresholds were learned).
    ood_threshold: float | None = None

    @property
    def weights(self) -> str:
        return self.binding.weights

    def predict(self, embeddings: np.ndarray) -> list[np.ndarray]:
        return self.stack.apply(embeddings, [self.slot] * len(embeddings))

    @property
    def nbytes(self) -> int:
        return self.stack.nbytes(self.slot)


def live_head(
    tenant: str,
    version: int,
    manifest: HeadManifest,
    weights: bytes,
    stack: HeadStack,
    binding: HeadBinding,
) -> LiveHead:
    loaded = head_from_bytes(weights, manifest.to_json())
    slot = stack.add(loaded.spec, loaded.state, loaded.references)
    threshold = manifest.metrics.get("ood_threshold") if manifest.metrics is not None else None
    head = LiveHead(
        tenant=tenant,
        version=version,
        labels=manifest.labels,
        binding=binding,
        slot=slot,
        stack=stack,
        max_label_bytes=max(len(label.encode()) for label in manifest.labels),
        weights_sha256=manifest.weights_sha256 or "",
        # Only with the references it was learned for: a threshold alone could not be applied.
        ood_threshold=float(threshold) if threshold is not None and loaded.references is not None else None,
    )
    weakref.finalize(head, stack.release, slot)
    return head


def _serves(head: LiveHead | None, change: Change) -> bool:
    """Whether `head` is the version `change` makes active (and, where it names them, those weights)."""
    return (
        head is not None
        and head.version == change.active_version
        and (not change.weights_sha256 or head.weights_sha256 == change.weights_sha256)
    )


class ScoredHeads:
    """What the batcher applies to a lane's Classify rows: each row is (the head's probabilities, the input's
    out-of-distribution score), both from one pass (`HeadStack.apply_scored`)."""

    def __init__(self, stack: HeadStack) -> None:
        self.stack = stack

    def apply(self, embeddings: np.ndarray, slots: list[int]) -> list[tuple[np.ndarray, float]]:
        return self.stack.apply_scored(embeddings, slots)


class HeadBank:
    """Active heads in least-recently-used order within a byte budget: past it, the heads used least
    recently leave memory (their next request loads them again), so resident memory stays bounded
    whatever the number of tenants."""

    def __init__(
        self,
        store: HeadStore,
        stacks: dict[str, HeadStack],
        max_resident_bytes: int = 512 * 1024 * 1024,
        pinned_capacity: int = 64,
        bindings: Bindings | None = None,
    ) -> None:
        self.store = store
        self.stacks = stacks  # backbone weights -> the stack its tenants' heads are applied from
        # Which served backbone answers a head (by default: each stack's key is a fingerprint, matched exactly).
        self.bindings = bindings or Bindings(ServedBackbone.exact(fp) for fp in stacks)
        self.max_resident_bytes = max_resident_bytes
        self._active: OrderedDict[str, LiveHead] = OrderedDict()
        # Versions asked for by number (pins and rollbacks in flight): a few, least recently used first out.
        self._pinned: OrderedDict[tuple[str, int], LiveHead] = OrderedDict()
        self._pinned_capacity = pinned_capacity
        self._bytes = 0  # of the heads in _active and _pinned
        self._seen: dict[str, int] = {}  # newest change sequence seen per tenant
        # The change each tenant's head is being loaded for, and an event set when that load is over: the
        # feed's notice of a local commit and the commit's own call would otherwise both load the version.
        self._loading: dict[str, tuple[int, threading.Event]] = {}
        self._changes = 0  # changes applied, any tenant: a version loaded across one is not kept
        self._lock = threading.Lock()
        self.on_swap: Callable[[], None] | None = None
        self.evictions = 0

    def check(self, head: LiveHead) -> LiveHead:
        """FAILED_PRECONDITION for a head no backbone served here answers (other weights, or another precision
        under --strict-precision), naming what would serve it."""
        self.bindings.check(head.tenant, head.version, head.binding)
        return head

    def _stack_for(self, tenant: str, version: int, binding: HeadBinding) -> HeadStack:
        served = self.bindings.check(tenant, version, binding)
        return self.stacks[served.weights]

    def load(self, tenant: str, version: int, stored: StoredVersion | None = None) -> LiveHead:
        """A version in memory (blocking: reads the store unless `stored` is given); not yet swapped in."""
        if stored is None:
            stored = self.store.load_version(tenant, version)
        binding = self.bindings.of(stored.manifest.to_json())
        stack = self._stack_for(tenant, version, binding)
        try:
            return live_head(tenant, version, stored.manifest, stored.weights, stack, binding)
        except (HeadFormatError, KeyError, TypeError, ValueError) as exc:
            raise damaged(tenant, f"version {version} does not load as a head ({exc})") from None

    # -- the resident set (callers hold the lock) ---------------------------------------------------------

    def _put_active(self, head: LiveHead) -> None:
        old = self._active.pop(head.tenant, None)
        if old is not None:
            self._bytes -= old.nbytes
        self._active[head.tenant] = head
        self._bytes += head.nbytes
        self._evict(keep=head)

    def _drop_active(self, tenant: str) -> None:
        old = self._active.pop(tenant, None)
        if old is not None:
            self._bytes -= old.nbytes

    def _drop_pinned(self, key: tuple[str, int]) -> None:
        old = self._pinned.pop(key, None)
        if old is not None:
            self._bytes -= old.nbytes

    def _evict(self, keep: LiveHead) -> None:
        """Least recently used first: pinned versions, then active heads; never the one just placed."""
        while self._bytes > self.max_resident_bytes or len(self._pinned) > self._pinned_capacity:
            if self._pinned and next(iter(self._pinned.values())) is not keep:
                _, head = self._pinned.popitem(last=False)
            elif self._active and next(iter(self._active.values())) is not keep:
                _, head = self._active.popitem(last=False)
            else:
                return
            self._bytes -= head.nbytes
            self.evictions += 1

    # -- serving ------------------------------------------------------------------------------------------

    def peek(self, tenant: str, version: int = 0) -> LiveHead | None:
        """The head if it is already in memory (no I/O, safe on the event loop), else None."""
        with self._lock:
            head = self._active.get(tenant)
            if head is None or version not in (0, head.version):
                return None
            self._active.move_to_end(tenant)
        return self.check(head)

    def get(self, tenant: str, version: int = 0) -> LiveHead:
        """The head to use for one request: the active version, or `version` when pinned. Blocking."""
        if version == 0:
            return self.check(self._active_head(tenant))
        with self._lock:
            active = self._active.get(tenant)
            pinned = self._pinned.get((tenant, version))
            if pinned is not None:
                self._pinned.move_to_end((tenant, version))
        if active is not None and active.version == version:
            return self.check(active)
        if pinned is not None:
            return self.check(pinned)
        with self._lock:
            changes = self._changes
        head = self.load(tenant, version)  # NotFound for an unknown tenant or version
        with self._lock:
            # Kept only if no change came in while it loaded: that change may have deleted this version
            # (this one request still gets it: it asked before the deletion was seen).
            if self._changes == changes:
                self._drop_pinned((tenant, version))
                self._pinned[(tenant, version)] = head
                self._bytes += head.nbytes
                self._evict(keep=head)
        return self.check(head)

    def _active_head(self, tenant: str) -> LiveHead:
        retries = 2  # a change newer than the state read came in while loading: read again, twice at most
        while True:
            with self._lock:
                head = self._active.get(tenant)
                if head is not None:
                    self._active.move_to_end(tenant)
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
                current = self._active.get(tenant)
                if current is not None:
                    return current  # another request loaded it meanwhile
                self._put_active(loaded)
                return loaded

    # -- swaps ------------------------------------------------------------------------------------------

    def reconcile(self, change: Change, stored: StoredVersion | None = None) -> None:
        """Bring the tenant to `change` (blocking). Loads first, then swaps; stale changes are ignored.
        A tenant not in memory is only marked (its next request loads the state it finds then), unless the
        new version's bytes are at hand in `stored` (a training that just finished here)."""
        tenant = change.tenant
        # A change seen already is news only when its bytes come with it (the feed may deliver a local
        # commit's notice before the commit's own call applies it).
        newer = change.seq.__gt__ if stored is None else change.seq.__ge__
        with self._lock:
            if not newer(self._seen.get(tenant, -1)):
                return
            self._changes += 1
            current = self._active.get(tenant)
            # Versions held by number go with any change of the tenant: it may have removed them (a
            # DeleteHeadVersion, retention), here or on another replica. Asked for again, they load again
            # from the store, which answers NOT_FOUND for one that is gone.
            for key in [k for k in self._pinned if k[0] == tenant]:
                self._drop_pinned(key)
            if change.deleted:
                # Forget the tenant entirely: nothing per tenant outlives it.
                self._drop_active(tenant)
                self._seen.pop(tenant, None)
                return
            if change.active_version == 0 or (current is None and stored is None):
                self._seen[tenant] = change.seq
                if change.active_version == 0:
                    self._drop_active(tenant)
                return
            if _serves(current, change):
                self._seen[tenant] = change.seq
                return
            under_way = self._loading.get(tenant)
            if under_way is None or under_way[0] != change.seq:
                under_way = None
                done = threading.Event()
                self._loading[tenant] = (change.seq, done)
        if under_way is not None:
            # The same change is being loaded already: the feed's notice leaves it to that load; the commit's
            # own call waits for it, so that its reply is true of what serves next (and loads only if it failed).
            if stored is None or self._applied(change, under_way[1]):
                return
        try:
            head = self.check(self.load(tenant, change.active_version, stored))
        except Exception:
            with self._lock:  # never keep serving the old version: the next request meets the error itself
                if change.seq > self._seen.get(tenant, -1):
                    self._seen[tenant] = change.seq
                    self._drop_active(tenant)
            raise
        else:
            with self._lock:
                if not newer(self._seen.get(tenant, -1)):
                    return  # a newer change won the race while this one loaded
                self._seen[tenant] = change.seq
                self._changes += 1
                self._drop_pinned((tenant, head.version))
                self._put_active(head)
        finally:
            # Only once the head serves (or the load failed): a call waiting on this load checks what serves.
            if under_way is None:
                with self._lock:
                    if self._loading.get(tenant) == (change.seq, done):
                        del self._loading[tenant]
                done.set()
        if self.on_swap is not None:
            self.on_swap()

    def _applied(self, change: Change, loaded: threading.Event) -> bool:
        """After another load of `change` (at most a minute): whether its version serves the tenant now."""
        loaded.wait(60.0)
        with self._lock:
            return _serves(self._active.get(change.tenant), change)

    def forget_version(self, tenant: str, version: int) -> None:
        with self._lock:
            self._drop_pinned((tenant, version))

    def resident(self) -> tuple[int, int]:
        """(heads in memory, their bytes)."""
        with self._lock:
            return len(self._active) + len(self._pinned), self._bytes

    def allocated_bytes(self) -> int:
        """What the head stacks hold, free rows included (a slab doubles when full, halves when mostly free)."""
        return sum(stack.allocated_bytes() for stack in self.stacks.values())

    def tracked_tenants(self) -> int:
        """Tenants this bank holds any state for (resident or seen): bounded by the tenants that exist."""
        with self._lock:
            return len(set(self._seen) | set(self._active))
