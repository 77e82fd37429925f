"""The local store: everything under one directory, no server needed (one replica per directory).

Every write is atomic: a temporary file, fsync, rename, fsync of the directory. A version becomes visible
only when the tenant's `state.json` names it, so a process killed mid-training leaves the previous state
intact; version directories that no state names are swept at start-up.

Layout:
    tenants/<tenant>/state.json                     {"active_version", "versions": [...], "seq"}
    tenants/<tenant>/versions/<N>/head.json         manifest (labels, fingerprint, config, metrics)
    tenants/<tenant>/versions/<N>/weights.safetensors
    tenants/<tenant>/examples.json                  the labelled examples, in order
    tenants/<tenant>/embeddings/<fingerprint>.safetensors   cached embeddings of those examples
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from headswap.server.domain import Deletion, Example
from headswap.server.errors import NotFound
from headswap.server.store.base import (
    Change,
    HeadStore,
    NewVersion,
    StoredVersion,
    TenantState,
    example_from_json,
    example_to_json,
    no_head,
)
from headswap.server.validation import check_tenant


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a reader (or a crash) sees the old bytes or the new, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode()


def next_seq(previous: int) -> int:
    """Sequence numbers from the clock, so that they keep growing across a delete and a restart."""
    return max(time.time_ns(), previous + 1)


class LocalStore(HeadStore):
    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root
        self.tenants_dir = root / "tenants"
        self.tenants_dir.mkdir(parents=True, exist_ok=True)
        self._sweep()

    # -- paths; tenant names are checked at the edge, and again here because they become paths.
    def _tenant_dir(self, tenant: str) -> Path:
        return self.tenants_dir / check_tenant(tenant)

    def _version_dir(self, tenant: str, version: int) -> Path:
        return self._tenant_dir(tenant) / "versions" / str(int(version))

    def _sweep(self) -> None:
        """Remove what a crash may have left: temporary files and versions no state names."""
        for tenant_dir in self.tenants_dir.iterdir():
            if tenant_dir.name.startswith("."):
                shutil.rmtree(tenant_dir, ignore_errors=True)  # a delete that did not finish
                continue
            for tmp in tenant_dir.rglob(".*.tmp"):
                tmp.unlink(missing_ok=True)
            state_path = tenant_dir / "state.json"
            known = set(json.loads(state_path.read_text())["versions"]) if state_path.exists() else set()
            versions = tenant_dir / "versions"
            if versions.is_dir():
                for entry in versions.iterdir():
                    if not entry.name.isdigit() or int(entry.name) not in known:
                        shutil.rmtree(entry, ignore_errors=True)
            if not known and not (tenant_dir / "examples.json").exists():
                shutil.rmtree(tenant_dir, ignore_errors=True)

    def tenants(self) -> list[str]:
        return sorted(p.name for p in self.tenants_dir.iterdir() if (p / "state.json").exists())

    def state(self, tenant: str) -> TenantState:
        path = self._tenant_dir(tenant) / "state.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise no_head(tenant) from None
        return TenantState(
            tenant,
            int(raw["active_version"]),
            tuple(int(v) for v in raw["versions"]),
            int(raw.get("seq", 0)),
        )

    def manifest(self, tenant: str, version: int) -> dict[str, Any]:
        self.state(tenant).require(version)
        data: dict[str, Any] = json.loads((self._version_dir(tenant, version) / "head.json").read_text())
        return data

    def load_version(self, tenant: str, version: int) -> StoredVersion:
        manifest = self.manifest(tenant, version)
        weights = (self._version_dir(tenant, version) / "weights.safetensors").read_bytes()
        return StoredVersion(version, manifest, weights)

    def examples(self, tenant: str) -> list[Example]:
        path = self._tenant_dir(tenant) / "examples.json"
        if not path.exists():
            return []
        return [example_from_json(e) for e in json.loads(path.read_text())["examples"]]

    def commit_version(self, tenant: str, new: NewVersion) -> TenantState:
        tenant_dir = self._tenant_dir(tenant)
        try:
            state = self.state(tenant)
        except NotFound:
            state = TenantState(tenant, 0, ())
        versions_dir = tenant_dir / "versions"
        versions_dir.mkdir(parents=True, exist_ok=True)
        existing = [int(p.name) for p in versions_dir.iterdir() if p.name.isdigit()]
        version = max([*state.versions, *existing, 0]) + 1
        manifest = {**new.manifest, "version": version}

        staging = Path(tempfile.mkdtemp(prefix=f".{version}.", suffix=".tmp", dir=versions_dir))
        try:
            for name, data in (("head.json", _json_bytes(manifest)), ("weights.safetensors", new.weights)):
                with (staging / name).open("wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
            _fsync_dir(staging)
            os.rename(staging, versions_dir / str(version))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _fsync_dir(versions_dir)
        atomic_write(
            tenant_dir / "examples.json",
            _json_bytes({"examples": [example_to_json(e) for e in new.examples]}),
        )
        # The commit point: until state.json names the version, a restart sweeps it away.
        new_state = TenantState(
            tenant,
            version if new.activate else state.active_version,
            (*state.versions, version),
            next_seq(state.seq),
        )
        self._write_state(new_state)
        return new_state

    def _write_state(self, state: TenantState) -> None:
        atomic_write(
            self._tenant_dir(state.tenant) / "state.json",
            _json_bytes(
                {
                    "active_version": state.active_version,
                    "versions": list(state.versions),
                    "seq": state.seq,
                    "updated_at": time.time(),
                }
            ),
        )
        self.feed.publish(Change(state.tenant, state.active_version, state.seq))

    def activate(self, tenant: str, version: int) -> tuple[TenantState, int]:
        state = self.state(tenant)
        state.require(version)
        new_state = TenantState(tenant, version, state.versions, next_seq(state.seq))
        self._write_state(new_state)
        return new_state, state.active_version

    def delete(self, tenant: str) -> tuple[Deletion, Change]:
        state = self.state(tenant)
        examples = len(self.examples(tenant))
        tenant_dir = self._tenant_dir(tenant)
        # Rename first: the tenant disappears at once and atomically; a crash mid-delete is swept later.
        trash = self.tenants_dir / f".{tenant}.deleted-{time.time_ns()}"
        os.rename(tenant_dir, trash)
        _fsync_dir(self.tenants_dir)
        shutil.rmtree(trash, ignore_errors=True)
        change = Change(tenant, 0, next_seq(state.seq), deleted=True)
        self.feed.publish(change)
        return Deletion(tenant, len(state.versions), examples), change

    def _embeddings_path(self, tenant: str, fingerprint: str) -> Path:
        if not fingerprint.isalnum():
            raise ValueError("fingerprint must be alphanumeric")
        return self._tenant_dir(tenant) / "embeddings" / f"{fingerprint}.safetensors"

    def cached_embeddings(self, tenant: str, fingerprint: str) -> dict[bytes, np.ndarray]:
        from safetensors.numpy import load

        path = self._embeddings_path(tenant, fingerprint)
        if not path.exists():
            return {}
        try:
            tensors = load(path.read_bytes())
        except Exception:
            return {}  # a cache: a damaged file costs time, never correctness
        keys, vectors = tensors["keys"], tensors["vectors"]
        return {bytes(k): v for k, v in zip(keys, vectors, strict=True)}

    def save_embeddings(self, tenant: str, fingerprint: str, entries: dict[bytes, np.ndarray]) -> None:
        from safetensors.numpy import save

        if not entries:
            return
        keys = np.frombuffer(b"".join(entries), dtype=np.uint8).reshape(len(entries), -1)
        vectors = np.stack(list(entries.values())).astype(np.float32)
        atomic_write(self._embeddings_path(tenant, fingerprint), save({"keys": keys, "vectors": vectors}))
