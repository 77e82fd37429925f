"""The contract every HeadStore keeps, run against each implementation (the PostgreSQL store joins in its
own module, where a real server is started)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from headswap.server.domain import Example, Input
from headswap.server.errors import FailedPrecondition, InvalidArgument, NotFound
from headswap.server.manifest import HeadManifest
from headswap.server.store import AlreadyDone, Change, HeadStore, NewVersion, RequestRecord
from headswap.server.store.local import LocalStore
from headswap.server.store.memory import MemoryStore
from headswap.server.store.requests import REQUESTS_KEPT
from tests.helpers import eventually

MANIFEST = HeadManifest.from_json({"labels": ["a", "b"], "backbone_fingerprint": "f" * 64})
EXAMPLES = [Example(Input(text="one"), "a"), Example(Input(image=b"\x89PNG bytes"), "b")]

STORES: dict[str, Callable[[Path], HeadStore]] = {"local": LocalStore, "memory": lambda _: MemoryStore()}


@pytest.fixture(params=[*sorted(STORES), "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[HeadStore]:
    if request.param == "postgres":  # a real PostgreSQL server, a fresh database
        from headswap.server.store.postgres import PostgresStore

        made: HeadStore = PostgresStore(request.getfixturevalue("postgres_dsn"), migrate_schema=True)
    else:
        made = STORES[request.param](tmp_path)
    yield made
    made.close()


def test_versions_pointer_and_examples(store: HeadStore) -> None:
    s1 = store.commit_version("t", NewVersion(MANIFEST, b"w1", EXAMPLES, activate=True))
    s2 = store.commit_version("t", NewVersion(MANIFEST, b"w2", EXAMPLES[:1], activate=False))
    assert (s1.versions, s1.active_version, s2.versions, s2.active_version) == ((1,), 1, (1, 2), 1)
    assert s2.seq > s1.seq
    assert store.load_version("t", 2).weights == b"w2" and store.manifest("t", 2).version == 2
    assert store.examples("t") == EXAMPLES[:1]
    state, previous = store.activate("t", 2)
    assert (state.active_version, previous) == (2, 1) and state.seq > s2.seq
    assert store.tenants() == ["t"] and store.state("t") == state
    with pytest.raises(NotFound):
        store.activate("t", 3)
    with pytest.raises(NotFound):
        store.load_version("t", 3)
    with pytest.raises(NotFound):
        store.state("nobody")
    assert store.examples("nobody") == []


def test_examples_keep_text_and_images(store: HeadStore) -> None:
    store.commit_version("t", NewVersion(MANIFEST, b"w", EXAMPLES, activate=True))
    assert store.examples("t") == EXAMPLES


def test_put_examples_stores_without_a_version(store: HeadStore) -> None:
    """A large set arrives in several calls: examples are stored before anything is trained on them."""
    seen: list[Change] = []

    async def watch() -> None:
        async def follow() -> None:
            async for change in store.changes():
                seen.append(change)

        task = asyncio.ensure_future(follow())
        await asyncio.sleep(0)  # subscribed
        state = await asyncio.to_thread(store.put_examples, "new", EXAMPLES[:1])
        assert (state.active_version, state.versions) == (0, ())
        # A commit afterwards publishes: a change of the examples' call would have come before it.
        await asyncio.to_thread(store.commit_version, "later", NewVersion(MANIFEST, b"w", EXAMPLES, True))
        await eventually(lambda: bool(seen))
        task.cancel()

    asyncio.run(watch())
    assert [c.tenant for c in seen] == ["later"], "storing examples moved no pointer: nothing to publish"
    assert store.tenants() == ["later", "new"] and store.examples("new") == EXAMPLES[:1]
    store.put_examples("new", EXAMPLES)
    assert store.examples("new") == EXAMPLES
    committed = store.commit_version("new", NewVersion(MANIFEST, b"w", EXAMPLES, activate=True))
    before = store.put_examples("new", EXAMPLES[1:])
    assert before == store.state("new") and (before.active_version, before.versions) == (1, (1,))
    assert before.seq == committed.seq and store.examples("new") == EXAMPLES[1:]
    assert store.load_version("new", 1).weights == b"w"


def test_delete_and_embeddings(store: HeadStore) -> None:
    store.commit_version("t", NewVersion(MANIFEST, b"w", EXAMPLES, activate=True))
    key = Input(text="one").content_key()
    store.save_embeddings("t", "f" * 64, {key: np.ones(4, np.float32)})
    assert set(store.cached_embeddings("t", "f" * 64)) == {key}
    deleted, change = store.delete("t")
    assert (deleted.versions_deleted, deleted.examples_deleted) == (1, 2) and change.deleted
    assert (
        store.tenants() == [] and store.examples("t") == [] and store.cached_embeddings("t", "f" * 64) == {}
    )
    with pytest.raises(NotFound):
        store.delete("t")
    again = store.commit_version("t", NewVersion(MANIFEST, b"w", EXAMPLES, activate=True))
    assert again.versions == (1,) and again.seq > change.seq, "a new tenant's changes must outrank the old"


def test_bad_names_are_refused(store: HeadStore) -> None:
    for name in ("../x", "", "a/b"):
        with pytest.raises(InvalidArgument):
            store.commit_version(name, NewVersion(MANIFEST, b"w", EXAMPLES, activate=True))


async def test_every_pointer_change_is_published_in_order(store: HeadStore) -> None:
    seen: list[Change] = []

    async def listen() -> None:
        async for change in store.changes():
            seen.append(change)

    task = asyncio.create_task(listen())
    await asyncio.sleep(0)  # the listener runs up to its first wait: subscribed
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, store.commit_version, "t", NewVersion(MANIFEST, b"w", EXAMPLES, True))
    await loop.run_in_executor(None, store.commit_version, "t", NewVersion(MANIFEST, b"w", EXAMPLES, False))
    await loop.run_in_executor(None, store.commit_version, "t", NewVersion(MANIFEST, b"w", EXAMPLES, False))
    await loop.run_in_executor(None, store.activate, "t", 2)
    await loop.run_in_executor(None, store.delete_version, "t", 3)
    await loop.run_in_executor(None, store.delete, "t")
    await eventually(lambda: len(seen) >= 6)
    task.cancel()
    assert [(c.tenant, c.active_version, c.deleted) for c in seen] == [
        ("t", 1, False),
        ("t", 1, False),
        ("t", 1, False),
        ("t", 2, False),
        ("t", 2, False),  # the version deletion: every head bank drops what it holds of version 3
        ("t", 0, True),
    ]
    assert [c.seq for c in seen] == sorted({c.seq for c in seen})


def test_version_numbers_are_never_reused(store: HeadStore) -> None:
    """Clients, caches, logs and "never older than a version seen" rely on a number naming one head."""
    store.commit_version("t", NewVersion(MANIFEST, b"w1", EXAMPLES, activate=True))
    store.commit_version("t", NewVersion(MANIFEST, b"w2", EXAMPLES, activate=True))
    store.activate("t", 1)
    store.delete_version("t", 2)
    state = store.commit_version("t", NewVersion(MANIFEST, b"w3", EXAMPLES, activate=False))
    assert state.versions == (1, 3), "version 2 was deleted: its number is not given out again"
    assert store.load_version("t", 3).weights == b"w3" and store.manifest("t", 3).version == 3
    with pytest.raises(NotFound):
        store.load_version("t", 2)
    # Deleting the newest version, and every version but the active one, changes nothing either.
    store.delete_version("t", 3)
    assert store.commit_version("t", NewVersion(MANIFEST, b"w4", EXAMPLES, activate=True)).versions == (1, 4)
    store.delete_version("t", 1)
    assert store.commit_version("t", NewVersion(MANIFEST, b"w5", EXAMPLES, activate=False)).versions == (4, 5)
    store.put_examples("t", EXAMPLES[:1])  # a rewrite of the state that trains nothing keeps the count too
    store.delete_version("t", 5)
    assert store.commit_version("t", NewVersion(MANIFEST, b"w6", EXAMPLES, activate=False)).versions == (4, 6)


async def test_deleting_a_version_is_published(store: HeadStore) -> None:
    seen: list[Change] = []

    async def listen() -> None:
        async for change in store.changes():
            seen.append(change)

    loop = asyncio.get_running_loop()
    s1 = await loop.run_in_executor(
        None, store.commit_version, "t", NewVersion(MANIFEST, b"w1", EXAMPLES, True)
    )
    await loop.run_in_executor(None, store.commit_version, "t", NewVersion(MANIFEST, b"w2", EXAMPLES, False))
    task = asyncio.create_task(listen())
    await asyncio.sleep(0)  # subscribed
    before = await loop.run_in_executor(None, store.state, "t")
    state = await loop.run_in_executor(None, store.delete_version, "t", 2)
    assert (state.versions, state.active_version) == ((1,), 1) and state.seq > before.seq
    assert store.state("t") == state
    await eventually(lambda: any(c.seq == state.seq for c in seen))
    task.cancel()
    (change,) = [c for c in seen if c.seq == state.seq]
    assert (change.tenant, change.active_version, change.deleted) == ("t", 1, False)
    assert change.weights_sha256 in ("", store.manifest("t", 1).weights_sha256)
    assert s1.seq < change.seq
    with pytest.raises(NotFound):
        store.load_version("t", 2)
    with pytest.raises(NotFound):
        store.delete_version("t", 2)
    with pytest.raises(FailedPrecondition, match="active version"):
        store.delete_version("t", 1)
    with pytest.raises(NotFound):
        store.delete_version("nobody", 1)


def test_retention_keeps_the_newest_the_active_and_its_predecessor(store: HeadStore) -> None:
    store.max_versions = 3
    store.commit_version("t", NewVersion(MANIFEST, b"w", EXAMPLES, activate=True))
    for _ in range(5):
        store.commit_version("t", NewVersion(MANIFEST, b"w", EXAMPLES, activate=False))
    assert store.state("t").versions == (1, 4, 5, 6)  # the newest 3 and the active one
    store.activate("t", 5)
    state = store.commit_version("t", NewVersion(MANIFEST, b"w", EXAMPLES, activate=False))
    assert (state.versions, state.active_version, state.previous_version) == ((1, 5, 6, 7), 5, 1)
    with pytest.raises(NotFound):
        store.load_version("t", 4)


def test_a_local_store_remembers_numbers_across_a_restart_and_a_repair(tmp_path: Path) -> None:
    from headswap.server.store.check import check_store

    store = LocalStore(tmp_path)
    for i in range(3):
        store.commit_version("t", NewVersion(MANIFEST, f"w{i}".encode(), EXAMPLES, activate=i == 0))
    store.delete_version("t", 3)
    reopened = LocalStore(tmp_path)  # a restart: the sweep runs, nothing is lost
    assert reopened.last_version("t") == 3
    (tmp_path / "tenants" / "t" / "versions" / "2" / "weights.safetensors").write_bytes(b"damaged")
    # The check drops every version here (these weights are no heads it can load), the highest included.
    assert check_store(tmp_path, repair=True)
    repaired = LocalStore(tmp_path)
    assert repaired.state("t").versions == ()
    assert repaired.commit_version("t", NewVersion(MANIFEST, b"w", EXAMPLES, activate=False)).versions == (4,)


def test_a_commit_started_before_a_delete_brings_nothing_back(store: HeadStore) -> None:
    """Issue 23, item 1: work that read the tenant before a DeleteHead (a training that outlived its call)
    is refused when it commits; a new tenant's first commit (expect_seq 0) is not."""
    seq = store.commit_version("t", NewVersion(MANIFEST, b"w", EXAMPLES, True, expect_seq=0)).seq
    store.delete("t")
    with pytest.raises(FailedPrecondition, match="deleted"):
        store.commit_version("t", NewVersion(MANIFEST, b"w", EXAMPLES, True, expect_seq=seq))
    with pytest.raises(FailedPrecondition, match="deleted"):
        store.put_examples("t", EXAMPLES, expect_seq=seq)
    assert "t" not in store.tenants() and store.examples("t") == []
    with pytest.raises(NotFound):
        store.state("t")


