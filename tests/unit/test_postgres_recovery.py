"""Writes come back within 2 s of PostgreSQL accepting connections again, however long it was down (issue 23,
item 7). What bounded recovery before: the connection pool's reconnection backoff (1 s, doubling, up to its
5-minute reconnect timeout; a replica found the database back only at its next attempt, up to 15 s late)
and the listener's backoff (doubling to 5 s). A real PostgreSQL server (tests/conftest.py), stopped and
started with pg_ctl; the 2 s is the feature's bound, measured from when `pg_ctl start -w` returns (the server
accepts connections), with writes tried every 50 ms."""

from __future__ import annotations

import contextlib
import time

import pytest

from headswap.server.domain import Example, Input
from headswap.server.errors import Unavailable
from headswap.server.manifest import HeadManifest
from headswap.server.store.base import NewVersion
from headswap.server.store.postgres import PostgresStore
from headswap.server.testing_postgres import PostgresServer

EXAMPLES = [Example(Input(text="good"), "pos"), Example(Input(text="bad"), "neg")]
MANIFEST = HeadManifest.from_json({"labels": ["neg", "pos"]})
OUTAGE_S = 16.0  # the old pool tried again 1, 3, 7, 15 and 31 s after the first failure: 15 s late here
BOUND_S = 2.0


def write(store: PostgresStore) -> None:
    store.commit_version("t", NewVersion(MANIFEST, b"w", EXAMPLES, True))


def test_writes_come_back_within_two_seconds_of_the_database(
    postgres_server: PostgresServer, postgres_dsn: str
) -> None:
    store = PostgresStore(postgres_dsn, migrate_schema=True)
    try:
        assert store.listener is not None
        for _ in range(3):
            write(store)
        postgres_server.stop()  # returns once PostgreSQL is down
        try:
            down_until = time.monotonic() + OUTAGE_S
            while time.monotonic() < down_until:  # callers keep trying, as a replica's callers do
                with pytest.raises(Unavailable):
                    write(store)
                time.sleep(0.2)
            assert not store.listener.connected.is_set()
        finally:
            postgres_server.start()  # returns once PostgreSQL accepts connections
        back = time.monotonic()
        written = listening = None
        while time.monotonic() - back < 30.0 and (written is None or listening is None):
            if written is None:
                with contextlib.suppress(Unavailable):
                    write(store)
                    written = time.monotonic() - back
            if listening is None and store.listener.connected.is_set():
                listening = time.monotonic() - back
            time.sleep(0.05)
        print(f"write back after {written} s, listener after {listening} s")
        assert written is not None and written < BOUND_S, f"the first write succeeded {written} s after"
        assert listening is not None and listening < BOUND_S, f"the listener was back {listening} s after"
    finally:
        store.close()
