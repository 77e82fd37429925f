"""Issue 23, item 3: a lost or wrong pointer is damage to report and quarantine, never a reason to delete data.
A missing state.json never wipes the tenant at start-up; `headswap store check` without --repair changes
nothing and exits nonzero; a state.json naming an absent active version does not hide the tenant. Real files
of a real LocalStore; the server runs in process on the fake encoder (fixtures of test_damage.py)."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import grpc
import pytest

from headswap.client import AsyncClient
from headswap.server.cli import run_store_check
from headswap.server.config import ServerConfig
from headswap.server.domain import Example, Input
from headswap.server.errors import DataLoss, NotFound
from headswap.server.inference.fake import fake_backbone
from headswap.server.store.base import NewExamples
from headswap.server.store.check import check_store
from headswap.server.store.local import LocalStore
from headswap.server.testing import in_process
from tests.unit.test_damage import code, store_root, tenant_dir  # noqa: F401 (a fixture)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def check_cli(root: Path, repair: bool = False) -> int:
    return run_store_check(argparse.Namespace(store=str(root), repair=repair))


async def test_a_missing_state_never_wipes_the_tenant(store_root: Path, tmp_path: Path) -> None:  # noqa: F811
    (tenant_dir(store_root) / "state.json").unlink()
    before = snapshot(store_root)

    # A check without --repair reports it, exits nonzero, and changes nothing.
    findings = check_store(store_root)
    assert [(f.tenant, f.problem) for f in findings] == [("broken", "state.json is missing")]
    assert check_cli(store_root) == 1
    assert snapshot(store_root) == before

    # A start-up keeps every file, and quarantines the tenant: reported, never served, never hidden.
    config = ServerConfig(warmup_rounds=0, home=tmp_path)
    async with in_process(config, backbone=fake_backbone(), store=LocalStore(store_root)) as running:
        async with AsyncClient(running.target, retries=0) as client:
            heads = {h.tenant: h for h in await client.list_heads()}
            assert (
                heads["broken"].problem.endswith("state.json is missing") and heads["healthy"].problem == ""
            )
            assert await code(client.classify("broken", ["red"])) == grpc.StatusCode.DATA_LOSS
            assert await code(client.get_head("broken")) == grpc.StatusCode.DATA_LOSS
            assert (await client.classify("healthy", ["red word1"]))[0].label == "red"
    assert snapshot(store_root) == before

    # The repair rebuilds the pointer from what is there: both versions, none active, the examples kept.
    assert check_cli(store_root, repair=True) == 0
    state = json.loads((tenant_dir(store_root) / "state.json").read_text())
    assert state["versions"] == [1, 2] and state["active_version"] == 0 and state["examples"]
    assert check_store(store_root) == []
    async with in_process(config, backbone=fake_backbone(), store=LocalStore(store_root)) as running:
        async with AsyncClient(running.target, retries=0) as client:
            assert (await client.activate_head_version("broken", 2)).active_version == 2
            assert (await client.classify("broken", ["red word1"]))[0].label == "red"
            assert (await client.get_head("broken")).example_count > 0


async def test_a_state_naming_an_absent_active_version_is_reported(store_root: Path, tmp_path: Path) -> None:  # noqa: F811
    path = tenant_dir(store_root) / "state.json"
    state = json.loads(path.read_text())
    state["active_version"] = 7
    path.write_text(json.dumps(state))
    config = ServerConfig(warmup_rounds=0, home=tmp_path)
    async with in_process(config, backbone=fake_backbone(), store=LocalStore(store_root)) as running:
        async with AsyncClient(running.target, retries=0) as client:
            heads = {h.tenant: h for h in await client.list_heads()}
            assert "active version 7" in heads["broken"].problem
            assert await code(client.get_head("broken")) == grpc.StatusCode.DATA_LOSS
            assert await code(client.classify("broken", ["red"])) == grpc.StatusCode.DATA_LOSS
    assert [f.tenant for f in check_store(store_root)] == ["broken"]


def test_a_state_read_racing_a_delete_and_a_new_training_is_no_damage(
    store_root: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A read of state.json that finds it gone (the tenant deleted), while a new training of the same tenant
    # writes its state.json and then its version before the read looks at the directory: the tenant as it is
    # then, never DataLoss (tests/unit/test_limits.py's churn found this one in CI, as DATA_LOSS).
    store = LocalStore(store_root)
    path = tenant_dir(store_root, "healthy") / "state.json"
    expected = store.state("healthy")
    read_bytes = Path.read_bytes
    missed: list[Path] = []

    def first_read_misses(self: Path) -> bytes:
        if self == path and not missed:
            missed.append(self)
            raise FileNotFoundError(str(self))
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", first_read_misses)
    assert store.state("healthy") == expected and missed == [path]
    assert "healthy" not in store.damaged
    monkeypatch.undo()

    # Data left without its state.json, still so under the writers' lock, is damage as before.
    path.unlink()
    with pytest.raises(DataLoss, match=r"state\.json is missing"):
        store.state("healthy")
    # A tenant that is gone, data and all, is NotFound.
    shutil.rmtree(tenant_dir(store_root, "healthy"))
    with pytest.raises(NotFound):
        store.state("healthy")


def test_files_moved_by_a_write_while_a_read_ran_are_no_damage(
    store_root: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The read found the state naming version 1 and its example set; a write then deleted that version, or
    # replaced the set (pruning the old file), before the read opened the file.
    store = LocalStore(store_root)
    assert store.state("healthy").versions == (1, 2)
    head = tenant_dir(store_root, "healthy") / "versions" / "1" / "head.json"
    old_set = next((tenant_dir(store_root, "healthy") / "examples").glob("*.json"))
    newer = [Example(Input(text="a newer example"), "red")]
    read_bytes = Path.read_bytes

    def a_write_first(self: Path) -> bytes:
        if self == head and head.exists():
            store.delete_version("healthy", 1)
            raise FileNotFoundError(str(self))
        if self == old_set and old_set.exists():
            store.commit_examples("healthy", NewExamples(newer))
            assert not old_set.exists(), "the replaced set is pruned"
            raise FileNotFoundError(str(self))
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", a_write_first)
    with pytest.raises(NotFound, match="no version 1"):
        store.manifest("healthy", 1)
    assert store.examples("healthy") == newer
    assert "healthy" not in store.damaged
    monkeypatch.undo()

    # A file the state still names that is not there is damage, as before.
    (tenant_dir(store_root, "healthy") / "versions" / "2" / "head.json").unlink()
    with pytest.raises(DataLoss, match=r"version 2's head\.json is missing"):
        store.manifest("healthy", 2)
