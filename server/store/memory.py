"""A store in memory, for fast tests: the same contract as the others, nothing on disk."""

from __future__ import annotations

import copy
import dataclasses
import threading
from typing import Any

import numpy as np

from headswap.server.domain import Deletion, Example
from headswap.server.keys import ApiKey
from headswap.server.manifest import HeadManifest
from headswap.server.store import pointer
from headswap.server.store.base import (
    Change,
    HeadStore,
    NewExamples,
    NewVersion,
    StoredVersion,
    TenantState,
    check_expected,
    no_head,
    no_key,
    verify_weights,
    weights_digest,
)
from headswap.server.store.requests import AlreadyDone, RequestRecord, find_request, with_request
from headswap.server.validation import check_tenant


class MemoryStore(HeadStore):
    def __init__(self, max_versions: int = 50) -> None:
        super().__init__(max_versions)
        self._states: dict[str, TenantState] = {}
        self._versions: dict[tuple[str, int], tuple[dict[str, Any], bytes]] = {}  # manifest JSON, weights
        self._examples: dict[str, list[Example]] = {}
        self._embeddings: dict[tuple[str, str], dict[bytes, np.ndarray]] = {}
        self._keys: dict[str, ApiKey] = {}
        self._lock = threading.Lock()
        self._seq = 0
        self._last_version: dict[str, int] = {}  # highest number given out per tenant, deleted ones included
        self._requests: dict[
            str, list[dict[str, Any]]
        ] = {}  # per tenant, RequestRecord.to_json, oldest first

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _state(self, tenant: str) -> TenantState:
        state = self._states.get(check_tenant(tenant))
        if state is None:
            raise no_head(tenant)
        return state

    def tenants(self) -> list[str]:
        with self._lock:
            return sorted(self._states)

    def state(self, tenant: str) -> TenantState:
        with self._lock:
            return self._state(tenant)

    def manifest(self, tenant: str, version: int) -> HeadManifest:
        return self.load_version(tenant, version).manifest

    def load_version(self, tenant: str, version: int) -> StoredVersion:
        """The manifest is kept as JSON, as the other stores keep it, and read (checked) on every load."""
        with self._lock:
            self._state(tenant).require(version)
            data, weights = self._versions[(tenant, version)]
        manifest = self.checked_manifest(tenant, version, data)
        verify_weights(tenant, version, manifest.weights_sha256, weights)
        return StoredVersion(version, manifest, weights)

    def examples(self, tenant: str) -> list[Example]:
        with self._lock:
            return list(self._examples.get(check_tenant(tenant), []))

    def commit_version(self, tenant: str, new: NewVersion) -> TenantState:
        check_tenant(tenant)
        with self._lock:
            state = self._states.get(tenant, TenantState(tenant, 0, ()))
            check_expected(state, new.expect_seq)
            self._check_request(tenant, new.request)
            version = pointer.next_version(state, self._last_version.get(tenant, 0))
            self._last_version[tenant] = version
            manifest = new.manifest.committed(version, weights_digest(new.weights))
            self._versions[(tenant, version)] = (manifest.to_json(), bytes(new.weights))
            updated = pointer.committed(state, version, new.activate, self._next_seq())
            kept = pointer.retained(updated, self.max_versions)
            for old in set(updated.versions) - set(kept.versions):
                del self._versions[(tenant, old)]
            updated = kept
            self._examples[tenant] = list(new.examples)
            self._states[tenant] = updated
            self._record(tenant, new.request, version, updated.active_version)
        self.feed.publish(Change(tenant, updated.active_version, updated.seq))
        return updated

    def _check_request(self, tenant: str, request: RequestRecord | None) -> None:
        if request is not None and (done := find_request(self._requests.get(tenant), request.request_id)):
            raise AlreadyDone(copy.deepcopy(done))

    def _record(self, tenant: str, request: RequestRecord | None, version: int, active: int) -> None:
        if request is not None:
            record = request.to_json(version, active)
            self._requests[tenant] = with_request(self._requests.get(tenant), copy.deepcopy(record))

    def request_record(self, tenant: str, request_id: str) -> dict[str, Any] | None:
        with self._lock:
            done = find_request(self._requests.get(check_tenant(tenant)), request_id)
            return copy.deepcopy(done)

    def last_version(self, tenant: str) -> int:
        with self._lock:
            return max([self._last_version.get(tenant, 0), *self._state(tenant).versions])

    def commit_examples(self, tenant: str, new: NewExamples) -> TenantState:
        check_tenant(tenant)
        with self._lock:
            check_expected(self._states.get(tenant, TenantState(tenant, 0, ())), new.expect_seq)
            self._check_request(tenant, new.request)
            state = self._states.setdefault(tenant, TenantState(tenant, 0, (), self._next_seq()))
            self._examples[tenant] = list(new.examples)
            self._record(tenant, new.request, 0, state.active_version)
        return state

    def activate(self, tenant: str, version: int) -> tuple[TenantState, int]:
        with self._lock:
            state = self._state(tenant)
            updated = pointer.activated(state, version, self._next_seq())
            self._states[tenant] = updated
        self.feed.publish(Change(tenant, version, updated.seq))
        return updated, state.active_version

    def delete_version(self, tenant: str, version: int) -> TenantState:
        with self._lock:
            updated = pointer.without_version(self._state(tenant), version, self._next_seq())
            del self._versions[(tenant, version)]
            self._states[tenant] = updated
        self.feed.publish(Change(tenant, updated.active_version, updated.seq))
        return updated

    def delete(self, tenant: str) -> tuple[Deletion, Change]:
        with self._lock:
            state = self._state(tenant)
            del self._states[tenant]
            self._last_version.pop(tenant, None)
            self._requests.pop(tenant, None)
            for v in state.versions:
                self._versions.pop((tenant, v), None)
            examples = len(self._examples.pop(tenant, []))
            for key in [k for k in self._embeddings if k[0] == tenant]:
                del self._embeddings[key]
            change = Change(tenant, 0, self._next_seq(), deleted=True)
        self.feed.publish(change)
        return Deletion(tenant, len(state.versions), examples), change

    def cached_embeddings(self, tenant: str, fingerprint: str) -> dict[bytes, np.ndarray]:
        with self._lock:
            return dict(self._embeddings.get((check_tenant(tenant), fingerprint), {}))

    def fingerprints(self, tenant: str) -> list[str]:
        with self._lock:
            return sorted(f for t, f in self._embeddings if t == check_tenant(tenant))

    def save_embeddings(self, tenant: str, fingerprint: str, entries: dict[bytes, np.ndarray]) -> None:
        if entries:
            with self._lock:
                self._embeddings[(check_tenant(tenant), fingerprint)] = dict(entries)

    def put_key(self, key: ApiKey) -> None:
        with self._lock:
            self._keys[key.id] = key

    def get_key(self, key_id: str) -> ApiKey | None:
        with self._lock:
            return self._keys.get(key_id)

    def list_keys(self) -> list[ApiKey]:
        with self._lock:
            return sorted(self._keys.values(), key=lambda k: k.created_at)

    def revoke_key(self, key_id: str, at: float) -> ApiKey:
        with self._lock:
            key = self._keys.get(key_id)
            if key is None:
                raise no_key(key_id)
            key = dataclasses.replace(key, revoked_at=key.revoked_at or at)
            self._keys[key_id] = key
            seq = self._next_seq()
        self.feed.publish(Change("", 0, seq, key_id=key_id))
        return key
