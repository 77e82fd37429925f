"""Each replica's one listening connection to the shared store: every change reaches its head bank.

On a NOTIFY (or every second, in case one was lost) the listener reads the changes after the last it
published, in sequence order, and publishes them on the store's feed; after losing its connection it
reconnects (0.1 s, doubling, never more than RETRY_MAX_S apart) and catches up the same way, so a replica that was cut off for a while applies
everything it missed, in order. Runs in its own thread, on its own connection (never one of the pool's).

The change log is pruned as it goes (every listener, every 10 minutes): a change older than an hour goes
once a newer change of the same kind (a swap, a deletion) names the same tenant or key. Followers that are
connected have read it long before; a replica cut off for longer still meets each tenant's newest swap
and newest deletion in order, which is all it needs to end with the same heads (a deletion drops
everything the tenant had, a swap names the version and its weights' sha256). So the log holds about one
row per tenant, not one per swap.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from headswap.server.store.base import Change
from headswap.server.store.feed import ChangeFeed
from headswap.server.store.postgres_schema import first_line

log = logging.getLogger(__name__)

APPLICATION_NAME = "headswap-listener"
PRUNE_EVERY_S = 600.0
RETRY_MAX_S = 0.5  # reconnection attempts at most this far apart: swaps resume within 2 s of the database
KEEP_S = 3600.0  # every change is kept at least this long


def prune_changes(conn: Any, keep_s: float = KEEP_S) -> int:
    """Delete changes older than `keep_s` that a newer change of the same tenant or key and the same kind
    supersedes; returns how many. Several replicas may call it at once: one prunes, the others skip."""
    with conn.transaction():
        lock = "SELECT pg_try_advisory_xact_lock(hashtext('headswap_changes_prune'))"
        if not conn.execute(lock).fetchone()[0]:
            return 0
        cursor = conn.execute(
            "DELETE FROM headswap_changes WHERE seq IN ("
            " SELECT seq FROM ("
            "  SELECT seq, at, row_number() OVER (PARTITION BY tenant, key_id, deleted ORDER BY seq DESC) AS rank"
            "  FROM headswap_changes) AS ranked"
            " WHERE rank > 1 AND at < now() - make_interval(secs => %s))",
            (keep_s,),
        )
        return int(cursor.rowcount)


class Listener:
    def __init__(self, url: str, where: str, feed: ChangeFeed, last: int) -> None:
        self.url = url
        self.where = where
        self.feed = feed
        self.last = last  # sequence of the last change published
        self.connected = threading.Event()
        self.reconnects = 0
        self._stop = threading.Event()
        self._next_prune = 0.0  # once connected, then every PRUNE_EVERY_S
        self._thread = threading.Thread(target=self._run, name="headswap-store-listener", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _catch_up(self, conn: object) -> None:
        rows = conn.execute(  # type: ignore[attr-defined]
            "SELECT seq, tenant, active_version, deleted, weights_sha256, key_id FROM headswap_changes "
            "WHERE seq > %s ORDER BY seq",
            (self.last,),
        ).fetchall()
        for seq, tenant, active, deleted, sha, key_id in rows:
            self.feed.publish(Change(tenant, int(active), int(seq), bool(deleted), str(sha), str(key_id)))
            self.last = int(seq)

    def _prune(self, conn: object) -> None:
        """Housekeeping: a failure (a role without DELETE, a lock timeout) is logged, never a lost connection."""
        import psycopg

        try:
            pruned = prune_changes(conn)
        except psycopg.Error as exc:
            log.warning("change log not pruned (%s); retrying in %.0f s", first_line(exc), PRUNE_EVERY_S)
            return
        if pruned:
            log.info("change log: %d superseded changes removed", pruned)

    def _run(self) -> None:
        import psycopg

        backoff = 0.1
        while not self._stop.is_set():
            try:
                with psycopg.connect(
                    self.url, autocommit=True, application_name=APPLICATION_NAME, connect_timeout=5
                ) as conn:
                    conn.execute("LISTEN headswap_changes")
                    self._catch_up(conn)
                    if self.reconnects:
                        log.info(
                            "store listener reconnected to %s and caught up to change %d",
                            self.where,
                            self.last,
                        )
                    self.connected.set()
                    backoff = 0.1
                    while not self._stop.is_set():
                        for _ in conn.notifies(timeout=1.0, stop_after=1):
                            pass  # woken by a notice, or a second passed: read whatever is new either way
                        self._catch_up(conn)
                        if time.monotonic() >= self._next_prune:
                            self._next_prune = time.monotonic() + PRUNE_EVERY_S
                            self._prune(conn)
            except psycopg.Error as exc:
                self.connected.clear()
                self.reconnects += 1
                log.warning(
                    "store listener lost %s (%s); reconnecting in %.1fs", self.where, first_line(exc), backoff
                )
                self._stop.wait(backoff)
                backoff = min(backoff * 2, RETRY_MAX_S)
