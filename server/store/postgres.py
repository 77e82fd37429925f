"""The PostgreSQL store: one database shared by every replica (psycopg 3, a connection pool, bytea in
binary mode).

A commit locks the tenant's row (`SELECT ... FOR UPDATE`), so two replicas training one tenant get distinct
version numbers; then it takes the next change sequence number, moves the pointer, records the change and
NOTIFYs, all in one transaction. Each replica keeps one listening connection (`postgres_listener.py`) that
reads every change after the last it applied and publishes it on the store's feed, so every head bank
reconciles through the same path as local swaps, within a second, and catches up after a reconnect. When
PostgreSQL cannot be reached, calls that need it answer UNAVAILABLE; heads already in memory keep serving.
Versions, the pointer (its rules: pointer.py) and examples are here; transactions and the change log in
postgres_rows.py; request ids, `store copy`'s restore, the embedding cache and API keys each in their module.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from typing import Any

from headswap.server.domain import Deletion, Example
from headswap.server.manifest import HeadManifest
from headswap.server.store import pointer
from headswap.server.store.base import (
    Change,
    NewExamples,
    NewVersion,
    RestoringStore,
    StoredVersion,
    TenantState,
    check_expected,
    example_from_json,
    example_to_json,
    no_head,
    verify_weights,
    weights_digest,
)
from headswap.server.store.faults import crash_point
from headswap.server.store.postgres_cache import PostgresCache
from headswap.server.store.postgres_keys import PostgresKeys
from headswap.server.store.postgres_requests import PostgresRequests
from headswap.server.store.postgres_restore import PostgresRestore
from headswap.server.store.postgres_schema import MIGRATIONS, current_version, migrate, one, redact
from headswap.server.validation import check_tenant

log = logging.getLogger(__name__)


class PostgresStore(PostgresRequests, PostgresRestore, PostgresCache, PostgresKeys, RestoringStore):
    def __init__(
        self, url: str, max_versions: int = 50, migrate_schema: bool = False, listen: bool = True
    ) -> None:
        from headswap.server.store.postgres_pool import BoundedPool

        super().__init__(max_versions)
        self.url = url
        self.where = redact(url)
        # Reconnection attempts at most 0.25 s apart: writes are back within 2 s of the database.
        self._pool = BoundedPool(
            url,
            min_size=1,
            max_size=8,
            timeout=3.0,  # waiting for a connection: past it, UNAVAILABLE
            kwargs={"autocommit": True},
            open=False,
            name="headswap-store",
            # A connection is checked when it is handed out, so one that died with a PostgreSQL restart is
            # replaced instead of failing a call (the pool's own check, an empty query, let dead ones through).
            check=_alive,
        )
        with self._reachable("open the store"):
            self._pool.open(wait=True, timeout=10.0)
            with self._pool.connection() as conn:
                if migrate_schema:
                    migrate(conn)
                found = current_version(conn)
                last = one(conn, "SELECT coalesce(max(seq), 0) FROM headswap_changes") if found else 0
        if found != len(MIGRATIONS):
            self._pool.close()
            raise RuntimeError(
                f"the store at {self.where} has schema version {found}, this server needs {len(MIGRATIONS)}: run "
                "`headswap store migrate --store URL` or start the server with --store-migrate"
            )
        self.listener = None
        if listen:
            from headswap.server.store.postgres_listener import Listener

            self.listener = Listener(url, self.where, self.feed, int(last))
            self.listener.start()

    def close(self) -> None:
        if self.listener is not None:
            self.listener.stop()
        self._pool.close()

    def _state(self, conn: Any, tenant: str, lock: bool = False) -> tuple[TenantState, int | None]:
        row = conn.execute(
            "SELECT active_version, previous_version, seq, examples_id FROM headswap_tenants WHERE tenant = %s"
            + (" FOR UPDATE" if lock else ""),
            (check_tenant(tenant),),
        ).fetchone()
        if row is None:
            raise no_head(tenant)
        versions = tuple(
            int(v)
            for (v,) in conn.execute(
                "SELECT version FROM headswap_versions WHERE tenant = %s ORDER BY version", (tenant,)
            )
        )
        return TenantState(tenant, int(row[0]), versions, int(row[2]), int(row[1])), row[3]

    # -- reading -----------------------------------------------------------------------------------------

    def tenants(self) -> list[str]:
        with self.transaction("list tenants") as conn:
            return [t for (t,) in conn.execute("SELECT tenant FROM headswap_tenants ORDER BY tenant")]

    def state(self, tenant: str) -> TenantState:
        with self.transaction("read a tenant") as conn:
            return self._state(conn, tenant)[0]

    def manifest(self, tenant: str, version: int) -> HeadManifest:
        with self.transaction("read a head") as conn:
            row = conn.execute(
                "SELECT manifest FROM headswap_versions WHERE tenant = %s AND version = %s",
                (check_tenant(tenant), version),
            ).fetchone()
            if row is None:
                self._state(conn, tenant)[0].require(version)
        return self.checked_manifest(tenant, version, row[0])

    def load_version(self, tenant: str, version: int) -> StoredVersion:
        with self.transaction("read a head") as conn:
            row = conn.execute(
                "SELECT manifest, weights FROM headswap_versions WHERE tenant = %s AND version = %s",
                (check_tenant(tenant), version),
                binary=True,
            ).fetchone()
            if row is None:
                self._state(conn, tenant)[0].require(version)
        manifest, weights = self.checked_manifest(tenant, version, row[0]), bytes(row[1])
        try:
            verify_weights(tenant, version, manifest.weights_sha256, weights)
        except Exception:
            self.damaged[tenant] = f"version {version}'s weights do not match their recorded sha256"
            raise
        return StoredVersion(version, manifest, weights)

    def examples(self, tenant: str) -> list[Example]:
        with self.transaction("read examples") as conn:
            row = conn.execute(
                "SELECT e.examples FROM headswap_tenants t JOIN headswap_example_sets e ON e.id = t.examples_id "
                "WHERE t.tenant = %s",
                (check_tenant(tenant),),
            ).fetchone()
        return [example_from_json(e) for e in row[0]] if row else []

    # -- writing -----------------------------------------------------------------------------------------

    def commit_version(self, tenant: str, new: NewVersion) -> TenantState:
        check_tenant(tenant)
        sha = weights_digest(new.weights)
        examples = [example_to_json(e) for e in new.examples]
        examples_sha = hashlib.sha256(json.dumps(examples, sort_keys=True).encode()).hexdigest()
        with self.transaction("store a new head version") as conn:
            created = conn.execute(
                "INSERT INTO headswap_tenants (tenant) VALUES (%s) ON CONFLICT DO NOTHING", (tenant,)
            ).rowcount
            # Rolled back with the row just inserted: a training that outlived a DeleteHead brings nothing back.
            # (Only a deletion is refused: replicas may train one tenant at once, each getting its version.)
            check_expected(TenantState(tenant, 0, (), 0 if created else new.expect_seq or 0), new.expect_seq)
            row = conn.execute(
                "SELECT t.active_version, t.previous_version, t.next_version, t.examples_id, e.examples "
                "FROM headswap_tenants t LEFT JOIN headswap_example_sets e ON e.id = t.examples_id "
                "WHERE t.tenant = %s FOR UPDATE OF t",
                (tenant,),
            ).fetchone()
            active, previous, version, examples_id, current_examples = row
            self._check_request(conn, tenant, new.request)
            self.insert_version(conn, tenant, new.manifest.committed(version, sha), new.weights)
            if (
                current_examples is None
                or hashlib.sha256(json.dumps(current_examples, sort_keys=True).encode()).hexdigest()
                != examples_sha
            ):
                examples_id = self.replace_examples(conn, tenant, examples)
            seq = self.tick(conn)
            pointed = pointer.committed(
                TenantState(tenant, active, (), seq, previous), version, new.activate, seq
            )
            active, previous = pointed.active_version, pointed.previous_version
            conn.execute(
                "UPDATE headswap_tenants SET active_version = %s, previous_version = %s, next_version = %s, "
                "examples_id = %s, seq = %s, updated_at = now() WHERE tenant = %s",
                (active, previous, version + 1, examples_id, seq, tenant),
            )
            state, _ = self._state(conn, tenant)
            kept = pointer.retained(state, self.max_versions)
            if kept != state:
                conn.execute(
                    "DELETE FROM headswap_versions WHERE tenant = %s AND NOT (version = ANY(%s))",
                    (tenant, list(kept.versions)),
                )
                state = kept
            active_sha = sha if active == version else self._sha(conn, tenant, active)
            self.record_change(conn, Change(tenant, active, seq, weights_sha256=active_sha))
            self._record_request(conn, tenant, new.request, version, active)
        crash_point("state-written")
        self.damaged.pop(tenant, None)
        return state

    def commit_examples(self, tenant: str, new: NewExamples) -> TenantState:
        check_tenant(tenant)
        expect_seq, request = new.expect_seq, new.request
        rows = [example_to_json(e) for e in new.examples]
        with self.transaction("store examples") as conn:
            created = conn.execute(
                "INSERT INTO headswap_tenants (tenant) VALUES (%s) ON CONFLICT DO NOTHING", (tenant,)
            ).rowcount
            check_expected(TenantState(tenant, 0, (), 0 if created else expect_seq or 0), expect_seq)
            conn.execute("SELECT 1 FROM headswap_tenants WHERE tenant = %s FOR UPDATE", (tenant,))
            self._check_request(conn, tenant, request)
            examples_id = self.replace_examples(conn, tenant, rows)
            conn.execute(
                "UPDATE headswap_tenants SET examples_id = %s, updated_at = now() WHERE tenant = %s",
                (examples_id, tenant),
            )
            state = self._state(conn, tenant)[0]
            self._record_request(conn, tenant, request, 0, state.active_version)
        crash_point("state-written")
        return state

    def last_version(self, tenant: str) -> int:
        with self.transaction("read a tenant") as conn:
            row = conn.execute(
                "SELECT next_version FROM headswap_tenants WHERE tenant = %s", (check_tenant(tenant),)
            ).fetchone()
        if row is None:
            raise no_head(tenant)
        return int(row[0]) - 1

    def _sha(self, conn: Any, tenant: str, version: int) -> str:
        row = conn.execute(
            "SELECT weights_sha256 FROM headswap_versions WHERE tenant = %s AND version = %s",
            (tenant, version),
        ).fetchone()
        return str(row[0]) if row else ""

    def activate(self, tenant: str, version: int) -> tuple[TenantState, int]:
        with self.transaction("activate a head version") as conn:
            state, _ = self._state(conn, tenant, lock=True)
            state.require(version)
            row = conn.execute(
                "SELECT manifest, weights FROM headswap_versions WHERE tenant = %s AND version = %s",
                (tenant, version),
                binary=True,
            ).fetchone()
            # Never point at damaged weights.
            verify_weights(tenant, version, dict(row[0]).get("weights_sha256"), bytes(row[1]))
            updated = pointer.activated(state, version, self.tick(conn))
            conn.execute(
                "UPDATE headswap_tenants SET active_version = %s, previous_version = %s, seq = %s, updated_at = now() "
                "WHERE tenant = %s",
                (version, updated.previous_version, updated.seq, tenant),
            )
            self.record_change(
                conn, Change(tenant, version, updated.seq, weights_sha256=weights_digest(bytes(row[1])))
            )
        return updated, state.active_version

    def delete_version(self, tenant: str, version: int) -> TenantState:
        with self.transaction("delete a head version") as conn:
            state, _ = self._state(conn, tenant, lock=True)
            updated = pointer.without_version(state, version, self.tick(conn))
            conn.execute(
                "DELETE FROM headswap_versions WHERE tenant = %s AND version = %s", (tenant, version)
            )
            conn.execute(
                "UPDATE headswap_tenants SET previous_version = %s, seq = %s, updated_at = now() WHERE tenant = %s",
                (updated.previous_version, updated.seq, tenant),
            )
            # Recorded like a swap to the same version: every replica drops what it holds of the tenant's
            # other versions, so the deleted one is refused everywhere (even when asked for by number).
            active = state.active_version
            self.record_change(
                conn, Change(tenant, active, updated.seq, weights_sha256=self._sha(conn, tenant, active))
            )
        return updated

    def delete(self, tenant: str) -> tuple[Deletion, Change]:
        with self.transaction("delete a tenant") as conn:
            state, _ = self._state(conn, tenant, lock=True)
            examples = len(self._examples_in(conn, tenant))
            conn.execute("DELETE FROM headswap_tenants WHERE tenant = %s", (tenant,))
            conn.execute("DELETE FROM headswap_embeddings WHERE tenant = %s", (tenant,))
            change = Change(tenant, 0, self.tick(conn), deleted=True)
            self.record_change(conn, change)
        self.damaged.pop(tenant, None)
        return Deletion(tenant, len(state.versions), examples), change

    def _examples_in(self, conn: Any, tenant: str) -> Sequence[Any]:
        row = conn.execute(
            "SELECT e.examples FROM headswap_tenants t JOIN headswap_example_sets e ON e.id = t.examples_id WHERE t.tenant = %s",
            (tenant,),
        ).fetchone()
        return row[0] if row else []


def open_postgres(url: str, max_versions: int, migrate_schema: bool) -> PostgresStore:
    store = PostgresStore(url, max_versions=max_versions, migrate_schema=migrate_schema)
    log.info("store: PostgreSQL at %s", store.where)
    return store


def _alive(conn: Any) -> None:
    conn.execute("SELECT 1").fetchone()


__all__ = ["PostgresStore", "open_postgres"]
