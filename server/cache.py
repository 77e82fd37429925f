"""The embedding cache: an example is embedded once per backbone, then reused by every later training.

Keys are (backbone fingerprint, sha256 of the text), so a different backbone never reuses a vector. Memory
holds at most `capacity` vectors (least recently used go first); the store keeps each tenant's vectors so a
restart costs no re-embedding. It is a cache: losing it costs time, never correctness.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterable

import numpy as np


def content_key(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


class EmbeddingCache:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[tuple[str, bytes], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get_many(self, fingerprint: str, keys: Iterable[bytes]) -> dict[bytes, np.ndarray]:
        found: dict[bytes, np.ndarray] = {}
        with self._lock:
            for key in keys:
                vector = self._entries.get((fingerprint, key))
                if vector is not None:
                    self._entries.move_to_end((fingerprint, key))
                    found[key] = vector
        return found

    def put_many(self, fingerprint: str, entries: dict[bytes, np.ndarray]) -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            for key, vector in entries.items():
                self._entries[(fingerprint, key)] = vector
                self._entries.move_to_end((fingerprint, key))
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def evict(self, keys: Iterable[bytes]) -> None:
        """Forget these texts under every fingerprint (a tenant was deleted)."""
        drop = set(keys)
        with self._lock:
            for entry in [k for k in self._entries if k[1] in drop]:
                del self._entries[entry]

    def count(self, hits: int, misses: int) -> None:
        with self._lock:
            self.hits += hits
            self.misses += misses
