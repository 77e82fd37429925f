"""The local store: everything under one directory, no server needed (one replica per directory).

Every write is atomic: a temporary file, fsync, rename, fsync of the directory. `state.json` is a tenant's
one commit point: it names the versions, the active one and the file of the current examples, so that a
training's examples, version and pointer become visible together or not at all. Files no state names
(versions or example sets of a training that did not commit, temporary files) are swept at start-up.
A tenant whose files cannot be read is quarantined (DataLoss for that tenant alone); `check` finds and
`check(repair=True)` mends what it can. Reads and state.json are in local_state.py, the embedding cache
in local_cache.py, API keys in local_keys.py; the pointer rules in pointer.py.

Layout:
    tenants/<tenant>/state.json                         {"active_version", "previous_version",
                                                         "versions": [...], "last_version",
                                                         "examples": "<sha256>", "seq",
                                                         "requests": [AdaptHead idempotency keys]}
    tenants/<tenant>/versions/<N>/head.json             manifest (labels, fingerprint, metrics, weights_sha256)
    tenants/<tenant>/versions/<N>/weights.safetensors
    tenants/<tenant>/examples/<sha256>.json             labelled example sets, content-addressed
    tenants/<tenant>/embeddings/<fingerprint>.safetensors   cached embeddings of those examples
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from headswap.server.domain import Deletion, Example
from headswap.server.errors import DataLoss, NotFound
from headswap.server.store import pointer
from headswap.server.store.base import (
    Change,
    NewExamples,
    NewVersion,
    TenantState,
    check_expected,
    example_to_json,
    no_head,
    weights_digest,
)
from headswap.server.store.faults import crash_point
from headswap.server.store.files import (
    atomic_write,
    compact_json_bytes,
    exclusive,
    fsync_dir,
    json_bytes,
    next_seq,
    recorded_last_version,
)
from headswap.server.store.local_cache import LocalCache
from headswap.server.store.local_keys import LocalKeys
from headswap.server.store.local_state import LocalState
from headswap.server.store.processes import ProcessShared
from headswap.server.store.requests import AlreadyDone, RequestRecord, find_request
from headswap.server.store.sweep import sweep


class LocalStore(LocalCache, LocalKeys, LocalState):
    def __init__(
        self, root: Path, max_versions: int = 50, shared: bool = False, sweep_at_start: bool = True
    ) -> None:
        """`shared`: several processes of one server (its workers) use the store at once.
        `sweep_at_start=False`: change nothing on disk when opening (`headswap store check`)."""
        super().__init__(max_versions)
        self.root = root
        self.tenants_dir = root / "tenants"
        if sweep_at_start:
            self.tenants_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self.shared = ProcessShared(root, self.feed) if shared else None
        if sweep_at_start:
            with self._writing():
                sweep(self)
        if self.shared is not None:
            self.shared.start()

    def _writing(self) -> contextlib.AbstractContextManager[Any]:
        return self.shared.writing() if self.shared is not None else self._lock

    def _publish(self, change: Change) -> None:
        """Tell this process's subscribers, and the store's other processes when shared."""
        self.feed.publish(change)
        if self.shared is not None:
            self.shared.append(change)

    def close(self) -> None:
        if self.shared is not None:
            self.shared.close()

    # -- writing -----------------------------------------------------------------------------------------

    def _begin(
        self, tenant: str, expect_seq: int | None, request: RequestRecord | None
    ) -> tuple[dict[str, Any], TenantState]:
        """The state a write starts from. Refuses when it is not the one the work was started on (a training
        that outlived its call, committing after a DeleteHead): a write never brings a deleted tenant back;
        and when the tenant already has the write's request id (`AlreadyDone`). A new tenant's directory is
        created here, and only here."""
        try:
            raw_state: dict[str, Any] = self.raw_state(tenant)
            state = self.state(tenant)
        except NotFound:
            raw_state, state = {}, TenantState(tenant, 0, ())
        check_expected(state, expect_seq)
        if request is not None and (done := find_request(raw_state.get("requests"), request.request_id)):
            raise AlreadyDone(done)
        if not raw_state:
            # A new tenant: its directory, and a state that names nothing yet, before any of its files: a
            # tenant directory without state.json is then always damage (the sweep removes a state that names
            # nothing, left by a crash before the first commit point).
            self.tenant_dir(tenant).mkdir(exist_ok=True)
            self.write_state(state, "")
        return raw_state, state

    @exclusive
    def commit_version(self, tenant: str, new: NewVersion) -> TenantState:
        tenant_dir = self.tenant_dir(tenant)
        raw_state, state = self._begin(tenant, new.expect_seq, new.request)
        versions_dir = tenant_dir / "versions"
        versions_dir.mkdir(exist_ok=True)
        existing = [int(p.name) for p in versions_dir.iterdir() if p.name.isdigit()]
        # Never a number given out before, even to a version deleted since: state.json keeps the highest.
        version = pointer.next_version(state, *existing, recorded_last_version(raw_state))
        sha = weights_digest(new.weights)
        manifest = new.manifest.committed(version, sha)

        staging = Path(tempfile.mkdtemp(prefix=f".{version}.", suffix=".tmp", dir=versions_dir))
        try:
            for name, data in (
                ("head.json", json_bytes(manifest.to_json())),
                ("weights.safetensors", new.weights),
            ):
                with (staging / name).open("wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
            fsync_dir(staging)
            os.rename(staging, versions_dir / str(version))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        updated = pointer.committed(state, version, new.activate, next_seq(state.seq))
        try:
            fsync_dir(versions_dir)
            crash_point("version-written")
            ref = self._write_examples(tenant, new.examples)
            crash_point("examples-written")
            # The commit point: until state.json names the version and the examples, a restart sweeps them.
            record = new.request.to_json(version, updated.active_version) if new.request else None
            self.write_state(updated, ref, record)
        except OSError:  # a full disk, say: leave nothing the state does not name (the sweep would, later)
            if version not in self._named_versions(tenant):
                shutil.rmtree(versions_dir / str(version), ignore_errors=True)
            raise
        crash_point("state-written")
        self._prune(updated, ref, raw_state.get("examples"))
        self.damaged.pop(tenant, None)
        active_sha = sha if updated.active_version == version else ""
        self._publish(Change(tenant, updated.active_version, updated.seq, weights_sha256=active_sha))
        return self.state(tenant)

    def _named_versions(self, tenant: str) -> set[int]:
        try:
            return set(self.state(tenant).versions)
        except (NotFound, DataLoss):
            return set()

    def _write_examples(self, tenant: str, examples: Sequence[Example]) -> str:
        """Write an example set under its sha256 (rewritten: a damaged copy may be there); returns the sha256."""
        data = compact_json_bytes({"examples": [example_to_json(e) for e in examples]})
        ref = hashlib.sha256(data).hexdigest()
        directory = self.tenant_dir(tenant) / "examples"
        directory.mkdir(exist_ok=True)
        atomic_write(directory / f"{ref}.json", data)
        return ref

    @exclusive
    def commit_examples(self, tenant: str, new: NewExamples) -> TenantState:
        raw_state, state = self._begin(tenant, new.expect_seq, new.request)
        if not raw_state:  # a new tenant: a seq of its own, that a delete and a new start never repeat
            state = TenantState(tenant, 0, (), next_seq(0))
        ref = self._write_examples(tenant, new.examples)
        record = new.request.to_json(0, state.active_version) if new.request else None
        self.write_state(state, ref, record)  # the commit point
        self._prune(state, ref, raw_state.get("examples"))
        return state

    def _prune(self, state: TenantState, examples: str, old_examples: str | None) -> None:
        """Retention: drop versions past the limit (the state first, then their files) and the old
        example set."""
        kept = pointer.retained(state, self.max_versions)
        if kept != state:
            self.write_state(kept, examples)
            for version in set(state.versions) - set(kept.versions):
                shutil.rmtree(self.version_dir(state.tenant, version), ignore_errors=True)
        tenant_dir = self.tenant_dir(state.tenant)
        if old_examples and old_examples != examples:
            (tenant_dir / "examples" / f"{old_examples}.json").unlink(missing_ok=True)
        (tenant_dir / "examples.json").unlink(missing_ok=True)  # the layout before content-addressing

    @exclusive
    def activate(self, tenant: str, version: int) -> tuple[TenantState, int]:
        state = self.state(tenant)
        stored = self.load_version(tenant, version)  # DataLoss before the pointer moves to damaged weights
        updated = pointer.activated(state, version, next_seq(state.seq))
        self.write_state(updated, self.examples_ref(tenant))
        self._publish(
            Change(tenant, version, updated.seq, weights_sha256=stored.manifest.weights_sha256 or "")
        )
        return updated, state.active_version

    @exclusive
    def delete_version(self, tenant: str, version: int) -> TenantState:
        state = self.state(tenant)
        updated = pointer.without_version(state, version, next_seq(state.seq))
        self.write_state(updated, self.examples_ref(tenant))
        shutil.rmtree(self.version_dir(tenant, version), ignore_errors=True)
        active_sha = ""
        if updated.active_version:
            active_sha = self.manifest(tenant, updated.active_version).weights_sha256 or ""
        self.feed.publish(Change(tenant, updated.active_version, updated.seq, weights_sha256=active_sha))
        return updated

    @exclusive
    def delete(self, tenant: str) -> tuple[Deletion, Change]:
        """Works on a quarantined tenant too: whatever can be counted is, and everything goes."""
        tenant_dir = self.tenant_dir(tenant)
        if not self.exists(tenant):
            raise no_head(tenant)
        try:
            state = self.state(tenant)
            versions, seq = len(state.versions), state.seq
        except DataLoss:
            versions, seq = sum(1 for p in (tenant_dir / "versions").glob("*") if p.name.isdigit()), 0
        try:
            examples = len(self.examples(tenant))
        except DataLoss:
            examples = 0
        # Rename first: the tenant disappears at once and atomically; a crash mid-delete is swept later.
        trash = self.tenants_dir / f".{tenant}.deleted-{time.time_ns()}"
        os.rename(tenant_dir, trash)
        fsync_dir(self.tenants_dir)
        shutil.rmtree(trash, ignore_errors=True)
        self.damaged.pop(tenant, None)
        change = Change(tenant, 0, next_seq(seq), deleted=True)
        self._publish(change)
        return Deletion(tenant, versions, examples), change
