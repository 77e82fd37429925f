"""Each replica's one listening connection to the shared store: every change reaches its head bank.

On a NOTIFY (or every second, in case one was lost) the listener reads the changes after the last it
published, in sequence order, and publishes them on the store's feed; after losing its connection it
reconnects with backoff and catches up the same way, so a replica that was cut off for a while applies
everything it missed, in order. Runs in its own thread, on its own connection (never one of the pool's).
"""

from __future__ import annotations

import logging
import threading

from headswap.server.store.base import Change, ChangeFeed

log = logging.getLogger(__name__)

APPLICATION_NAME = "headswap-listener"


class Listener:
    def __init__(self, url: str, where: str, feed: ChangeFeed, last: int) -> None:
        self.url = url
        self.where = where
        self.feed = feed
        self.last = last  # sequence of the last change published
        self.connected = threading.Event()
        self.reconnects = 0
        self._stop = threading.Event()
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
            except psycopg.Error as exc:
                self.connected.clear()
                self.reconnects += 1
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                log.warning("store listener lost %s (%s); reconnecting in %.1fs", self.where, first, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
