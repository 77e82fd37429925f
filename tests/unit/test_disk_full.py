"""Bad input and a full disk are never INTERNAL (issue 23, item 5): an `l2` past its range is INVALID_ARGUMENT
naming the range; a disk that fills during a commit (AdaptHead, ActivateHeadVersion) is RESOURCE_EXHAUSTED
"the store's disk is full", counted, with the store left as it was. The full disk is an injected ENOSPC (this
machine allows no tmpfs mount); through real gRPC in process, on the local store and the fake encoder."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import grpc
import pytest

from headswap.client import AsyncClient, HeadswapError
from headswap.server.config import ServerConfig
from headswap.server.inference.fake import fake_backbone
from headswap.server.store import local as local_module
from headswap.server.store import local_state
from headswap.server.store.local import LocalStore
from headswap.server.testing import InProcess, in_process

TEXTS = [f"{c} w{i}" for c in ("red", "blue") for i in range(4)]
LABELS = [t.split()[0] for t in TEXTS]


def full(*args: Any, **kwargs: Any) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def disk_full_count(s: InProcess) -> float:
    return s.server.metrics.registry.get_sample_value("headswap_store_disk_full_total") or 0.0


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


async def test_l2_past_its_range_is_invalid_argument(tmp_path: Path) -> None:
    async with in_process(ServerConfig(warmup_rounds=0, home=tmp_path), backbone=fake_backbone()) as s:
        async with AsyncClient(s.target, retries=0) as client:
            # The linear head with cross-validation (the default) was INTERNAL (a RuntimeError in its solver).
            for kind, options in (("linear", {}), ("linear", {"validation_fraction": 0}), ("mlp", {})):
                with pytest.raises(HeadswapError) as info:
                    await client.adapt_head("t", TEXTS, LABELS, kind=kind, l2=1e30, **options)
                assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT, info.value
                assert "l2 must be between 0 and 1e+06" in str(info.value)
            trained = await client.adapt_head("t", TEXTS, LABELS, l2=1e6, validation_fraction=0)
            assert trained.version == 1  # the largest l2 allowed trains (to a head that knows little)


async def test_a_full_disk_during_a_commit_is_resource_exhausted_and_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalStore(tmp_path / "store")
    async with in_process(
        ServerConfig(warmup_rounds=0, home=tmp_path), backbone=fake_backbone(), store=store
    ) as s:
        async with AsyncClient(s.target, retries=0) as client:
            await client.adapt_head("t", TEXTS, LABELS, validation_fraction=0)
            await client.adapt_head("t", TEXTS[:6], LABELS[:6], validation_fraction=0, force_activate=True)
            await client.activate_head_version("t", 1)
            before = files(store.root)

            monkeypatch.setattr(local_module, "atomic_write", full)  # the examples
            monkeypatch.setattr(local_state, "atomic_write", full)  # state.json
            with pytest.raises(HeadswapError) as info:
                await client.adapt_head("t", ["red x", "blue y"], ["red", "blue"], validation_fraction=0)
            assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value
            assert "the store's disk is full" in str(info.value)
            with pytest.raises(HeadswapError) as info:
                await client.activate_head_version("t", 2)
            assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value
            assert "the store's disk is full" in str(info.value)
            assert disk_full_count(s) == 2
            monkeypatch.undo()

            # As it was: the same files, version 1 active and serving, every stored example kept.
            assert files(store.root) == before
            head = await client.get_head("t")
            assert head.active_version == 1 and [v.version for v in head.versions] == [1, 2]
            assert head.example_count == len(TEXTS) + 6
            assert (await client.classify("t", ["red w1"]))[0].version == 1
            # Space again: the next commit goes through with the next number.
            again = await client.adapt_head("t", ["red x", "blue y"], ["red", "blue"], validation_fraction=0)
            assert again.version == 3 and (await client.activate_head_version("t", 2)).active_version == 2
