"""AdaptHead's idempotency key (`AdaptHeadRequest.request_id`): what a store records with a call's commit,
and the first outcome answered again to a retry of it. The record is committed atomically with what the call
stored (`RequestRecord`, `AlreadyDone` in `store/base.py`), so a retry on any replica, after any crash, finds
it and nothing is trained or stored twice."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import asdict
from typing import Any

from headswap.adapters.gate import GateCheck
from headswap.server.domain import AdaptOutcome, AdaptRequest
from headswap.server.errors import DataLoss, FailedPrecondition, InvalidArgument, NotFound
from headswap.server.services.heads import HeadService, version_info
from headswap.server.store import RequestRecord

log = logging.getLogger("headswap.server.services.training")


def request_digest(tenant: str, request: AdaptRequest) -> str:
    """What identifies an AdaptHead call's content (not its caller or its request id): a retry carries the
    same; another call reusing the id does not."""
    digest = hashlib.sha256()
    settings = [
        tenant,
        dataclasses.asdict(request.options),
        request.replace,
        request.store_only,
        request.force_activate,
        request.backbone,
        len(request.examples),
    ]
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for example in request.examples:
        digest.update(example.input.kind.encode())
        digest.update(example.input.content_key())
        digest.update(hashlib.sha256(example.label.encode("utf-8", "surrogatepass")).digest())
    return digest.hexdigest()


def new_record(
    request: AdaptRequest,
    digest: str,
    activated: bool,
    embedded: int,
    hits: int,
    stored_examples: int,
    held_back_by: str,
    checks: tuple[GateCheck, ...],
) -> RequestRecord | None:
    """What the store keeps of this call with what it stores (None: the caller sent no request id)."""
    if not request.request_id:
        return None
    outcome = {
        "activated": activated,
        "embedded": embedded,
        "cache_hits": hits,
        "stored_examples": stored_examples,
        "held_back_by": held_back_by,
        "checks": [asdict(c) for c in checks],
    }
    return RequestRecord(request.request_id, digest, outcome)


async def replayed(
    heads: HeadService, tenant: str, request: AdaptRequest, digest: str, record: dict[str, Any]
) -> AdaptOutcome:
    """The outcome the first call with this request id had, as the store recorded it in its commit."""
    rid = request.request_id
    if record.get("digest") != digest:
        raise InvalidArgument(
            f"request_id {rid!r} was already used by another AdaptHead call for tenant {tenant!r}, with "
            "other examples or options: a request_id names one call and its retries; send a new one"
        )
    try:
        outcome = record["outcome"]
        version = int(outcome["version"])
        checks = tuple(GateCheck(**c) for c in outcome.get("checks", ()))
        replayed = AdaptOutcome(
            tenant=tenant,
            head=None,
            activated=bool(outcome["activated"]),
            active_version=int(outcome["active_version"]),
            embedded=int(outcome["embedded"]),
            cache_hits=int(outcome["cache_hits"]),
            stored_examples=int(outcome["stored_examples"]),
            held_back_by=str(outcome["held_back_by"]),
            checks=checks,
            replayed=True,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise DataLoss(
            f"tenant {tenant!r}: the record of request_id {rid!r} cannot be read ({exc!r}); send a new "
            "request_id (GetHead shows what is stored)"
        ) from None
    if version:
        try:
            manifest = await heads.run_io(heads.store.manifest, tenant, version)
        except NotFound:
            raise FailedPrecondition(
                f"the AdaptHead call with request_id {rid!r} trained version {version} of tenant "
                f"{tenant!r}, which was deleted since; nothing was trained again: send a new request_id "
                "to train again"
            ) from None
        replayed = dataclasses.replace(replayed, head=version_info(manifest, heads.bank.bindings))
    log.info(
        "tenant %s: AdaptHead request_id %s was done before (%s): its outcome answered again, nothing "
        "stored twice",
        tenant,
        rid,
        f"version {version}" if version else "examples stored",
    )
    return replayed