# -- AdaptHead idempotency keys (issue 26): recorded in the commit, a second commit of one id stores nothing --


def record(request_id: str, digest: str = "d1") -> RequestRecord:
    return RequestRecord(request_id, digest, {"embedded": 2, "activated": True})


def test_a_request_id_is_recorded_in_its_commit_and_refuses_a_second(store: HeadStore) -> None:
    first = store.commit_version("t", NewVersion(MANIFEST, b"w1", EXAMPLES, True, request=record("r1")))
    done = store.request_record("t", "r1")
    assert done == {
        "id": "r1",
        "digest": "d1",
        "outcome": {"embedded": 2, "activated": True, "version": 1, "active_version": 1},
    }
    with pytest.raises(AlreadyDone) as info:  # the retry's commit: nothing stored, the first one's record
        store.commit_version("t", NewVersion(MANIFEST, b"w2", EXAMPLES * 2, True, request=record("r1", "d2")))
    assert info.value.record == done
    assert store.state("t") == first and store.examples("t") == EXAMPLES
    assert store.request_record("t", "other") is None and store.request_record("nobody", "r1") is None
    # Another id commits as usual; a commit without one records nothing.
    assert store.commit_version(
        "t", NewVersion(MANIFEST, b"w2", EXAMPLES, False, request=record("r2"))
    ).versions == (1, 2)
    store.commit_version("t", NewVersion(MANIFEST, b"w3", EXAMPLES, False))
    assert store.request_record("t", "r2")["outcome"]["version"] == 2  # type: ignore[index]


