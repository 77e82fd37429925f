"""The PostgreSQL store beyond the shared contract: migrations, moving a local store over, unreachable
database, no password in messages. A real PostgreSQL server (tests/conftest.py)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from headswap.server.domain import Example, Input
from headswap.server.errors import Unavailable
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
                tenant, NewVersion({"labels": ["neg", "pos"], "n": i}, f"w{i}".encode(), EXAMPLES, True)
            )
    local.activate("alpha", 2)
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
    finally:
        store.close()


def test_unreachable_database_is_unavailable_without_the_password(
    postgres_server: PostgresServer, postgres_dsn: str
) -> None:
    url = postgres_dsn.replace("postgresql:///", "postgresql://postgres:hunter2@/")
    store = PostgresStore(url, migrate_schema=True, listen=False)
    store.commit_version("t", NewVersion({"labels": ["a", "b"]}, b"w", EXAMPLES, True))
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
