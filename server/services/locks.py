"""One lock per tenant, shared by training and head management, released with the tenant.

Within a process it is an asyncio lock. With `directory` set (a local store shared by a server's workers), it
also takes an exclusive `flock` of one of `STRIPES` files there, so that two processes never train or change
one tenant at once; the files are striped by a hash of the name, so callers' names never create files.
The flock is tried without blocking and retried every few milliseconds: no thread waits on it, and a caller
that goes away while waiting leaves nothing held.

The lock is held by the work, not by the call: work handed to a thread under the lock (`hold`) keeps the
lock until it ends, even when the call that started it is cancelled or times out and leaves the `async
with` block. A thread cannot be stopped; were the lock released when its caller went away, a DeleteHead
could run while that thread still commits, and the commit would bring the deleted tenant back.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import hashlib
import os
import weakref
from pathlib import Path
from types import TracebackType
from typing import Any

STRIPES = 256
RETRY_S = 0.01


class TenantLock:
    def __init__(self, path: Path | None) -> None:
        self._lock = asyncio.Lock()
        self._path = path
        self._fd: int | None = None
        self._work: set[concurrent.futures.Future[Any]] = set()

    def hold(self, work: concurrent.futures.Future[Any]) -> None:
        """Keep the lock, once its holder leaves, until `work` (a thread's job started under it) ends."""
        self._work.add(work)

    def locked(self) -> bool:
        return self._lock.locked()

    async def __aenter__(self) -> None:
        await self._lock.acquire()
        if self._path is None:
            return
        try:
            fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        await asyncio.sleep(RETRY_S)
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
        except BaseException:
            self._lock.release()
            raise

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        pending = [work for work in self._work if not work.done()]
        self._work.clear()
        if not pending:
            self._release()
            return
        # The holder left (cancelled, timed out, failed) while its work still runs: the last job to end
        # releases the lock, on the loop. The callbacks keep this lock alive (the registry's value is weak).
        loop = asyncio.get_running_loop()
        left = len(pending)

        def ended(_: object) -> None:
            nonlocal left
            left -= 1
            if left == 0:
                self._release()

        def on_done(work: concurrent.futures.Future[Any]) -> None:
            # RuntimeError: the loop is closed: the server is gone, and its locks with it.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(ended, work)

        for work in pending:
            work.add_done_callback(on_done)

    def _release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the flock
            self._fd = None
        self._lock.release()


class TenantLocks:
    def __init__(self, directory: Path | None = None) -> None:
        # Weak values: a lock lives while someone holds or waits for it, then goes, so that names sent by
        # callers (unknown tenants included) never accumulate.
        self._locks: weakref.WeakValueDictionary[str, TenantLock] = weakref.WeakValueDictionary()
        self.directory = directory
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)

    def __call__(self, tenant: str) -> TenantLock:
        lock = self._locks.get(tenant)
        if lock is None:
            path = None
            if self.directory is not None:
                stripe = int.from_bytes(hashlib.sha256(tenant.encode()).digest()[:4], "little") % STRIPES
                path = self.directory / f"{stripe}.lock"
            lock = TenantLock(path)
            self._locks[tenant] = lock
        return lock

    def __len__(self) -> int:
        return len(self._locks)
