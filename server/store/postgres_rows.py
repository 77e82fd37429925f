"""Talking to PostgreSQL, for the PostgreSQL store and its mixins (one per concern: requests, restore, the
embedding cache, API keys): transactions, the change clock and log, and the rows more than one writer inserts."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from headswap.server.errors import DiskFull, Unavailable
from headswap.server.manifest import HeadManifest
from headswap.server.store.base import Change
from headswap.server.store.postgres_schema import jsonb

CHANNEL = "headswap_changes"


class Connected:
    """Provided by PostgresStore: its pool and the redacted URL it names in errors."""

    _pool: Any
    where: str

    @contextlib.contextmanager
    def _reachable(self, what: str) -> Iterator[None]:
        import psycopg
        import psycopg_pool

        from headswap.server.store.postgres_schema import first_line

        try:
            yield
        except psycopg.errors.DiskFull as exc:  # SQLSTATE 53100: the database's disk, not the network
            raise DiskFull(f"PostgreSQL could not {what}") from exc
        except (psycopg.OperationalError, psycopg.InterfaceError, psycopg_pool.PoolTimeout) as exc:
            raise Unavailable(
                f"could not {what}: the head store at {self.where} is unreachable ({first_line(exc)}); retry shortly"
            ) from None

    @contextlib.contextmanager
    def transaction(self, what: str) -> Iterator[Any]:
        """A connection in one transaction."""
        with self._reachable(what), self._pool.connection() as conn, conn.transaction():
            yield conn

    def tick(self, conn: Any) -> int:
        """The next change sequence number; the clock row stays locked until commit, ordering the changes."""
        return int(conn.execute("UPDATE headswap_clock SET seq = seq + 1 RETURNING seq").fetchone()[0])

    def record_change(self, conn: Any, change: Change) -> None:
        conn.execute(
            "INSERT INTO headswap_changes (seq, tenant, active_version, weights_sha256, deleted, key_id) "
            "VALUES (%s, %s, %s, %s, %s, %s)",
            (
                change.seq,
                change.tenant,
                change.active_version,
                change.weights_sha256,
                change.deleted,
                change.key_id,
            ),
        )
        conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(change.seq)))

    def replace_examples(self, conn: Any, tenant: str, rows: list[dict[str, str]]) -> int:
        """The tenant's example set becomes `rows` (its only one); returns its id."""
        examples_id = int(
            conn.execute(
                "INSERT INTO headswap_example_sets (tenant, examples) VALUES (%s, %s) RETURNING id",
                (tenant, jsonb(rows)),
            ).fetchone()[0]
        )
        conn.execute(
            "DELETE FROM headswap_example_sets WHERE tenant = %s AND id <> %s", (tenant, examples_id)
        )
        return examples_id

    def insert_version(self, conn: Any, tenant: str, manifest: HeadManifest, weights: bytes) -> None:
        """A committed version's row (`manifest` numbered and sealed); in the caller's transaction."""
        conn.execute(
            "INSERT INTO headswap_versions (tenant, version, manifest, weights, weights_sha256) "
            "VALUES (%s, %s, %s, %b, %s)",
            (tenant, manifest.version, jsonb(manifest.to_json()), weights, manifest.weights_sha256),
        )
