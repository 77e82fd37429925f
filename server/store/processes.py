"""One local store shared by the processes of one server (`--workers N`): one writer at a time, and every
process told of every change.

A local store is one replica's directory, but a server with several workers is several processes on it.
What a single process gets from being alone, they get from here:

- **One writer at a time.** Every write of the store (a commit, an activation, a deletion, a key) runs under
  an exclusive `flock` of `<root>/.writer.lock` (and a thread lock inside the process, since `flock` does not
  exclude threads sharing a descriptor), so two workers never read-modify-write one `state.json` at once,
  and a worker's start-up sweep never removes another's commit in progress.
- **A change log.** Each change is appended, under that lock, as one JSON line to `<root>/changes.log`; every
  process follows the file (a thread polling its size) and publishes the others' lines on its own change
  feed, so each head bank reaches every swap through the same `reconcile` path as with PostgreSQL's NOTIFY.
  The log is a notice, not the truth (`state.json` is): nothing is fsynced, a process starting reads the
  store, not the log, and the log is rotated past `ROTATE_BYTES` (followers finish the old file first).
- **Tenant locks across processes**: `TenantFileLocks` (services/locks.py) take a striped `flock` beside the
  in-process lock, so two workers never train one tenant at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

from headswap.server.store.base import Change
from headswap.server.store.feed import ChangeFeed

log = logging.getLogger(__name__)

LOG_NAME = "changes.log"
ROTATE_BYTES = 1 << 20
POLL_S = 0.02


class ProcessShared:
    """The writer lock and the change log of a local store at `root`, for the process that opens it."""

    def __init__(self, root: Path, feed: ChangeFeed, poll_s: float = POLL_S) -> None:
        self.root = root
        self.feed = feed
        self.poll_s = poll_s
        # Who wrote a line: this opening of the store (a process opens it once; tests open it twice).
        self.ident = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._thread_lock = threading.RLock()
        self._lock_fd = os.open(root / ".writer.lock", os.O_RDWR | os.O_CREAT, 0o600)
        self._depth = 0
        self._stop = threading.Event()
        self._follower: threading.Thread | None = None

    @property
    def log_path(self) -> Path:
        return self.root / LOG_NAME

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Exclusive across the store's processes and this process's threads (re-entrant)."""
        with self._thread_lock:
            if self._depth == 0:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def append(self, change: Change) -> None:
        """Log a change for the other processes (the caller holds `writing`)."""
        line = json.dumps(
            {
                "by": self.ident,
                "tenant": change.tenant,
                "active_version": change.active_version,
                "seq": change.seq,
                "deleted": change.deleted,
                "weights_sha256": change.weights_sha256,
                "key_id": change.key_id,
            }
        )
        with self.writing():
            path = self.log_path
            try:
                if path.stat().st_size > ROTATE_BYTES:
                    os.replace(path, path.with_name(LOG_NAME + ".1"))
            except FileNotFoundError:
                pass
            with path.open("a", encoding="utf-8") as handle:
                handle.write(line + "\n")

    # -- following the others -----------------------------------------------------------------------------

    def start(self) -> None:
        """Follow the log from its end (a process starting reads the store itself, not past notices)."""
        self.log_path.touch(exist_ok=True)
        handle = self.log_path.open("r", encoding="utf-8")
        handle.seek(0, os.SEEK_END)
        self._follower = threading.Thread(
            target=self._follow, args=(handle,), name="headswap-store-follower", daemon=True
        )
        self._follower.start()

    def _follow(self, handle: object) -> None:
        import io

        assert isinstance(handle, io.TextIOWrapper)
        partial = ""
        while not self._stop.wait(self.poll_s):
            try:
                chunk = handle.read()
                if chunk:
                    partial = self._publish(partial + chunk)
                # Rotated: finish the old file (read above), then go on from the new one's start; if it was
                # rotated again meanwhile (it is the ".1" now), read that one whole first.
                if os.stat(self.log_path).st_ino != os.fstat(handle.fileno()).st_ino:
                    partial = self._publish(partial + handle.read())
                    old_ino = os.fstat(handle.fileno()).st_ino
                    handle.close()
                    previous = self.log_path.with_name(LOG_NAME + ".1")
                    try:
                        if os.stat(previous).st_ino != old_ino:
                            partial = self._publish(partial + previous.read_text(encoding="utf-8"))
                    except FileNotFoundError:
                        pass
                    handle = self.log_path.open("r", encoding="utf-8")
                    assert isinstance(handle, io.TextIOWrapper)
            except FileNotFoundError:
                continue  # between a rotation's rename and the next append
            except Exception:
                log.exception("reading the store's change log failed; retrying")
        handle.close()

    def _publish(self, text: str) -> str:
        """Publish the complete lines of `text` written by other processes; returns the incomplete rest."""
        *lines, rest = text.split("\n")
        for line in lines:
            try:
                raw = json.loads(line)
                if raw["by"] == self.ident:
                    continue
                self.feed.publish(
                    Change(
                        str(raw["tenant"]),
                        int(raw["active_version"]),
                        int(raw["seq"]),
                        bool(raw["deleted"]),
                        str(raw["weights_sha256"]),
                        str(raw["key_id"]),
                    )
                )
            except (ValueError, KeyError, TypeError):
                log.warning("skipped a line of the store's change log that is not a change: %.80r", line)
        return rest

    def close(self) -> None:
        self._stop.set()
        if self._follower is not None:
            self._follower.join(timeout=1.0)
        os.close(self._lock_fd)
