"""The embedding cache: an example is embedded once per backbone, then reused by every later training.

Keys are (backbone fingerprint, scope, sha256 of the input: `Input.content_key`), so a different backbone never
reuses a vector. Memory holds at most `capacity` vectors (least recently used go first); the store keeps each
tenant's vectors so a restart costs no re-embedding. It is a cache: losing it costs time, never correctness.

Scope (`--cache-scope`): "tenant" (the default) keys every vector by its tenant too, so what one tenant
embedded is never visible to another, not as a hit count in AdaptHead's reply, not as a faster reply: a shared
cache would tell tenant B whether anyone ever trained on an exact text. "shared" lets tenants reuse each
other's vectors: only for deployments whose tenants are all one organisation.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable

import numpy as np

SCOPES = ("tenant", "shared")


class EmbeddingCache:
    """Content-addressed, per tenant or shared by tenants (`scope`); each entry remembers which tenants put or
    used it, so that deleting a tenant drops the vectors only it had, and leaves those other tenants use."""

    def __init__(self, capacity: int, scope: str = "tenant") -> None:
        if scope not in SCOPES:
            raise ValueError(f"cache scope must be one of {SCOPES}, not {scope!r}")
        self.capacity = capacity
        self.scope = scope
        self._entries: OrderedDict[tuple[str, str, bytes], tuple[np.ndarray, set[str]]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get_many(self, fingerprint: str, keys: Iterable[bytes], tenant: str = "") -> dict[bytes, np.ndarray]:
        found: dict[bytes, np.ndarray] = {}
        scope = self._scope(tenant)
        with self._lock:
            for key in keys:
                entry = self._entries.get((fingerprint, scope, key))
                if entry is not None:
                    self._entries.move_to_end((fingerprint, scope, key))
                    if tenant:
                        entry[1].add(tenant)
                    found[key] = entry[0]
        return found

    def put_many(self, fingerprint: str, entries: dict[bytes, np.ndarray], tenant: str = "") -> None:
        if self.capacity <= 0:
            return
        scope = self._scope(tenant)
        with self._lock:
            for key, vector in entries.items():
                old = self._entries.get((fingerprint, scope, key))
                owners = old[1] if old is not None else set()
                if vector.base is not None:
                    # A row of a batch: keep a copy of the row alone. A view would keep the whole batch
                    # alive for as long as any of its rows stays cached: more than the entry count says,
                    # and past the deletion of the tenants whose rows were dropped.
                    vector = vector.copy()
                if tenant:
                    owners.add(tenant)
                self._entries[(fingerprint, scope, key)] = (vector, owners)
                self._entries.move_to_end((fingerprint, scope, key))
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def _scope(self, tenant: str) -> str:
        return tenant if self.scope == "tenant" else ""

    def evict_tenant(self, tenant: str) -> int:
        """Forget the tenant; drop the vectors no other tenant has used. Returns how many were dropped."""
        with self._lock:
            drop = []
            for entry_key, (_, owners) in self._entries.items():
                owners.discard(tenant)
                if not owners:
                    drop.append(entry_key)
            for entry_key in drop:
                del self._entries[entry_key]
        return len(drop)

    def count(self, hits: int, misses: int) -> None:
        with self._lock:
            self.hits += hits
            self.misses += misses
