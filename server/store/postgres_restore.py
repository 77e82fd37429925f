"""`headswap store copy`'s target: a whole tenant restored into the PostgreSQL store (store/copy.py)."""

from __future__ import annotations

from headswap.server.store.base import Change, TenantCopy, example_to_json, weights_digest
from headswap.server.store.postgres_rows import Connected


class PostgresRestore(Connected):
    def restore(self, tenant: str, copied: TenantCopy) -> dict[int, str]:
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
            examples_id = self.replace_examples(conn, tenant, [example_to_json(e) for e in copied.examples])
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
