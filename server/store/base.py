"""The store interface, with a change feed.

A store keeps, per tenant: immutable head versions (manifest + safetensors weights), the active pointer,
the labelled examples and cached embeddings. Every method is atomic. Every change of a tenant's active
pointer (a commit, an activation, a deletion) and every removal of a version (DeleteHeadVersion) is
published on the store's change feed with a sequence number that grows with each change, so that every
head bank — in this process or, with a shared store, in another replica — reaches the same state through
the same `reconcile` path. A version number is never given out twice while the tenant exists: a version
deleted stays deleted, and the next training gets a new number.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import hashlib
import json
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from headswap.server.domain import Deletion, Example, Input
from headswap.server.errors import DataLoss, FailedPrecondition, NotFound
from headswap.server.input_kinds import KINDS, input_kind
from headswap.server.keys import ApiKey
from headswap.server.store.requests import RequestRecord


@dataclass(frozen=True)
class StoredVersion:
    version: int
    manifest: dict[str, Any]
    weights: bytes


@dataclass(frozen=True)
class NewVersion:
    """A trained head about to be committed, with the examples it was trained on."""

    manifest: dict[str, Any]
    weights: bytes
    examples: Sequence[Example]
    activate: bool
    # The tenant's `seq` when the training read its examples (0: a new tenant), or None: no expectation. A
    # store refuses the commit when the tenant was deleted since (`check_expected`); the local and memory
    # stores, whose tenants change only under the tenant lock, when it changed at all. PostgreSQL refuses
    # only a deletion: replicas may train one tenant at once.
    expect_seq: int | None = None
    # The call's idempotency key, committed with the version (see `RequestRecord`); None: none sent.
    request: RequestRecord | None = None


@dataclass(frozen=True)
class TenantState:
    tenant: str
    active_version: int  # 0 when no version is active
    versions: tuple[int, ...]
    seq: int = 0  # grows with every change of this state
    previous_version: int = 0  # the version active before the active one (kept for a rollback)

    def require(self, version: int) -> None:
        if version not in self.versions:
            raise NotFound(
                f"tenant {self.tenant!r} has no version {version}; its versions are {list(self.versions)}"
            )


@dataclass(frozen=True)
class Change:
    """A tenant's active version changed (0: none active), or the tenant was deleted."""

    tenant: str
    active_version: int
    seq: int
    deleted: bool = False
    weights_sha256: str = ""  # of the active version: a version's identity is its number and its bytes
    key_id: str = ""  # set instead (tenant "") when an API key changed: caches of it must be dropped


def no_head(tenant: str) -> NotFound:
    return NotFound(f"tenant {tenant!r} has no head: train one with AdaptHead first")


def check_expected(state: TenantState, expect_seq: int | None) -> None:
    """A write of work started on the tenant's state `expect_seq` (0: none) refuses to land on another state:
    the tenant was deleted, or changed, while the work ran."""
    if expect_seq is not None and state.seq != expect_seq:
        gone = "deleted" if not state.seq else "changed"
        raise FailedPrecondition(
            f"tenant {state.tenant!r} was {gone} while this call ran: nothing was stored; call again"
        )


def damaged(tenant: str, what: str) -> DataLoss:
    return DataLoss(
        f"tenant {tenant!r} is quarantined: {what}; run `headswap store check --repair` on the store, or "
        "delete the tenant with DeleteHead"
    )


def weights_digest(weights: bytes) -> str:
    return hashlib.sha256(weights).hexdigest()


# The seal: the sha256 of the manifest's canonical JSON (every field but the seal; sorted keys, no spaces). The
# manifest records the weights' sha256, so the seal binds the labels, the metrics and everything else serving
# reads to the weights. A manifest written before the seal has none: it is checked as before (the weights'
# sha256 and the field types below), so a label swapped in such a manifest goes unseen until it is retrained.
SEAL = "manifest_sha256"
FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "spec": (dict,),
    "metrics": (dict,),
    "created_at": (int, float),
    "example_count": (int,),
    "backbone_fingerprint": (str,),
    "weights_sha256": (str,),
    "version": (int,),
}


