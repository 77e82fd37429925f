"""One local store shared by the processes of a server with workers: every change reaches every process,
writes never interleave, and tenant locks hold across processes."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from headswap.server.domain import Example, Input
from headswap.server.keys import ApiKey
from headswap.server.manifest import HeadManifest
from headswap.server.services.locks import TenantLocks
from headswap.server.store import Change, NewVersion, processes
from headswap.server.store.local import LocalStore

MANIFEST = HeadManifest.from_json({"labels": ["a", "b"], "backbone_fingerprint": "f" * 64})
EXAMPLES = [Example(Input(text="one"), "a"), Example(Input(text="two"), "b")]


async def next_changes(store: LocalStore, count: int, timeout: float = 10.0) -> list[Change]:
    out: list[Change] = []

    async def take() -> None:
        async for change in store.changes():
            out.append(change)
            if len(out) == count:
                return

    await asyncio.wait_for(take(), timeout)
    return out


async def test_a_change_made_by_one_process_reaches_the_other(tmp_path: Path) -> None:
    # Two openings of one directory stand for two processes: each logs as itself and follows the other.
    a, b = LocalStore(tmp_path, shared=True), LocalStore(tmp_path, shared=True)
    try:
        seen_by_b = asyncio.create_task(next_changes(b, 4))
        seen_by_a = asyncio.create_task(next_changes(a, 5))  # its own four, then b's key
        await asyncio.sleep(0.05)  # both subscribed
        a.commit_version("t", NewVersion(MANIFEST, b"w1", EXAMPLES, activate=True))
        a.commit_version("t", NewVersion(MANIFEST, b"w2", EXAMPLES, activate=True))
        a.activate("t", 1)
        a.delete("t")
        changes = await seen_by_b
        assert [(c.active_version, c.deleted) for c in changes] == [
            (1, False),
            (2, False),
            (1, False),
            (0, True),
        ]
        assert [c.seq for c in changes] == sorted(c.seq for c in changes)
        b.put_key(ApiKey("0123456789abcdef", "tenant", "t", "h" * 64, 1.0))
        b.revoke_key("0123456789abcdef", 2.0)
        *_, key_change = await seen_by_a
        assert key_change.key_id == "0123456789abcdef"
        assert not seen_by_b.cancelled()
    finally:
        a.close()
        b.close()


async def test_followers_go_on_across_a_rotation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(processes, "ROTATE_BYTES", 600)  # a rotation every three or four changes
    a, b = LocalStore(tmp_path, shared=True), LocalStore(tmp_path, shared=True)
    try:
        seen = asyncio.create_task(next_changes(b, 12))
        await asyncio.sleep(0.05)
        for i in range(12):
            a.commit_version(f"t{i}", NewVersion(MANIFEST, b"w", EXAMPLES, activate=True))
            await asyncio.sleep(processes.POLL_S)  # a rotation per few polls, as with 1 MiB logs
        changes = await seen
        assert [c.tenant for c in changes] == [f"t{i}" for i in range(12)]
        assert (tmp_path / "changes.log.1").exists()
    finally:
        a.close()
        b.close()


WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from headswap.server.domain import Example, Input
    from headswap.server.manifest import HeadManifest
    from headswap.server.store import NewVersion
    from headswap.server.store.local import LocalStore

    store = LocalStore(Path(sys.argv[1]), max_versions=1000, shared=True)
    for i in range(int(sys.argv[2])):
        store.commit_version("t", NewVersion(HeadManifest.from_json({"labels": ["a"], "backbone_fingerprint": "f" * 64}),
                             sys.argv[3].encode() + str(i).encode(), [Example(Input(text="x"), "a")], True))
    store.close()
    """
)


def test_two_processes_committing_at_once_lose_nothing(tmp_path: Path) -> None:
    """Each commit reads and rewrites the tenant's state.json: without the writer lock, two processes
    interleave and one's versions vanish from the state (or two take one number)."""
    LocalStore(tmp_path, shared=True).close()
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), "25", name]) for name in ("a", "b")
    ]
    assert [w.wait(120) for w in writers] == [0, 0]
    store = LocalStore(tmp_path, max_versions=1000)
    state = store.state("t")
    assert state.versions == tuple(range(1, 51))
    weights = {store.load_version("t", v).weights for v in state.versions}
    assert len(weights) == 50 and {w[:1] for w in weights} == {b"a", b"b"}


async def test_tenant_locks_hold_across_processes(tmp_path: Path) -> None:
    first, second = TenantLocks(tmp_path), TenantLocks(tmp_path)  # two processes' lock tables
    order: list[str] = []
    async with first("acme"):
        waiting = asyncio.create_task(_hold(second, "acme", order))
        await asyncio.sleep(0.1)
        assert not waiting.done()  # the other process waits for the file lock
        async with second("someone-else"):  # another stripe: free
            order.append("other tenant")
        order.append("first released")
    await asyncio.wait_for(waiting, 5)
    assert order[-2:] == ["first released", "second held"]


async def _hold(locks: TenantLocks, tenant: str, order: list[str]) -> None:
    async with locks(tenant):
        order.append("second held")


async def test_a_caller_that_leaves_while_waiting_holds_nothing(tmp_path: Path) -> None:
    first, second = TenantLocks(tmp_path), TenantLocks(tmp_path)
    async with first("acme"):
        waiting = asyncio.create_task(_hold(second, "acme", []))
        await asyncio.sleep(0.05)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
    # Nothing left held: a third lock table takes it at once.
    async with asyncio.timeout(1):
        async with TenantLocks(tmp_path)("acme"):
            pass
