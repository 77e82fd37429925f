"""The PostgreSQL store's embedding cache, API keys and AdaptHead request ids, as a mixin of `PostgresStore` (which provides
`transaction`, `tick` and `record_change`)."""

from __future__ import annotations

import contextlib
from typing import Any, Protocol

import numpy as np

from headswap.server.keys import ApiKey
from headswap.server.manifest import HeadManifest
from headswap.server.store.base import (
    CachedVectors,
    Change,
    TenantCopy,
    example_to_json,
    no_key,
    row_check,
    weights_digest,
)
from headswap.server.store.postgres_schema import jsonb
from headswap.server.store.requests import REQUESTS_KEPT, AlreadyDone, RequestRecord
from headswap.server.validation import check_tenant


class _Store(Protocol):
    """What the mixin's methods use of PostgresStore."""

    _KEY_COLUMNS: str

    def transaction(self, what: str) -> contextlib.AbstractContextManager[Any]: ...

    def tick(self, conn: Any) -> int: ...

    def record_change(self, conn: Any, change: Change) -> None: ...

    def insert_version(self, conn: Any, tenant: str, manifest: HeadManifest, weights: bytes) -> None: ...

    def _replace_examples(self, conn: Any, tenant: str, rows: list[dict[str, str]]) -> int: ...


