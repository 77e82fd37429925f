"""The PostgreSQL store's connection pool, with reconnection attempts at most `RETRY_MAX_S` apart.

psycopg_pool retries a failed connection after 1 s, then 2, 4, 8... until its reconnect timeout (5 minutes):
after an outage of a few seconds, a replica found the database back only at its next attempt, up to 15 s
late, answering UNAVAILABLE meanwhile. Here attempts start 0.1 s apart and never grow past `RETRY_MAX_S`,
so writes come back within about that of PostgreSQL accepting connections (with the caller's next try: the
bound the README states is 2 s). An attempt on a unix socket or a reachable host costs a connect call; a
few a second from each replica is nothing to a database that is down, or just up.

The same bound applies where the pool checks a connection it hands out (`check`) and finds it dead: the
next one is tried at once, then at most `RETRY_MAX_S` later.
"""

from __future__ import annotations

from time import monotonic, sleep
from typing import Any

import psycopg_pool
from psycopg_pool.base import AttemptWithBackoff

RETRY_MAX_S = 0.25


class BoundedAttempt(AttemptWithBackoff):
    INITIAL_DELAY = 0.1

    def update_delay(self, now: float) -> None:
        super().update_delay(now)
        self.delay = min(self.delay, RETRY_MAX_S)


class BoundedPool(psycopg_pool.ConnectionPool):  # type: ignore[type-arg]
    """A ConnectionPool whose reconnection attempts are BoundedAttempts (psycopg_pool 3.2 and 3.3 pass the
    attempt along from one try to the next: the first one decides)."""

    def _add_connection(self, attempt: AttemptWithBackoff | None, growing: bool = False) -> None:
        if attempt is None:
            attempt = BoundedAttempt(timeout=self.reconnect_timeout)
        super()._add_connection(attempt, growing)

    def _getconn_with_check_loop(self, deadline: float) -> Any:
        # psycopg_pool's loop (3.2, 3.3), with BoundedAttempt: the library's sleeps 1 s, then 2, between
        # dead connections (a pool full of them after a restart); here the next is tried within RETRY_MAX_S.
        attempt: BoundedAttempt | None = None
        while True:
            conn = self._getconn_unchecked(deadline - monotonic())
            try:
                self._check_connection(conn)
            except Exception:
                self._putconn(conn, from_getconn=True)
            except BaseException:
                self._putconn(conn, from_getconn=True)
                raise
            else:
                return conn
            now = monotonic()
            if attempt is None:
                attempt = BoundedAttempt(timeout=deadline - now)
            else:
                attempt.update_delay(now)
            if attempt.time_to_give_up(now):
                raise psycopg_pool.PoolTimeout()
            sleep(attempt.delay)
