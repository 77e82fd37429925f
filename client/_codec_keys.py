"""API keys: requests from Python values, results from replies."""

from __future__ import annotations

import datetime as dt

from headswap.client import results as r
from headswap.client._wire import from_message
from headswap.v1 import headswap_pb2 as pb

_ROLE_CODES = {"tenant": pb.API_KEY_ROLE_TENANT, "admin": pb.API_KEY_ROLE_ADMIN}
_ROLES = {v: k for k, v in _ROLE_CODES.items()}


def create_key_request(role: str, tenant: str | None, name: str, ttl: float | None) -> pb.CreateApiKeyRequest:
    if role not in _ROLE_CODES:
        raise ValueError(f"role must be 'tenant' or 'admin', not {role!r}")
    request = pb.CreateApiKeyRequest(role=_ROLE_CODES[role], tenant=tenant or "", name=name)
    if ttl is not None:
        request.ttl.FromTimedelta(dt.timedelta(seconds=ttl))
    return request


def _time(message: pb.ApiKeyInfo, name: str) -> dt.datetime | None:
    if not message.HasField(name):
        return None
    return getattr(message, name).ToDatetime(tzinfo=dt.UTC)  # type: ignore[no-any-return]


def key_info(k: pb.ApiKeyInfo) -> r.ApiKeyInfo:
    created = _time(k, "created_at")
    assert created is not None, "the server always sets created_at"
    return from_message(
        r.ApiKeyInfo,
        k,
        role=_ROLES.get(k.role, "unknown"),
        tenant=k.tenant or None,
        created_at=created,
        expires_at=_time(k, "expires_at"),
        revoked_at=_time(k, "revoked_at"),
    )


def created_key(reply: pb.CreateApiKeyResponse) -> r.CreatedApiKey:
    return r.CreatedApiKey(reply.key, key_info(reply.info))


def key_infos(reply: pb.ListApiKeysResponse) -> list[r.ApiKeyInfo]:
    return [key_info(k) for k in reply.keys]


def revoked_key(reply: pb.RevokeApiKeyResponse) -> r.ApiKeyInfo:
    return key_info(reply.info)
