"""One asyncio lock per tenant, shared by training and head management, released with the tenant."""

from __future__ import annotations

import asyncio
import weakref


class TenantLocks:
    def __init__(self) -> None:
        # Weak values: a lock lives while someone holds or waits for it, then goes, so that names sent by
        # callers (unknown tenants included) never accumulate.
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    def __call__(self, tenant: str) -> asyncio.Lock:
        lock = self._locks.get(tenant)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[tenant] = lock
        return lock

    def __len__(self) -> int:
        return len(self._locks)
