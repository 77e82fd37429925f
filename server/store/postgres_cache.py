"""The PostgreSQL store's embedding cache: one row per tenant and embedding key, with a checksum per vector."""

from __future__ import annotations

import numpy as np

from headswap.server.store.base import CachedVectors, row_check
from headswap.server.store.postgres_rows import Connected
from headswap.server.validation import check_tenant


class PostgresCache(Connected):
    def fingerprints(self, tenant: str) -> list[str]:
        with self.transaction("list cached embeddings") as conn:
            rows = conn.execute(
                "SELECT fingerprint FROM headswap_embeddings WHERE tenant = %s ORDER BY fingerprint",
                (check_tenant(tenant),),
            ).fetchall()
        return [str(f) for (f,) in rows]

    def cached_embeddings(self, tenant: str, fingerprint: str) -> CachedVectors:
        """As the local store's: rows whose checksum fails are left out and counted in `.dropped` (an entry
        that does not parse, or was written before the checksums, counts once)."""
        query = "SELECT dim, keys, vectors, checks FROM headswap_embeddings WHERE tenant = %s AND fingerprint = %s"
        with self.transaction("read cached embeddings") as conn:
            row = conn.execute(query, (check_tenant(tenant), fingerprint), binary=True).fetchone()
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

    def save_embeddings(self, tenant: str, fingerprint: str, entries: dict[bytes, np.ndarray]) -> None:
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