class PostgresExtras:
    # -- AdaptHead request ids (idempotency keys), inserted in the commit's own transaction ------------

    def _check_request(self: _Store, conn: Any, tenant: str, request: RequestRecord | None) -> None:
        """Under the tenant's row lock: a request id already recorded is a call already done. (Two replicas
        committing one request at once take the lock in turn; the second sees the first's row.)"""
        if request is None:
            return
        row = conn.execute(
            "SELECT record FROM headswap_requests WHERE tenant = %s AND request_id = %s",
            (tenant, request.request_id),
        ).fetchone()
        if row is not None:
            raise AlreadyDone(dict(row[0]))

    def _record_request(
        self: _Store, conn: Any, tenant: str, request: RequestRecord | None, version: int, active: int
    ) -> None:
        if request is None:
            return
        conn.execute(
            "INSERT INTO headswap_requests (tenant, request_id, record) VALUES (%s, %s, %s)",
            (tenant, request.request_id, jsonb(request.to_json(version, active))),
        )
        conn.execute(
            "DELETE FROM headswap_requests WHERE tenant = %s AND request_id NOT IN (SELECT request_id FROM "
            "headswap_requests WHERE tenant = %s ORDER BY at DESC LIMIT %s)",
            (tenant, tenant, REQUESTS_KEPT),
        )

    def request_record(self: _Store, tenant: str, request_id: str) -> dict[str, Any] | None:
        check_tenant(tenant)
        with self.transaction("read a request id") as conn:
            row = conn.execute(
                "SELECT record FROM headswap_requests WHERE tenant = %s AND request_id = %s",
                (tenant, request_id),
            ).fetchone()
        return dict(row[0]) if row is not None else None

    # -- `headswap store copy`'s target ------------------------------------------------------------------

    def restore(self: _Store, tenant: str, copied: TenantCopy) -> dict[int, str]:
        """Store a whole tenant with its version numbers, in one transaction, unless the tenant is here already;
        returns the weights' sha256 of the versions that were here (empty: restored)."""
        with self.transaction("copy a tenant") as conn:
            existing = {
                int(v): str(sha)
                for v, sha in conn.execute(
                    "SELECT version, weights_sha256 FROM headswap_versions WHERE tenant = %s", (tenant,)
                )
            }
            if existing:
                return existing
            conn.execute(
                "INSERT INTO headswap_tenants (tenant, next_version) VALUES (%s, %s)",
                (tenant, copied.last_version + 1),  # numbers given out before are never reused
            )
            examples_id = self._replace_examples(conn, tenant, [example_to_json(e) for e in copied.examples])
            shas = {v.version: weights_digest(v.weights) for v in copied.versions}
            for v in copied.versions:
                self.insert_version(conn, tenant, v.manifest.committed(v.version, shas[v.version]), v.weights)
            state, seq = copied.state, self.tick(conn)
            conn.execute(
                "UPDATE headswap_tenants SET active_version = %s, previous_version = %s, examples_id = %s, "
                "seq = %s WHERE tenant = %s",
                (state.active_version, state.previous_version, examples_id, seq, tenant),
            )
            active_sha = shas.get(state.active_version, "")
            self.record_change(conn, Change(tenant, state.active_version, seq, weights_sha256=active_sha))
        return {}

    # -- the embedding cache -----------------------------------------------------------------------------

    def fingerprints(self: _Store, tenant: str) -> list[str]:
        with self.transaction("list cached embeddings") as conn:
            rows = conn.execute(
                "SELECT fingerprint FROM headswap_embeddings WHERE tenant = %s ORDER BY fingerprint",
                (check_tenant(tenant),),
            ).fetchall()
        return [str(f) for (f,) in rows]

    def cached_embeddings(self: _Store, tenant: str, fingerprint: str) -> CachedVectors:
        """As the local store's: rows whose checksum fails are left out and counted in `.dropped` (an entry
        that does not parse, or was written before the checksums, counts once)."""
        with self.transaction("read cached embeddings") as conn:
            row = conn.execute(
                "SELECT dim, keys, vectors, checks FROM headswap_embeddings WHERE tenant = %s AND fingerprint = %s",
                (check_tenant(tenant), fingerprint),
                binary=True,
            ).fetchone()
        if row is None:
            return CachedVectors()
        if row[3] is None:
            return CachedVectors(dropped=1)
        dim, keys, vectors = int(row[0]), bytes(row[1]), np.frombuffer(bytes(row[2]), dtype="<f4")
        checks = bytes(row[3])
        n = len(keys) // 32
        if n * 32 != len(keys) or vectors.size != n * dim or len(checks) != n * 32:
            return CachedVectors(dropped=1)  # a cache: a damaged entry costs time, never correctness
        matrix = vectors.reshape(n, dim)
        found = CachedVectors()
        for i in range(n):
            key = keys[i * 32 : (i + 1) * 32]
            if row_check(key, matrix[i]) == checks[i * 32 : (i + 1) * 32]:
                found[key] = matrix[i]
            else:
                found.dropped += 1
        return found

    def save_embeddings(
        self: _Store, tenant: str, fingerprint: str, entries: dict[bytes, np.ndarray]
    ) -> None:
        if not entries:
            return
        vectors = np.stack(list(entries.values())).astype("<f4")
        checks = b"".join(row_check(k, v) for k, v in zip(entries, vectors, strict=True))
        with self.transaction("save cached embeddings") as conn:
            conn.execute(
                "INSERT INTO headswap_embeddings (tenant, fingerprint, dim, keys, vectors, checks) "
                "VALUES (%s, %s, %s, %b, %b, %b) "
                "ON CONFLICT (tenant, fingerprint) DO UPDATE SET dim = EXCLUDED.dim, keys = EXCLUDED.keys, "
                "vectors = EXCLUDED.vectors, checks = EXCLUDED.checks",
                (
                    check_tenant(tenant),
                    fingerprint,
                    vectors.shape[1],
                    b"".join(entries),
                    vectors.tobytes(),
                    checks,
                ),
            )

    # -- API keys ----------------------------------------------------------------------------------------

    _KEY_COLUMNS = "id, role, tenant, digest, created_at, expires_at, revoked_at, name"

    def put_key(self: _Store, key: ApiKey) -> None:
        with self.transaction("store an API key") as conn:
            conn.execute(
                f"INSERT INTO headswap_api_keys ({self._KEY_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    key.id,
                    key.role,
                    key.tenant,
                    key.digest,
                    key.created_at,
                    key.expires_at,
                    key.revoked_at,
                    key.name,
                ),
            )

    def get_key(self: _Store, key_id: str) -> ApiKey | None:
        with self.transaction("read an API key") as conn:
            row = conn.execute(
                f"SELECT {self._KEY_COLUMNS} FROM headswap_api_keys WHERE id = %s", (key_id,)
            ).fetchone()
        return ApiKey(*row) if row else None

    def list_keys(self: _Store) -> list[ApiKey]:
        with self.transaction("list API keys") as conn:
            rows = conn.execute(
                f"SELECT {self._KEY_COLUMNS} FROM headswap_api_keys ORDER BY created_at"
            ).fetchall()
        return [ApiKey(*row) for row in rows]

    def revoke_key(self: _Store, key_id: str, at: float) -> ApiKey:
        with self.transaction("revoke an API key") as conn:
            row = conn.execute(
                f"UPDATE headswap_api_keys SET revoked_at = coalesce(revoked_at, %s) WHERE id = %s "
                f"RETURNING {self._KEY_COLUMNS}",
                (at, key_id),
            ).fetchone()
            if row is None:
                raise no_key(key_id)
            self.record_change(conn, Change("", 0, self.tick(conn), key_id=key_id))
        return ApiKey(*row)
