"""A DeleteHead acknowledged after a cancelled AdaptHead stays done (issue 23, item 1): the tenant lock is held
by the work (a commit that outlives its call keeps the tenant locked until it ends), a commit never brings a
deleted tenant back, and the delete removes every file of the tenant. On the local store, through real gRPC
in process, on the fake encoder (the backbone plays no part in the race)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import random
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from headswap.client import AsyncClient, HeadswapError
from headswap.server.config import LimitsConfig, ServerConfig
from headswap.server.domain import Example, Input
from headswap.server.errors import FailedPrecondition
from headswap.server.inference.fake import fake_backbone
from headswap.server.manifest import HeadManifest
from headswap.server.store.base import NewVersion
from headswap.server.store.local import LocalStore
from headswap.server.testing import InProcess, in_process
from tests.helpers import HANG, eventually

TEXTS = [f"{c} w{i}" for c in ("red", "blue") for i in range(4)]
LABELS = [t.split()[0] for t in TEXTS]
TRIALS = int(os.environ.get("HEADSWAP_CANCEL_TRIALS", 250))


def config(tmp_path: Path) -> ServerConfig:
    return ServerConfig(warmup_rounds=0, home=tmp_path, limits=replace(LimitsConfig(), train_workers=1))


def no_locks(s: InProcess) -> bool:
    gc.collect()  # a lock lives while held or waited for: whatever else kept it is a cycle
    return len(s.server.heads.locks) == 0


def leftovers(store: LocalStore, tenant: str) -> list[str]:
    """Files of the tenant still on disk, wherever a delete in progress or a temporary file may hide them."""
    return sorted(
        str(p.relative_to(store.tenants_dir))
        for p in store.tenants_dir.rglob("*")
        if p.is_file() and (p.relative_to(store.tenants_dir).parts[0].lstrip(".").startswith(tenant))
    )


async def assert_gone(s: InProcess, client: AsyncClient, store: LocalStore, tenant: str) -> None:
    # Whatever the abandoned call left running ends: then nothing of the tenant may come back.
    await eventually(lambda: no_locks(s), "the abandoned call's work ended")
    loop = asyncio.get_running_loop()
    await asyncio.wait_for(loop.run_in_executor(s.server.pools.train, lambda: None), HANG)
    await asyncio.wait_for(loop.run_in_executor(s.server.pools.io, lambda: None), HANG)
    assert tenant not in [h.tenant for h in await client.list_heads()], "the deleted tenant came back"
    with pytest.raises(HeadswapError) as info:
        await client.get_head(tenant)
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    assert tenant not in store.damaged
    assert leftovers(store, tenant) == []


async def test_a_delete_after_a_cancelled_commit_removes_everything(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    entered, release = threading.Event(), threading.Event()
    commit = store.commit_version

    def gated(tenant: str, new: NewVersion) -> Any:
        entered.set()
        release.wait(HANG)
        return commit(tenant, new)

    async with in_process(config(tmp_path), backbone=fake_backbone(), store=store) as s:
        async with AsyncClient(s.target, retries=0) as client:
            await client.adapt_head("t", TEXTS, LABELS, validation_fraction=0)
            store.commit_version = gated  # type: ignore[method-assign]
            call = asyncio.create_task(client.adapt_head("t", TEXTS, LABELS, validation_fraction=0))
            await asyncio.wait_for(asyncio.to_thread(entered.wait, HANG), HANG)  # the commit is under way
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            delete = asyncio.create_task(client.delete_head("t"))
            await asyncio.wait({delete}, timeout=0.5)  # before the fix, the delete was done by now
            release.set()
            await asyncio.wait_for(delete, HANG)
            await assert_gone(s, client, store, "t")


def test_a_commit_never_recreates_a_deleted_tenant(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    examples = [Example(Input(text=t), label) for t, label in zip(TEXTS, LABELS, strict=True)]
    manifest = HeadManifest.from_json({"labels": ["blue", "red"]})
    seq = store.commit_version("t", NewVersion(manifest, b"w", examples, True)).seq
    store.delete("t")
    # Work that started on the tenant as it was (a training that outlived its call) lands nowhere.
    with pytest.raises(FailedPrecondition, match="deleted"):
        store.commit_version("t", NewVersion(manifest, b"w", examples, True, expect_seq=seq))
    with pytest.raises(FailedPrecondition, match="deleted"):
        store.put_examples("t", examples, expect_seq=seq)
    store.save_embeddings("t", "fp", {b"k" * 32: __import__("numpy").ones(4, "float32")})
    assert leftovers(store, "t") == [] and not store.tenant_dir("t").exists()


async def test_cancel_then_delete_never_brings_a_tenant_back(tmp_path: Path) -> None:
    """The adversarial loop of the issue: cancel at a random moment of the call, delete at once."""
    store = LocalStore(tmp_path / "store")
    rng = random.Random(23)
    async with in_process(config(tmp_path), backbone=fake_backbone(), store=store) as s:
        async with AsyncClient(s.target, retries=0) as client:
            loop = asyncio.get_running_loop()
            await client.adapt_head("w", TEXTS, LABELS, validation_fraction=0)  # the first one warms up
            started = loop.time()
            await client.adapt_head("t", TEXTS, LABELS, validation_fraction=0)
            typical = loop.time() - started  # cancels land anywhere from the start to past the end
            await client.delete_head("t")
            for trial in range(TRIALS):
                call = asyncio.create_task(client.adapt_head("t", TEXTS, LABELS, validation_fraction=0))
                await asyncio.sleep(rng.uniform(0.0, 1.2 * typical))
                call.cancel()
                with contextlib.suppress(asyncio.CancelledError, HeadswapError):
                    await call
                try:
                    await client.delete_head("t")
                except HeadswapError as exc:  # cancelled before anything was stored
                    assert exc.code == grpc.StatusCode.NOT_FOUND, exc
                await eventually(lambda: not s.server.heads.locks("t").locked(), f"trial {trial}: work ended")
                await asyncio.wait_for(loop.run_in_executor(s.server.pools.io, lambda: None), HANG)
                assert leftovers(store, "t") == [], f"trial {trial}: the deleted tenant's files came back"
                assert "t" not in store.tenants(), f"trial {trial}: the deleted tenant came back"
