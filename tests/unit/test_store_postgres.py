"""The PostgreSQL store beyond the shared contract: migrations, moving a local store over, unreachable
database, no password in messages. A real PostgreSQL server (tests/conftest.py)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from headswap.server.domain import Example, Input
from headswap.server.errors import Unavailable
from headswap.server.manifest import HeadManifest
from headswap.server.store.base import NewVersion, weights_digest
from headswap.server.store.local import LocalStore
from headswap.server.store.postgres import PostgresStore
from headswap.server.store.postgres_schema import MIGRATIONS, redact
from headswap.server.testing_postgres import PostgresServer

EXAMPLES = [Example(Input(text="good"), "pos"), Example(Input(text="bad"), "neg")]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "headswap.client.cli", *args], capture_output=True, text=True
    )


def test_a_store_without_schema_says_how_to_make_one(postgres_dsn: str) -> None:
    with pytest.raises(RuntimeError, match="store migrate"):
        PostgresStore(postgres_dsn)
    out = cli("store", "migrate", "--store", postgres_dsn)
    assert out.returncode == 0 and f"version 0 -> {len(MIGRATIONS)}" in out.stdout, out.stderr
    again = cli("store", "migrate", "--store", postgres_dsn)
    assert f"version {len(MIGRATIONS)} -> {len(MIGRATIONS)}" in again.stdout
    PostgresStore(postgres_dsn).close()


def test_copy_a_local_store_over_idempotently(postgres_dsn: str, tmp_path: Path) -> None:
    local = LocalStore(tmp_path / "local")
    for tenant, n in (("alpha", 3), ("beta", 1)):
        for i in range(n):
            local.commit_version(
                tenant,
                NewVersion(
                    HeadManifest.from_json({"labels": ["neg", "pos"], "n": i}),
                    f"w{i}".encode(),
                    EXAMPLES,
                    True,
                ),
            )
    local.activate("alpha", 2)
    for i in range(2):  # gamma's version 2 was deleted: the shared store must not give its number out again
        local.commit_version(
            "gamma",
            NewVersion(
                HeadManifest.from_json({"labels": ["neg", "pos"]}), f"g{i}".encode(), EXAMPLES, i == 0
            ),
        )
    local.delete_version("gamma", 2)
    key = Input(text="good").content_key()
    local.save_embeddings("alpha", "f" * 64, {key: np.arange(4, dtype=np.float32)})
    out = cli("store", "copy", "--from", str(tmp_path / "local"), "--to", postgres_dsn)
    assert out.returncode == 0 and "alpha: copied" in out.stdout and "beta: copied" in out.stdout, (
        out.stdout + out.stderr
    )
    store = PostgresStore(postgres_dsn, listen=False)
    try:
        state = store.state("alpha")
        assert (state.versions, state.active_version, state.previous_version) == ((1, 2, 3), 2, 3)
        assert weights_digest(store.load_version("alpha", 3).weights) == weights_digest(b"w2")
        assert store.examples("beta") == EXAMPLES
        assert np.array_equal(store.cached_embeddings("alpha", "f" * 64)[key], np.arange(4, dtype=np.float32))
        again = cli("store", "copy", "--from", str(tmp_path / "local"), "--to", postgres_dsn)
        assert again.returncode == 0 and "alpha: already there" in again.stdout
        assert store.state("alpha").versions == (1, 2, 3)
        assert store.state("gamma").versions == (1,)
        new = NewVersion(HeadManifest.from_json({"labels": ["neg", "pos"]}), b"g2", EXAMPLES, False)
        assert store.commit_version("gamma", new).versions == (1, 3)
    finally:
        store.close()


def test_unreachable_database_is_unavailable_without_the_password(
    postgres_server: PostgresServer, postgres_dsn: str
) -> None:
    url = postgres_dsn.replace("postgresql:///", "postgresql://postgres:hunter2@/")
    store = PostgresStore(url, migrate_schema=True, listen=False)
    store.commit_version(
        "t", NewVersion(HeadManifest.from_json({"labels": ["a", "b"]}), b"w", EXAMPLES, True)
    )
    postgres_server.stop()
    try:
        with pytest.raises(Unavailable) as info:
            store.examples("t")
        assert "unreachable" in info.value.message and "hunter2" not in info.value.message
    finally:
        postgres_server.start()
    # Back: the pool replaces its dead connections (its reconnection attempts back off, so allow a few s).
    deadline = time.monotonic() + 20
    while True:
        try:
            assert store.examples("t") == EXAMPLES
            break
        except Unavailable:
            assert time.monotonic() < deadline, "the store did not come back"
            time.sleep(0.2)
    store.close()
    assert "hunter2" not in redact(url) and "postgres" in redact(url)


def _head(seed: int) -> tuple[bytes, dict]:  # type: ignore[type-arg]
    from headswap.adapters import TrainConfig, head_to_bytes, train_head

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((20, 8)).astype(np.float32)
    head = train_head(x, (x[:, 0] > 0).astype(np.int64), 2, TrainConfig(seed=seed, device="cpu"))
    weights, manifest = head_to_bytes(head, {"labels": ["neg", "pos"], "backbone_fingerprint": "f" * 64})
    return weights, HeadManifest.from_json(manifest)


def test_the_change_log_keeps_what_a_late_replica_needs_not_every_swap(postgres_dsn: str) -> None:
    import psycopg

    from headswap.adapters.grouped import HeadStack
    from headswap.server.headbank import HeadBank
    from headswap.server.keys import ApiKey
    from headswap.server.store.base import Change
    from headswap.server.store.postgres_listener import Listener, prune_changes

    store = PostgresStore(postgres_dsn, migrate_schema=True, listen=False)
    heads = {seed: _head(seed) for seed in range(7)}

    def swap(tenant: str, seed: int) -> None:
        weights, manifest = heads[seed]
        store.commit_version(tenant, NewVersion(manifest, weights, EXAMPLES, activate=True))

    def log() -> list[tuple[int, str, int, bool, str]]:
        with psycopg.connect(postgres_dsn) as conn:
            query = "SELECT seq, tenant, active_version, deleted, key_id FROM headswap_changes ORDER BY seq"
            return [tuple(row) for row in conn.execute(query)]  # type: ignore[misc]

    swap("a", 0)
    swap("a", 2)
    swap("b", 1)
    late = HeadBank(store, {"f" * 64: HeadStack(8)})  # a replica that holds a and b, and a's version 1 pinned
    assert (late.get("a").version, late.get("b").version, late.get("a", 1).version) == (2, 1, 1)
    assert late.resident()[0] == 3
    cut_off_at = log()[-1][0]

    # While that replica is cut off: a swaps again, is deleted and comes back with two new versions (numbered
    # 1 and 2 again, other weights); b is deleted; a key is revoked twice.
    swap("a", 3)
    store.delete("a")
    swap("a", 4)
    swap("a", 5)
    store.delete("b")
    store.put_key(ApiKey("k1", "tenant", "a", "0" * 64, 1.0))
    store.revoke_key("k1", 2.0)
    store.revoke_key("k1", 3.0)
    assert len(log()) == 10
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute("UPDATE headswap_changes SET at = now() - interval '2 hours'")
    swap("c", 6)  # newer than an hour, superseded or not: kept
    swap("c", 6)

    class Collected:
        def __init__(self) -> None:
            self.changes: list[Change] = []

        def publish(self, change: Change) -> None:
            self.changes.append(change)

    def follow(since: int, until: Callable[[Listener], bool]) -> list[Change]:
        collected = Collected()
        listener = Listener(postgres_dsn, "test", collected, since)  # type: ignore[arg-type]
        listener.start()
        try:
            deadline = time.monotonic() + 20
            while not until(listener) and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            listener.stop()
        return collected.changes

    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        assert prune_changes(conn, keep_s=3 * 3600) == 0  # nothing is old enough yet
    follow(log()[-1][0], lambda _: len(log()) < 12)  # a replica that is up to date prunes once connected
    kept = log()
    # Per tenant or key and kind (swap, deletion) the newest, and whatever is recent.
    assert [(tenant, version, deleted, key) for _, tenant, version, deleted, key in kept] == [
        ("b", 1, False, ""),
        ("a", 0, True, ""),
        ("a", 2, False, ""),
        ("b", 0, True, ""),
        ("", 0, False, "k1"),
        ("c", 1, False, ""),
        ("c", 2, False, ""),
    ]
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        assert prune_changes(conn) == 0

    caught_up = follow(cut_off_at, lambda listener: listener.last >= kept[-1][0])
    assert [c.seq for c in caught_up] == [row[0] for row in kept if row[0] > cut_off_at]
    for change in caught_up:
        if change.tenant:
            late.reconcile(change)
    # It ends where a replica that saw every change ends: nothing of a's old life or of b in memory (a's old
    # version 1 would stay pinned if the deletion were not replayed, and answer for the new version 1), and
    # a served from its new versions when asked.
    assert late.resident()[0] == 0
    assert late.get("a").weights_sha256 == weights_digest(heads[5][0])
    assert late.get("a", 1).weights_sha256 == weights_digest(heads[4][0])
    store.close()


def test_a_failed_prune_is_logged_not_a_lost_connection(caplog: pytest.LogCaptureFixture) -> None:
    import contextlib

    import psycopg

    from headswap.server.store.postgres_listener import Listener

    class Refusing:  # a connection whose role may read the change log but not delete from it
        def transaction(self) -> contextlib.AbstractContextManager[None]:
            return contextlib.nullcontext()

        def execute(self, *_: object) -> None:
            raise psycopg.errors.InsufficientPrivilege("permission denied for table headswap_changes")

    listener = Listener("postgresql://unused", "test", None, 0)  # type: ignore[arg-type]
    listener._prune(Refusing())  # returns: the listener goes on following changes
    assert "change log not pruned (permission denied for table headswap_changes)" in caplog.text


def test_replicas_training_one_tenant_at_once_both_commit(postgres_dsn: str) -> None:
    """Only a deletion refuses a commit (issue 23, item 1): two replicas' trainings that started on one state
    each commit a version."""
    store = PostgresStore(postgres_dsn, migrate_schema=True)
    try:
        seq = store.commit_version(
            "t", NewVersion(HeadManifest.from_json({"labels": ["neg", "pos"]}), b"w", EXAMPLES, True)
        ).seq
        first = store.commit_version(
            "t", NewVersion(HeadManifest.from_json({"labels": ["neg", "pos"]}), b"a", EXAMPLES, True, seq)
        )
        second = store.commit_version(
            "t", NewVersion(HeadManifest.from_json({"labels": ["neg", "pos"]}), b"b", EXAMPLES, True, seq)
        )
        assert first.versions == (1, 2) and second.versions == (1, 2, 3)
    finally:
        store.close()


def test_cached_embeddings_carry_a_checksum_per_row(
    postgres_dsn: str, postgres_server: PostgresServer
) -> None:
    """Issue 23, item 3: a garbled row, rows moved under other keys, or rows written before the checksums
    are dropped and counted, never returned."""
    store = PostgresStore(postgres_dsn, migrate_schema=True)
    try:
        keys = [bytes([i]) * 32 for i in range(4)]
        entries = {k: np.full(8, i, np.float32) for i, k in enumerate(keys)}
        store.save_embeddings("t", "fp", entries)
        back = store.cached_embeddings("t", "fp")
        assert set(back) == set(keys) and back.dropped == 0
        database = postgres_dsn.split("///")[1].split("?")[0]
        # 16 garbled bytes in the second row's vector.
        postgres_server.sql(
            "UPDATE headswap_embeddings SET vectors = overlay(vectors placing "
            "'\\xffffffffffffffffffffffffffffffff'::bytea from 33)",
            database,
        )
        back = store.cached_embeddings("t", "fp")
        assert set(back) == {keys[0], keys[2], keys[3]} and back.dropped == 1
        # Rows permuted: every vector under another key.
        store.save_embeddings(
            "t", "fp", dict(zip(keys, [entries[k] for k in keys[1:] + keys[:1]], strict=True))
        )
        postgres_server.sql(
            "UPDATE headswap_embeddings SET vectors = substring(vectors from 33) || substring(vectors for 32)",
            database,
        )
        assert store.cached_embeddings("t", "fp").dropped == 4
        postgres_server.sql("UPDATE headswap_embeddings SET checks = NULL", database)  # as written before
        back = store.cached_embeddings("t", "fp")
        assert back == {} and back.dropped == 1
    finally:
        store.close()
