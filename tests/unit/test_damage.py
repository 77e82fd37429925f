"""Issue 9.1 and 9.3: one tenant's damaged files never reach another tenant or the server; damage answers
DATA_LOSS with a way out, DeleteHead always works, `headswap store check --repair` mends what it can.
Real files of a real LocalStore are damaged; the server runs in process on the fake encoder."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from headswap.client import AsyncClient, DataLoss, HeadswapError
from headswap.server.config import ServerConfig
from headswap.server.inference.fake import fake_backbone
from headswap.server.store.check import check_store
from headswap.server.store.local import LocalStore
from headswap.server.testing import in_process

TEXTS = [f"{c} word{i} more{i % 3}" for c in ("red", "blue") for i in range(6)]
LABELS = [t.split()[0] for t in TEXTS]


async def train(client: AsyncClient, tenant: str, times: int = 1) -> None:
    for _ in range(times):
        await client.adapt_head(tenant, TEXTS, LABELS, replace=True, validation_fraction=0)


async def seeded(root: Path) -> None:
    """A store with a healthy tenant and the tenant to damage, both with two versions."""
    async with in_process(backbone=fake_backbone(), store=LocalStore(root)) as running:
        async with AsyncClient(running.target, retries=0) as client:
            await train(client, "healthy", 2)
            await train(client, "broken", 2)


@pytest.fixture
async def store_root(tmp_path: Path) -> Path:
    await seeded(tmp_path / "store")
    return tmp_path / "store"


async def code(call: object) -> grpc.StatusCode:
    with pytest.raises(HeadswapError) as info:
        await call  # type: ignore[misc]
    return info.value.code


def tenant_dir(root: Path, tenant: str = "broken") -> Path:
    return root / "tenants" / tenant


def damage_state(root: Path, content: bytes) -> None:
    (tenant_dir(root) / "state.json").write_bytes(content)


def examples_file(root: Path) -> Path:
    return next((tenant_dir(root) / "examples").glob("*.json"))


def damage_examples(root: Path) -> None:
    path = examples_file(root)
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def damage_manifest(root: Path) -> None:
    (tenant_dir(root) / "versions" / "2" / "head.json").write_text("{not json")


def damage_weights(root: Path) -> None:
    path = tenant_dir(root) / "versions" / "2" / "weights.safetensors"
    data = bytearray(path.read_bytes())
    data[-256:] = b"\x7f" * 256  # large floats where the weights were: still parses, wrong answers
    path.write_bytes(bytes(data))


def remove_weights(root: Path) -> None:
    (tenant_dir(root) / "versions" / "2" / "weights.safetensors").unlink()


@pytest.mark.parametrize("content", [b"not json", b"", b"[]", b'{"versions": "x", "active_version": 1}'])
async def test_a_damaged_state_quarantines_one_tenant_only(
    store_root: Path, tmp_path: Path, content: bytes
) -> None:
    damage_state(store_root, content)
    config = ServerConfig(warmup_rounds=0, home=tmp_path)
    store = LocalStore(store_root)  # start-up must not fail
    async with in_process(config, backbone=fake_backbone(), store=store) as running:
        async with AsyncClient(running.target, retries=0) as client:
            assert (await client.classify("healthy", ["red word1"]))[0].label == "red"
            with pytest.raises(DataLoss, match=r"quarantined.*store check --repair"):
                await client.classify("broken", ["red"])
            assert await code(client.get_head("broken")) == grpc.StatusCode.DATA_LOSS
            assert await code(client.adapt_head("broken", TEXTS, LABELS)) == grpc.StatusCode.DATA_LOSS
            assert await code(client.activate_head_version("broken", 1)) == grpc.StatusCode.DATA_LOSS
            heads = {h.tenant: h for h in await client.list_heads()}
            assert heads["healthy"].problem == "" and heads["healthy"].active_version == 2
            assert "state.json" in heads["broken"].problem
            assert running.server.metrics.registry.get_sample_value("headswap_tenants_quarantined") == 1
            deleted = await client.delete_head("broken")
            assert deleted.versions_deleted == 2
            assert [h.tenant for h in await client.list_heads()] == ["healthy"]
            await train(client, "broken")  # the name is free again


async def test_damaged_examples_keep_serving_and_replace_repairs(store_root: Path, tmp_path: Path) -> None:
    damage_examples(store_root)
    async with in_process(
        ServerConfig(warmup_rounds=0, home=tmp_path), backbone=fake_backbone(), store=LocalStore(store_root)
    ) as running:
        async with AsyncClient(running.target, retries=0) as client:
            assert (await client.classify("broken", ["red word1"]))[0].label == "red"  # heads are intact
            assert await code(client.get_head("broken")) == grpc.StatusCode.DATA_LOSS
            assert await code(client.adapt_head("broken", TEXTS[:2], LABELS[:2])) == grpc.StatusCode.DATA_LOSS
            result = await client.adapt_head("broken", TEXTS, LABELS, replace=True, validation_fraction=0)
            assert result.version == 3 and (await client.get_head("broken")).example_count == len(TEXTS)


@pytest.mark.parametrize("damage", [damage_manifest, damage_weights, remove_weights])
async def test_a_damaged_active_version_is_never_served(store_root: Path, tmp_path: Path, damage) -> None:  # type: ignore[no-untyped-def]
    damage(store_root)
    async with in_process(
        ServerConfig(warmup_rounds=0, home=tmp_path), backbone=fake_backbone(), store=LocalStore(store_root)
    ) as running:
        async with AsyncClient(running.target, retries=0) as client:
            with pytest.raises(DataLoss):
                await client.classify("broken", ["red word1"])
            assert (await client.classify("broken", ["red word1"], version=1))[0].version == 1
            heads = {h.tenant: h for h in await client.list_heads()}
            assert heads["healthy"].problem == ""
            if damage is damage_manifest:
                assert "head.json" in heads["broken"].problem
            assert (await client.activate_head_version("broken", 1)).active_version == 1  # the way back
            assert (await client.classify("broken", ["red word1"]))[0].version == 1


def test_store_check_finds_and_repairs(store_root: Path) -> None:
    damage_weights(store_root)
    findings = check_store(store_root)
    assert [(f.tenant, "sha256" in f.problem) for f in findings] == [("broken", True)]
    assert "activate version 1" in findings[0].repair
    check_store(store_root, repair=True)
    assert check_store(store_root) == []
    state = json.loads((tenant_dir(store_root) / "state.json").read_text())
    assert state["versions"] == [1] and state["active_version"] == 1
    damage_state(store_root, b"garbage")
    assert "rebuild" in check_store(store_root)[0].repair
    check_store(store_root, repair=True)
    state = json.loads((tenant_dir(store_root) / "state.json").read_text())
    assert state["versions"] == [1] and state["active_version"] == 0  # none activated by a guess
    assert check_store(store_root) == []


def test_the_examples_name_never_becomes_a_path_outside(store_root: Path) -> None:
    state = json.loads((tenant_dir(store_root) / "state.json").read_text())
    state["examples"] = "../../../../etc/passwd"
    (tenant_dir(store_root) / "state.json").write_text(json.dumps(state))
    store = LocalStore(store_root)
    with pytest.raises(Exception, match="quarantined"):
        store.examples("broken")
