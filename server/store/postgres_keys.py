"""The PostgreSQL store's API keys (only their HMACs: see headswap.server.keys)."""

from __future__ import annotations

from headswap.server.keys import ApiKey
from headswap.server.store.base import Change, no_key
from headswap.server.store.postgres_rows import Connected


class PostgresKeys(Connected):
    _KEY_COLUMNS = "id, role, tenant, digest, created_at, expires_at, revoked_at, name"

    def put_key(self, key: ApiKey) -> None:
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

    def get_key(self, key_id: str) -> ApiKey | None:
        with self.transaction("read an API key") as conn:
            row = conn.execute(
                f"SELECT {self._KEY_COLUMNS} FROM headswap_api_keys WHERE id = %s", (key_id,)
            ).fetchone()
        return ApiKey(*row) if row else None

    def list_keys(self) -> list[ApiKey]:
        with self.transaction("list API keys") as conn:
            rows = conn.execute(
                f"SELECT {self._KEY_COLUMNS} FROM headswap_api_keys ORDER BY created_at"
            ).fetchall()
        return [ApiKey(*row) for row in rows]

    def revoke_key(self, key_id: str, at: float) -> ApiKey:
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
