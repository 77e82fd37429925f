"""Issue 11: tenants cannot touch each other. The whole matrix of credentials x RPCs over real gRPC, in
process on the fake encoder (tests/integration/test_auth_tls.py does restart, TLS, grpcurl and leaks on the
real server)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from headswap.client import AsyncClient, HeadswapError, PermissionDenied, Unauthenticated
from headswap.server import keys
from headswap.server.config import AuthConfig, ServerConfig
from headswap.server.inference.fake import fake_backbone
from headswap.server.store.memory import MemoryStore
from headswap.server.testing import InProcess, in_process

PEPPER = "an-unguessable-pepper-for-tests-only"
TEXTS = [f"{c} w{i}" for c in ("red", "blue") for i in range(5)]
LABELS = [t.split()[0] for t in TEXTS]
OK, DENIED, NO = "ok", grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[tuple[InProcess, dict[str, str]]]:
    config = replace(
        ServerConfig(warmup_rounds=0, home=tmp_path), auth=AuthConfig(mode="keys", pepper=PEPPER)
    )
    store = MemoryStore()
    pepper = PEPPER.encode()
    creds: dict[str, str] = {}
    for name, role, tenant in (
        ("admin", "admin", None),
        ("a", "tenant", "tenant-a"),
        ("b", "tenant", "tenant-b"),
    ):
        creds[name], record = keys.new_key(pepper, role, tenant)
        store.put_key(record)
    creds["revoked"], record = keys.new_key(pepper, "tenant", "tenant-a")
    store.put_key(replace(record, revoked_at=time.time() - 1))
    creds["expired"], record = keys.new_key(pepper, "tenant", "tenant-a", expires_at=time.time() - 1)
    store.put_key(record)
    creds["unknown"], _ = keys.new_key(pepper, "admin", None)  # well formed, never stored
    creds["malformed"] = "hsk_not-a-key"
    async with in_process(config, backbone=fake_backbone(), store=store) as running:
        async with AsyncClient(running.target, api_key=creds["admin"], retries=0) as admin:
            for tenant in ("tenant-a", "tenant-b"):
                await admin.adapt_head(tenant, TEXTS, LABELS, validation_fraction=0)
                await admin.adapt_head(tenant, TEXTS, LABELS, validation_fraction=0)
        yield running, creds


async def outcome(call: Awaitable[Any]) -> object:
    """OK, or the status code as it came: an allowed call must do what it does for any caller (a refusal
    for bad data is fine, INTERNAL or UNKNOWN never is)."""
    try:
        await call
    except HeadswapError as exc:
        return exc.code
    return OK


CallOf = Callable[[AsyncClient], Awaitable[Any]]
# Every RPC, aimed at tenant-a's data (or none): what each credential must get.
RPCS: dict[str, CallOf] = {
    "Embed": lambda c: c.embed(["red w1"]),
    "AdaptHead": lambda c: c.adapt_head("tenant-a", TEXTS, LABELS, validation_fraction=0),
    "Classify": lambda c: c.classify("tenant-a", ["red w1"]),
    "ListHeads": lambda c: c.list_heads(),
    "GetHead": lambda c: c.get_head("tenant-a"),
    "ActivateHeadVersion": lambda c: c.activate_head_version("tenant-a", 2),
    "DeleteHeadVersion": lambda c: c.delete_head_version("tenant-a", 99),
    "DeleteHead": lambda c: c.delete_head("tenant-gone"),
    "CreateApiKey": lambda c: c.create_api_key("tenant", "tenant-c"),
    "ListApiKeys": lambda c: c.list_api_keys(),
    "RevokeApiKey": lambda c: c.revoke_api_key("0" * 16),
}
# What an allowed caller gets from each call above: the data asked for is not there.
WHEN_ALLOWED: dict[str, object] = {
    "DeleteHeadVersion": grpc.StatusCode.NOT_FOUND,  # tenant-a has no version 99
    "DeleteHead": grpc.StatusCode.NOT_FOUND,  # no tenant-gone
    "RevokeApiKey": grpc.StatusCode.NOT_FOUND,  # no such key
}
ADMIN_ONLY = {"CreateApiKey", "ListApiKeys", "RevokeApiKey"}
OPEN_TO_ANY_KEY = {"Embed", "ListHeads"}


def expected(credential: str, rpc: str) -> object:
    if credential in ("none", "malformed", "unknown", "revoked", "expired"):
        return NO
    allowed = WHEN_ALLOWED.get(rpc, OK)
    if credential == "admin":
        return allowed
    if rpc in ADMIN_ONLY:
        return DENIED
    if rpc in OPEN_TO_ANY_KEY or credential == "a":
        return allowed if rpc != "DeleteHead" else DENIED  # tenant-gone is not tenant-a
    return DENIED  # tenant-b's key, tenant-a's data


async def test_every_credential_on_every_rpc(server: tuple[InProcess, dict[str, str]]) -> None:
    running, creds = server
    got: dict[tuple[str, str], object] = {}
    for credential in ("none", "malformed", "unknown", "revoked", "expired", "b", "a", "admin"):
        key = creds.get(credential, "")
        async with AsyncClient(running.target, api_key=key, retries=0) as client:
            for rpc, call in RPCS.items():
                got[(credential, rpc)] = await outcome(call(client))
    wrong = {cell: value for cell, value in got.items() if value != expected(*cell)}
    assert wrong == {}, wrong
    failures = running.server.metrics.registry
    for reason in ("missing", "malformed", "unknown", "revoked", "expired"):
        assert failures.get_sample_value("headswap_auth_failures_total", {"reason": reason}) == len(RPCS)


async def test_a_tenant_key_acts_for_its_own_tenant_only(server: tuple[InProcess, dict[str, str]]) -> None:
    running, creds = server
    async with AsyncClient(running.target, api_key=creds["a"], retries=0) as client:
        assert (await client.classify("", ["red w1"]))[0].label == "red"  # the tenant comes from the key
        assert [h.tenant for h in await client.list_heads()] == ["tenant-a"]
        for other in ("tenant-b", "nobody-at-all"):  # the same answer whether or not it exists
            with pytest.raises(PermissionDenied) as info:
                await client.get_head(other)
            assert other not in info.value.details and "tenant-b" not in info.value.details
        result = await client.adapt_head("", TEXTS, LABELS, validation_fraction=0)
        assert result.tenant == "tenant-a"


async def test_keys_are_managed_by_admins_and_revocation_is_immediate(
    server: tuple[InProcess, dict[str, str]],
) -> None:
    running, creds = server
    async with AsyncClient(running.target, api_key=creds["admin"], retries=0) as admin:
        created = await admin.create_api_key("tenant", "tenant-b", name="ci", ttl=3600)
        assert created.key.startswith(f"hsk_{created.info.id}_") and created.info.tenant == "tenant-b"
        assert created.info.expires_at is not None
        listed = {k.id: k for k in await admin.list_api_keys()}
        assert created.info.id in listed and all(not hasattr(k, "key") for k in listed.values())
        async with AsyncClient(running.target, api_key=created.key, retries=0) as tenant_b:
            assert (await tenant_b.classify("tenant-b", ["blue w1"]))[0].label == "blue"
            revoked = await admin.revoke_api_key(created.info.id)
            assert revoked.revoked_at is not None
            with pytest.raises(Unauthenticated, match="revoked"):
                await tenant_b.classify("tenant-b", ["blue w1"])
        with pytest.raises(HeadswapError) as info:
            await admin.create_api_key("tenant", "../etc")
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


async def test_health_stays_open(server: tuple[InProcess, dict[str, str]]) -> None:
    running, _ = server
    async with grpc.aio.insecure_channel(running.target) as channel:
        from headswap.client import _health

        stub = channel.unary_unary("/grpc.health.v1.Health/Check")
        assert _health._decode_status(await stub(_health._encode_request(""), timeout=5)) == "SERVING"


async def test_a_ttl_out_of_range_is_invalid_not_internal(server: tuple[InProcess, dict[str, str]]) -> None:
    """Found by the fuzz test: a Duration past Python's timedelta overflowed (INTERNAL), and one of 10,000 years
    was stored, then failed every reply that shows its expiry."""
    from google.protobuf.duration_pb2 import Duration

    from headswap.v1 import headswap_pb2 as pb
    from headswap.v1 import headswap_pb2_grpc as pb_grpc

    running, creds = server
    async with grpc.aio.insecure_channel(running.target) as channel:
        stub = pb_grpc.HeadswapServiceStub(channel)
        metadata = (("authorization", f"Bearer {creds['admin']}"),)
        for seconds in (-86399999913601, 0, 315576000000):
            request = pb.CreateApiKeyRequest(
                role=pb.API_KEY_ROLE_TENANT, tenant="tenant-a", ttl=Duration(seconds=seconds)
            )
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.CreateApiKey(request, metadata=metadata)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (seconds, info.value.details())
        listed = await stub.ListApiKeys(pb.ListApiKeysRequest(), metadata=metadata)
        assert len(listed.keys) == 5  # those of the fixture: nothing was stored
