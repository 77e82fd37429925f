"""AdaptHead idempotency keys as a store keeps them: recorded in the commit of what the call stored, so a
retry is answered with the first outcome (services/replay.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

REQUESTS_KEPT = 64  # a tenant's newest AdaptHead request ids a store remembers


@dataclass(frozen=True)
class RequestRecord:
    """An AdaptHead call's idempotency key (`request_id`, sent by the client), stored atomically with what the
    call stored (a version, or examples), so that a retry of the call, on any replica and after any crash,
    finds it and is answered with the first outcome instead of storing anything twice. `digest` identifies the
    call's content (the same id with other content is the caller's mistake); `outcome` is what it answered,
    as JSON, to which the store adds "version" (the number it gave; 0 for examples alone) and
    "active_version". A store keeps a tenant's newest `REQUESTS_KEPT` records; a deletion removes them."""

    request_id: str
    digest: str
    outcome: dict[str, Any]

    def to_json(self, version: int, active_version: int) -> dict[str, Any]:
        return {
            "id": self.request_id,
            "digest": self.digest,
            "outcome": {**self.outcome, "version": version, "active_version": active_version},
        }


class AlreadyDone(Exception):
    """Raised by a commit whose request id the tenant already has: nothing was stored, `record` (as
    `RequestRecord.to_json` wrote it) says what the first call stored and answered."""

    def __init__(self, record: dict[str, Any]) -> None:
        super().__init__(f"request {record.get('id')!r} was already done")
        self.record = record


def find_request(records: Any, request_id: str) -> dict[str, Any] | None:
    """The record of `request_id` among a store's records (a list of `to_json` dicts), or None."""
    if not isinstance(records, list):
        return None
    for record in records:
        if isinstance(record, dict) and record.get("id") == request_id:
            return record
    return None


def with_request(records: Any, record: dict[str, Any] | None) -> list[dict[str, Any]]:
    """`records` with `record` added last, keeping the newest `REQUESTS_KEPT`."""
    kept = [r for r in records if isinstance(r, dict)] if isinstance(records, list) else []
    if record is not None:
        kept.append(record)
    return kept[-REQUESTS_KEPT:]