def manifest_digest(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != SEAL}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def sealed(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest as committed: with its seal (computed last, over everything else)."""
    return {**manifest, SEAL: manifest_digest(manifest)}


def manifest_problem(version: int, manifest: Any) -> str | None:
    """What is wrong with a stored manifest (None: nothing): a broken seal, or a field serving reads that has
    the wrong type. Raised by the stores as DataLoss: bytes that do not say what was committed are never
    served."""
    what = f"version {version}'s head.json"
    if not isinstance(manifest, dict):
        return f"{what} is not a manifest"
    seal = manifest.get(SEAL)
    if seal is not None:
        try:
            intact = seal == manifest_digest(manifest)
        except (TypeError, ValueError):
            intact = False
        if not intact:
            return f"{what} does not match the sha256 recorded at commit (its labels or fields were changed)"
    labels = manifest.get("labels")
    if (
        not isinstance(labels, list)
        or not labels
        or not all(isinstance(label, str) for label in labels)
        or len(set(labels)) != len(labels)
    ):
        return f"{what} has no list of distinct labels"
    for key, kinds in FIELD_TYPES.items():
        value = manifest.get(key)
        if key in manifest and (not isinstance(value, kinds) or isinstance(value, bool)):
            return f"{what} has a {key} of the wrong type ({type(value).__name__})"
    return None


def verify_weights(tenant: str, version: int, manifest: dict[str, Any], weights: bytes) -> None:
    """Weights must be the bytes committed: their sha256 was recorded in the manifest at commit."""
    recorded = manifest.get("weights_sha256")
    if recorded is not None and recorded != weights_digest(weights):
        raise damaged(tenant, f"version {version}'s weights do not match the sha256 recorded at commit")


class CachedVectors(dict[bytes, np.ndarray]):
    """Cached vectors by input key, and how many stored rows were found damaged and left out (`dropped`)."""

    def __init__(self, dropped: int = 0) -> None:
        super().__init__()
        self.dropped = dropped


def row_check(key: bytes, vector: np.ndarray) -> bytes:
    """A cached row's checksum, bound to its key: a garbled vector, or a sound one moved to another key's row
    (permuted rows: finite unit vectors that would train a wrong head), fails it."""
    return hashlib.sha256(key + np.asarray(vector, dtype="<f4").tobytes()).digest()


def retained(state: TenantState, keep_newest: int) -> tuple[int, ...]:
    """The versions a retention limit keeps: the newest `keep_newest`, the active one and its predecessor."""
    keep = set(state.versions[-keep_newest:]) | ({state.active_version, state.previous_version} - {0})
    return tuple(v for v in state.versions if v in keep)


class ChangeFeed:
    """Fan-out of changes to async subscribers; `publish` may be called from any thread."""

    def __init__(self) -> None:
        self._subscribers: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue[Change]]] = []
        self._lock = threading.Lock()

    def publish(self, change: Change) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        for loop, queue in subscribers:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, change)
            except RuntimeError:  # that loop is closed: its subscriber is gone
                continue

    async def subscribe(self) -> AsyncIterator[Change]:
        entry = (asyncio.get_running_loop(), asyncio.Queue[Change]())
        with self._lock:
            self._subscribers.append(entry)
        try:
            while True:
                yield await entry[1].get()
        finally:
            with self._lock:
                self._subscribers.remove(entry)


class HeadStore(abc.ABC):
    """What the services need from a store. Implementations make each method atomic, publish every change
    of an active pointer on `feed`, keep at most `max_versions` versions per tenant (plus the active one
    and its predecessor), and raise DataLoss for a tenant whose stored data cannot be read, recording it
    in `damaged` (tenant -> what is wrong) so that one tenant's damage never reaches another."""

    def __init__(self, max_versions: int = 50) -> None:
        self.feed = ChangeFeed()
        self.max_versions = max_versions
        self.damaged: dict[str, str] = {}

    def changes(self) -> AsyncIterator[Change]:
        """Every change from now on, in order."""
        return self.feed.subscribe()

    @abc.abstractmethod
    def tenants(self) -> list[str]: ...

    @abc.abstractmethod
    def state(self, tenant: str) -> TenantState:
        """Raises NotFound for an unknown tenant."""

    @abc.abstractmethod
    def manifest(self, tenant: str, version: int) -> dict[str, Any]: ...

    @abc.abstractmethod
    def load_version(self, tenant: str, version: int) -> StoredVersion: ...

    @abc.abstractmethod
    def examples(self, tenant: str) -> list[Example]:
        """The tenant's stored examples; empty for an unknown tenant."""

    @abc.abstractmethod
    def commit_version(self, tenant: str, new: NewVersion) -> TenantState:
        """Store a new version with the examples it was trained on, and move the active pointer to it when
        `new.activate`. All or nothing. The store numbers it one past the highest number the tenant was
        ever given, so a number is never reused, not even after that version was deleted. With
        `new.request`, the request id is recorded in the same commit; a request id the tenant already has
        raises `AlreadyDone` and stores nothing."""

    @abc.abstractmethod
    def put_examples(
        self,
        tenant: str,
        examples: Sequence[Example],
        expect_seq: int | None = None,
        request: RequestRecord | None = None,
    ) -> TenantState:
        """Make `examples` the tenant's stored examples (creating the tenant if need be), leaving its versions
        and active pointer as they are: nothing is published. All or nothing. `expect_seq`: as
        `NewVersion.expect_seq`; `request`: as `NewVersion.request`."""

    @abc.abstractmethod
    def request_record(self, tenant: str, request_id: str) -> dict[str, Any] | None:
        """What the AdaptHead call with this idempotency key stored and answered (`RequestRecord.to_json`), or
        None when the tenant has no such record (never sent, forgotten past `REQUESTS_KEPT`, or deleted)."""

    @abc.abstractmethod
    def activate(self, tenant: str, version: int) -> tuple[TenantState, int]:
        """Point the tenant at an existing version; returns the new state and the previous active one."""

    @abc.abstractmethod
    def delete_version(self, tenant: str, version: int) -> TenantState:
        """Remove one version that is not the active one, and publish a change (the active version as it
        is, a new sequence number) so that every head bank drops whatever it holds of the removed one."""

    @abc.abstractmethod
    def delete(self, tenant: str) -> tuple[Deletion, Change]:
        """Remove everything of the tenant; returns what went and the change it published."""

    @abc.abstractmethod
    def cached_embeddings(self, tenant: str, fingerprint: str) -> dict[bytes, np.ndarray]: ...

    @abc.abstractmethod
    def save_embeddings(self, tenant: str, fingerprint: str, entries: dict[bytes, np.ndarray]) -> None: ...

    # -- API keys (only their HMACs: see headswap.server.keys) ----------------------------------------------

    @abc.abstractmethod
    def put_key(self, key: ApiKey) -> None: ...

    @abc.abstractmethod
    def get_key(self, key_id: str) -> ApiKey | None: ...

    @abc.abstractmethod
    def list_keys(self) -> list[ApiKey]: ...

    @abc.abstractmethod
    def revoke_key(self, key_id: str, at: float) -> ApiKey:
        """Mark the key revoked (NotFound for an unknown id) and publish a change naming it."""

    def close(self) -> None:  # noqa: B027 - stores with connections override it
        """Release connections and files."""


def example_to_json(example: Example) -> dict[str, str]:
    item = example.input  # {"text": "...", "label": ...}; bytes as base64: {"image": "...", "label": ...}
    return {item.kind: input_kind(item.kind).to_json(item.content), "label": example.label}


def example_from_json(raw: dict[str, str]) -> Example:
    kind = next((name for name in raw if name in KINDS), "text")
    return Example(Input(**{kind: input_kind(kind).from_json(raw[kind])}), raw["label"])


def key_to_json(key: ApiKey) -> dict[str, Any]:
    return dataclasses.asdict(key)


def key_from_json(raw: dict[str, Any]) -> ApiKey:
    fields: dict[str, Any] = {f.name: raw[f.name] for f in dataclasses.fields(ApiKey) if f.name in raw}
    return ApiKey(**fields)


def no_key(key_id: str) -> NotFound:
    return NotFound(f"no API key with id {key_id!r}")
