"""Issue 23, item 3: everything serving reads from head.json is sealed with the weights: a label flipped,
swapped or duplicated (still valid JSON) or a field of the wrong type is DATA_LOSS, never served and never
INTERNAL. A manifest written before the seal is checked as before (weights' sha256, field types). Real files
of a real LocalStore; the server runs in process on the fake encoder (fixtures of test_damage.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from headswap.client import AsyncClient, HeadswapError
from headswap.server.config import ServerConfig
from headswap.server.inference.fake import fake_backbone
from headswap.server.manifest import SEAL
from headswap.server.store.check import check_store
from headswap.server.store.local import LocalStore
from headswap.server.testing import in_process
from tests.unit.test_damage import code, store_root, tenant_dir  # noqa: F401 (a fixture)

Edit = Callable[[dict[str, Any]], None]


def flip(m: dict[str, Any]) -> None:
    m["labels"][0] = "ted" if m["labels"][0] != "ted" else "red"


def swap(m: dict[str, Any]) -> None:
    m["labels"].reverse()


def duplicate(m: dict[str, Any]) -> None:
    m["labels"][1] = m["labels"][0]


def labels_a_string(m: dict[str, Any]) -> None:
    m["labels"] = "".join(m["labels"])


def metrics_missing(m: dict[str, Any]) -> None:
    del m["metrics"]


def created_at_a_string(m: dict[str, Any]) -> None:
    m["created_at"] = "yesterday"


def edit_manifest(root: Path, edit: Edit, unsealed: bool = False) -> None:
    path = tenant_dir(root) / "versions" / "2" / "head.json"
    manifest = json.loads(path.read_text())
    assert SEAL in manifest  # written sealed
    if unsealed:
        del manifest[SEAL]  # as written before the seal
    edit(manifest)
    path.write_text(json.dumps(manifest))


async def never_internal(call: object) -> grpc.StatusCode:
    try:
        await call  # type: ignore[misc]
    except HeadswapError as exc:
        assert exc.code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), exc
        return exc.code
    return grpc.StatusCode.OK


@pytest.mark.parametrize(
    "edit", [flip, swap, duplicate, labels_a_string, metrics_missing, created_at_a_string]
)
async def test_a_changed_manifest_is_never_served(store_root: Path, tmp_path: Path, edit: Edit) -> None:  # noqa: F811
    edit_manifest(store_root, edit)
    config = ServerConfig(warmup_rounds=0, home=tmp_path)
    async with in_process(config, backbone=fake_backbone(), store=LocalStore(store_root)) as running:
        async with AsyncClient(running.target, retries=0) as client:
            assert await never_internal(client.classify("broken", ["red word1"])) == grpc.StatusCode.DATA_LOSS
            assert await never_internal(client.get_head("broken")) == grpc.StatusCode.DATA_LOSS
            heads = {h.tenant: h for h in await client.list_heads()}
            assert "head.json" in heads["broken"].problem and heads["healthy"].problem == ""
            assert (await client.classify("broken", ["red word1"], version=1))[0].version == 1
            assert (await client.classify("healthy", ["red word1"]))[0].label == "red"
    assert [f.tenant for f in check_store(store_root)] == ["broken"]


@pytest.mark.parametrize("edit", [duplicate, labels_a_string, metrics_missing, created_at_a_string])
async def test_a_manifest_from_before_the_seal_is_checked_as_before(
    store_root: Path,  # noqa: F811
    tmp_path: Path,
    edit: Edit,
) -> None:
    edit_manifest(store_root, edit, unsealed=True)
    config = ServerConfig(warmup_rounds=0, home=tmp_path)
    async with in_process(config, backbone=fake_backbone(), store=LocalStore(store_root)) as running:
        async with AsyncClient(running.target, retries=0) as client:
            assert await never_internal(client.get_head("broken")) == grpc.StatusCode.DATA_LOSS
            served = await never_internal(client.classify("broken", ["red word1"]))
            assert served in (grpc.StatusCode.OK, grpc.StatusCode.DATA_LOSS)
            if edit in (duplicate, labels_a_string):  # wrong labels are never served
                assert served == grpc.StatusCode.DATA_LOSS


async def test_an_intact_manifest_from_before_the_seal_is_served(store_root: Path, tmp_path: Path) -> None:  # noqa: F811
    edit_manifest(store_root, lambda m: None, unsealed=True)
    config = ServerConfig(warmup_rounds=0, home=tmp_path)
    async with in_process(config, backbone=fake_backbone(), store=LocalStore(store_root)) as running:
        async with AsyncClient(running.target, retries=0) as client:
            assert (await client.classify("broken", ["red word1"]))[0].version == 2
            assert [v.version for v in (await client.get_head("broken")).versions] == [1, 2]
    assert check_store(store_root) == []