def test_put_examples_records_its_request_id(store: HeadStore) -> None:
    store.put_examples("t", EXAMPLES[:1], request=record("up-1"))
    with pytest.raises(AlreadyDone):
        store.put_examples("t", EXAMPLES[:1] * 2, request=record("up-1"))
    assert store.examples("t") == EXAMPLES[:1]
    assert store.request_record("t", "up-1")["outcome"]["version"] == 0  # type: ignore[index]
    with pytest.raises(AlreadyDone):  # one id space per tenant, whichever call stored it
        store.commit_version("t", NewVersion(MANIFEST, b"w", EXAMPLES, True, request=record("up-1")))
    assert store.examples("t") == EXAMPLES[:1]


def test_a_refused_commit_records_no_request_id(store: HeadStore) -> None:
    state = store.commit_version("t", NewVersion(MANIFEST, b"w1", EXAMPLES, True))
    store.delete("t")
    with pytest.raises(FailedPrecondition):  # the training began before the delete
        store.commit_version("t", NewVersion(MANIFEST, b"w2", EXAMPLES, True, state.seq, record("late")))
    assert store.request_record("t", "late") is None


def test_request_ids_survive_other_writes_are_bounded_and_go_with_the_tenant(store: HeadStore) -> None:
    for i in range(REQUESTS_KEPT + 3):
        store.put_examples("t", EXAMPLES[:1], request=record(f"r{i}"))
    store.commit_version("t", NewVersion(MANIFEST, b"w1", EXAMPLES, True, request=record("v1")))
    store.commit_version("t", NewVersion(MANIFEST, b"w2", EXAMPLES, True))
    store.activate("t", 1)
    store.delete_version("t", 2)
    kept = [i for i in range(REQUESTS_KEPT + 3) if store.request_record("t", f"r{i}") is not None]
    assert kept == list(range(4, REQUESTS_KEPT + 3))  # the newest, with "v1": REQUESTS_KEPT in all
    assert store.request_record("t", "v1") is not None
    store.delete("t")
    assert store.request_record("t", "v1") is None
    # A new tenant of that name starts with no ids: the same id is a new call.
    store.put_examples("t", EXAMPLES, request=record("v1"))
    assert store.examples("t") == EXAMPLES


