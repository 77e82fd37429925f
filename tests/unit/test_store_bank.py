"""LocalStore, EmbeddingCache and HeadBank with small synthetic heads (no backbone)."""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import threading
import weakref
from pathlib import Path

import numpy as np
import pytest

from headswap.adapters import TrainConfig, head_to_bytes, train_head
from headswap.adapters.grouped import HeadStack
from headswap.server.cache import EmbeddingCache
from headswap.server.domain import Example, Input
from headswap.server.errors import FailedPrecondition, InvalidArgument, NotFound
from headswap.server.headbank import HeadBank
from headswap.server.manifest import HeadManifest
from headswap.server.store import Change, NewVersion, StoredVersion
from headswap.server.store.files import atomic_write
from headswap.server.store.local import LocalStore

FP = "a" * 64


def trained(seed: int = 0, fingerprint: str = FP) -> tuple[bytes, HeadManifest]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((40, 8)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    head = train_head(x, y, 2, TrainConfig(seed=seed, device="cpu"))
    weights, manifest = head_to_bytes(
        head,
        extra_manifest={
            "labels": ["neg", "pos"],
            "backbone_fingerprint": fingerprint,
            "created_at": 1.0,
            "example_count": 40,
            "tenant": "t",
        },
    )
    return weights, HeadManifest.from_json(manifest)


def content_key(text: str) -> bytes:
    return Input(text=text).content_key()


EXAMPLES = [Example(Input(text="good"), "pos"), Example(Input(text="bad"), "neg")]


def test_commit_activate_and_reload(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    w, m = trained()
    s1 = store.commit_version("acme", NewVersion(m, w, EXAMPLES, activate=True))
    s2 = store.commit_version(
        "acme", NewVersion(m, w, [*EXAMPLES, Example(Input(text="meh"), "neg")], activate=False)
    )
    assert (s1.active_version, s2.active_version, s2.versions) == (1, 1, (1, 2))
    reopened = LocalStore(tmp_path)
    assert reopened.tenants() == ["acme"]
    assert reopened.state("acme").versions == (1, 2)
    assert reopened.load_version("acme", 2).weights == w
    assert reopened.manifest("acme", 2).version == 2
    assert len(reopened.examples("acme")) == 3
    state, previous = reopened.activate("acme", 2)
    assert (state.active_version, previous) == (2, 1)
    with pytest.raises(NotFound, match="no version 7"):
        reopened.activate("acme", 7)
    with pytest.raises(NotFound, match="has no head"):
        reopened.state("nobody")


def test_uncommitted_version_is_swept_and_previous_stays(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    w, m = trained()
    store.commit_version("acme", NewVersion(m, w, EXAMPLES, activate=True))
    # What a crash after writing version 2 but before state.json named it leaves behind:
    orphan = tmp_path / "tenants" / "acme" / "versions" / "2"
    orphan.mkdir()
    (orphan / "head.json").write_text("{}")
    (tmp_path / "tenants" / "acme" / ".state.json.x.tmp").write_text("half")
    reopened = LocalStore(tmp_path)
    assert not orphan.exists()
    assert not list((tmp_path / "tenants" / "acme").glob(".*.tmp"))
    assert reopened.state("acme").active_version == 1
    assert reopened.commit_version("acme", NewVersion(m, w, EXAMPLES, activate=True)).versions == (1, 2)


def test_delete_removes_everything(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    w, m = trained()
    store.commit_version("acme", NewVersion(m, w, EXAMPLES, activate=True))
    store.save_embeddings("acme", FP, {content_key("good"): np.ones(8, np.float32)})
    deleted, _ = store.delete("acme")
    assert (deleted.versions_deleted, deleted.examples_deleted) == (1, 2)
    assert not (tmp_path / "tenants" / "acme").exists()
    assert store.tenants() == [] and store.examples("acme") == []
    assert store.cached_embeddings("acme", FP) == {}


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", ""])
def test_tenant_names_never_become_paths(tmp_path: Path, name: str) -> None:
    store = LocalStore(tmp_path / "s")
    w, m = trained()
    with pytest.raises(InvalidArgument):
        store.commit_version(name, NewVersion(m, w, EXAMPLES, activate=True))
    assert not (tmp_path / "escape").exists()


def test_atomic_write_replaces_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "f.json"
    atomic_write(path, b"old")
    atomic_write(path, b"new")
    assert path.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["f.json"]


def test_persisted_embeddings_round_trip_and_damage(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    entries = {content_key(t): np.full(4, i, np.float32) for i, t in enumerate(["a", "b", "c"])}
    store.save_embeddings("acme", FP, entries)  # a cache never creates a tenant
    assert store.cached_embeddings("acme", FP) == {} and not store.tenant_dir("acme").exists()
    store.put_examples("acme", [])
    store.save_embeddings("acme", FP, entries)
    back = store.cached_embeddings("acme", FP)
    assert set(back) == set(entries) and all(np.array_equal(back[k], entries[k]) for k in entries)
    assert store.cached_embeddings("acme", "b" * 64) == {}
    (tmp_path / "tenants" / "acme" / "embeddings" / f"{FP}.safetensors").write_bytes(b"garbage")
    assert store.cached_embeddings("acme", FP) == {}


def test_embedding_cache_is_bounded_lru_and_keyed_by_fingerprint() -> None:
    cache = EmbeddingCache(capacity=2)
    a, b, c = (content_key(t) for t in "abc")
    cache.put_many(FP, {a: np.zeros(2), b: np.ones(2)})
    assert set(cache.get_many(FP, [a])) == {a}  # a is now most recent
    cache.put_many(FP, {c: np.ones(2)})
    assert set(cache.get_many(FP, [a, b, c])) == {a, c} and len(cache) == 2
    assert cache.get_many("other", [a]) == {}


def test_embedding_cache_forgets_a_deleted_tenant_but_not_what_others_use() -> None:
    cache = EmbeddingCache(capacity=10, scope="shared")
    a, b = content_key("a"), content_key("b")
    cache.put_many(FP, {a: np.zeros(2), b: np.ones(2)}, tenant="t1")
    cache.get_many(FP, [b], tenant="t2")  # t2 uses b too
    assert cache.evict_tenant("t1") == 1
    assert set(cache.get_many(FP, [a, b])) == {b}
    assert cache.evict_tenant("t2") == 1 and len(cache) == 0


def test_embedding_cache_keeps_its_rows_not_the_batches_they_came_from() -> None:
    cache = EmbeddingCache(capacity=10, scope="shared")
    a, b, c = (content_key(t) for t in "abc")
    batch = np.arange(3 * 384, dtype=np.float32).reshape(3, 384)
    batch_alive = weakref.ref(batch)
    cache.put_many(FP, {a: batch[0], b: batch[1], c: batch[2]}, tenant="t1")
    cache.get_many(FP, [b], tenant="t2")
    del batch
    gc.collect()
    assert batch_alive() is None  # dropping a and c with t1 frees their bytes; b holds only its own row
    assert cache.evict_tenant("t1") == 2
    kept = cache.get_many(FP, [b])[b]
    assert kept.base is None and kept.nbytes == 384 * 4
    np.testing.assert_array_equal(kept, np.arange(384, 768, dtype=np.float32))
    cache.put_many(FP, {b: kept}, tenant="t3")  # putting back the cache's own vector copies nothing
    assert cache.get_many(FP, [b])[b] is kept


def test_head_bank_swap_keeps_old_head_for_holders_then_frees_it(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    bank = HeadBank(store, {FP: HeadStack(8)})
    w1, m1 = trained(1)
    store.commit_version("acme", NewVersion(m1, w1, EXAMPLES, activate=True))
    held = bank.get("acme")  # a request in flight holds version 1
    assert held.version == 1
    w2, m2 = trained(2)
    state = store.commit_version("acme", NewVersion(m2, w2, EXAMPLES, activate=True))
    bank.reconcile(
        Change("acme", state.active_version, state.seq),
        StoredVersion(2, dataclasses.replace(m2, version=2), w2),
    )
    assert bank.get("acme").version == 2
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    old_answer = held.predict(x)  # the in-flight request finishes on version 1
    assert len(old_answer) == 3 and old_answer[0].shape == (2,)
    assert len(bank.stacks[FP]) == 2  # both versions resident while the old one is held
    ref = weakref.ref(held)
    del held
    gc.collect()
    assert ref() is None, "a retired head is still referenced"
    assert len(bank.stacks[FP]) == 1, "the retired version's weights were not released"
    assert bank.resident()[0] == 1


@pytest.mark.parametrize("first", ["feed", "commit"])
def test_a_change_being_loaded_is_not_loaded_again(tmp_path: Path, first: str) -> None:
    """The feed's notice of a local commit and the commit's own call (with the version's bytes) race to apply
    the same change: one load, and the commit's call returns only once the version serves."""
    store = LocalStore(tmp_path)
    bank = HeadBank(store, {FP: HeadStack(8)})
    w1, m1 = trained(1)
    store.commit_version("acme", NewVersion(m1, w1, EXAMPLES, activate=True))
    assert bank.get("acme").version == 1
    w2, m2 = trained(2)
    state = store.commit_version("acme", NewVersion(m2, w2, EXAMPLES, activate=True))
    change = Change("acme", state.active_version, state.seq)
    stored = StoredVersion(2, dataclasses.replace(m2, version=2), w2)
    loads, entered, release = [], threading.Event(), threading.Event()
    original = bank.load

    def slow_load(*args: object) -> object:
        loads.append(args)
        entered.set()
        release.wait(10)
        return original(*args)  # type: ignore[arg-type]

    bank.load = slow_load  # type: ignore[method-assign]
    calls = {"feed": (change, None), "commit": (change, stored)}
    second = "commit" if first == "feed" else "feed"
    loader = threading.Thread(target=bank.reconcile, args=calls[first])
    loader.start()
    assert entered.wait(10)
    finished = threading.Event()

    def then() -> None:
        bank.reconcile(*calls[second])
        finished.set()

    follower = threading.Thread(target=then)
    follower.start()
    if second == "commit":  # it waits for the load under way: its reply must be true of what serves
        assert not finished.wait(0.3)
    release.set()
    loader.join(10)
    follower.join(10)
    assert finished.is_set() and len(loads) == 1
    assert bank.get("acme").version == 2
    gc.collect()
    assert len(bank.stacks[FP]) == 1


def test_head_bank_pins_versions_and_checks_fingerprint(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    w, m = trained()
    store.commit_version("acme", NewVersion(m, w, EXAMPLES, activate=True))
    store.commit_version("acme", NewVersion(m, w, EXAMPLES, activate=True))
    bank = HeadBank(store, {FP: HeadStack(8)})
    assert bank.get("acme", 1).version == 1 and bank.get("acme").version == 2
    with pytest.raises(NotFound):
        bank.get("acme", 9)
    with pytest.raises(NotFound):
        bank.get("ghost")
    other = HeadBank(store, {"b" * 64: HeadStack(8)})
    with pytest.raises(FailedPrecondition, match=r"trained on the backbone whose manifest\.json has"):
        other.get("acme")


def test_manifest_is_json_and_weights_are_safetensors(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    w, m = trained()
    store.commit_version("acme", NewVersion(m, w, EXAMPLES, activate=True))
    vdir = tmp_path / "tenants" / "acme" / "versions" / "1"
    assert json.loads((vdir / "head.json").read_text())["labels"] == ["neg", "pos"]
    raw = (vdir / "weights.safetensors").read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert json.loads(raw[8 : 8 + header_len])  # a safetensors header, not a pickle


def test_reconcile_ignores_stale_changes_and_lazy_loads_never_go_back(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    bank = HeadBank(store, {FP: HeadStack(8)})
    w, m = trained()
    s1 = store.commit_version("acme", NewVersion(m, w, EXAMPLES, activate=True))
    s2 = store.commit_version("acme", NewVersion(m, w, EXAMPLES, activate=True))
    assert bank.get("acme").version == 2
    bank.reconcile(Change("acme", 1, s1.seq))  # a notice that arrives late
    assert bank.get("acme").version == 2
    s3, _ = store.activate("acme", 1)
    bank.reconcile(Change("acme", 1, s3.seq))
    assert bank.get("acme").version == 1
    assert s2.seq < s3.seq
    fresh = HeadBank(store, {FP: HeadStack(8)})
    fresh.reconcile(Change("acme", 2, s3.seq + 1))  # not resident: only noted, nothing loaded
    assert fresh.peek("acme") is None and fresh.resident() == (0, 0)
    assert fresh.get("acme").version == 1  # the state it finds (after retrying, the store has no newer)
    bank.reconcile(Change("acme", 0, s3.seq + 2, deleted=True))
    assert bank.peek("acme") is None and bank.resident() == (0, 0)
