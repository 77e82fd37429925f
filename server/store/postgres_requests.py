"""The PostgreSQL store's AdaptHead request ids (idempotency keys), inserted in the commit's own transaction."""

from __future__ import annotations

from typing import Any

from headswap.server.store.postgres_rows import Connected
from headswap.server.store.postgres_schema import jsonb
from headswap.server.store.requests import REQUESTS_KEPT, AlreadyDone, RequestRecord
from headswap.server.validation import check_tenant


class PostgresRequests(Connected):
    def _check_request(self, conn: Any, tenant: str, request: RequestRecord | None) -> None:
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
        self, conn: Any, tenant: str, request: RequestRecord | None, version: int, active: int
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

    def request_record(self, tenant: str, request_id: str) -> dict[str, Any] | None:
        check_tenant(tenant)
        with self.transaction("read a request id") as conn:
            row = conn.execute(
                "SELECT record FROM headswap_requests WHERE tenant = %s AND request_id = %s",
                (tenant, request_id),
            ).fetchone()
        return dict(row[0]) if row is not None else None