def test_last_version_and_cached_fingerprints(store: HeadStore) -> None:
    with pytest.raises(NotFound):
        store.last_version("t")
    store.commit_version("t", NewVersion(MANIFEST, b"w1", EXAMPLES, activate=True))
    store.commit_version("t", NewVersion(MANIFEST, b"w2", EXAMPLES, activate=False))
    store.delete_version("t", 2)
    assert store.last_version("t") == 2  # a number given out stays given out
    assert store.fingerprints("t") == []
    store.save_embeddings("t", "abc", {b"k" * 32: np.ones(4, dtype=np.float32)})
    assert store.fingerprints("t") == ["abc"]


async def test_api_keys(store: HeadStore) -> None:
    from headswap.server.keys import ApiKey

    assert store.get_key("0123456789abcdef") is None
    key = ApiKey("0123456789abcdef", "tenant", "t", "0" * 64, 1.0, name="ci")
    store.put_key(key)
    assert store.get_key(key.id) == key and store.list_keys() == [key]
    changes = store.changes()
    pending = asyncio.ensure_future(anext(changes))
    await asyncio.sleep(0)
    revoked = await asyncio.to_thread(store.revoke_key, key.id, 5.0)
    assert revoked.revoked_at == 5.0 and store.get_key(key.id) == revoked
    change = await asyncio.wait_for(pending, 10)
    assert (change.tenant, change.key_id) == ("", key.id)
    with pytest.raises(NotFound):
        store.revoke_key("fedcba9876543210", 5.0)
