"""The store interface: one protocol per concern (`Versions` with the active pointer, `Examples`,
`EmbeddingCache`, `Keys`, `RequestRecords`), all of them together `HeadStore`, with a change feed (feed.py).
The pointer rules every backend follows are in pointer.py; head manifests are `HeadManifest`s (manifest.py).

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
import dataclasses
import hashlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from headswap.server.domain import Deletion, Example, Input
from headswap.server.errors import DataLoss, FailedPrecondition, NotFound
from headswap.server.input_kinds import KINDS, input_kind
from headswap.server.keys import ApiKey
from headswap.server.manifest import HeadManifest, ManifestError
from headswap.server.store.feed import ChangeFeed
from headswap.server.store.requests import RequestRecord


@dataclass(frozen=True)
class StoredVersion:
    """A committed version as a store reads it back: its manifest checked, its weights those committed."""

    version: int
    manifest: HeadManifest
    weights: bytes


@dataclass(frozen=True)
class NewVersion:
    """A trained head about to be committed, with the examples it was trained on."""

    manifest: HeadManifest
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
class NewExamples:
    """Examples about to become a tenant's stored set, without a new version: `expect_seq` and `request` as
    `NewVersion`'s."""

    examples: Sequence[Example]
    expect_seq: int | None = None
    request: RequestRecord | None = None


@dataclass(frozen=True)
class TenantCopy:
    """A whole tenant as `headswap store copy` moves it: its state, every version (with its number), its
    examples and the highest number it was ever given."""

    state: TenantState
    versions: Sequence[StoredVersion]
    examples: Sequence[Example]
    last_version: int


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


def verify_weights(tenant: str, version: int, recorded: str | None, weights: bytes) -> None:
    """Weights must be the bytes committed: their sha256 was `recorded` in the manifest at commit (None: a
    manifest that does not record it)."""
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


class Versions(abc.ABC):
    """Heads: a tenant's immutable versions and its active pointer (the rules: store/pointer.py)."""

    @abc.abstractmethod
    def tenants(self) -> list[str]: ...

    @abc.abstractmethod
    def state(self, tenant: str) -> TenantState:
        """Raises NotFound for an unknown tenant."""

    @abc.abstractmethod
    def manifest(self, tenant: str, version: int) -> HeadManifest: ...

    @abc.abstractmethod
    def load_version(self, tenant: str, version: int) -> StoredVersion: ...

    @abc.abstractmethod
    def commit_version(self, tenant: str, new: NewVersion) -> TenantState:
        """Store a new version with the examples it was trained on, and move the active pointer to it when
        `new.activate`. All or nothing. The store numbers it one past the highest number the tenant was
        ever given, so a number is never reused, not even after that version was deleted. With
        `new.request`, the request id is recorded in the same commit; a request id the tenant already has
        raises `AlreadyDone` and stores nothing."""

    @abc.abstractmethod
    def activate(self, tenant: str, version: int) -> tuple[TenantState, int]:
        """Point the tenant at an existing version; returns the new state and the previous active one."""

    @abc.abstractmethod
    def delete_version(self, tenant: str, version: int) -> TenantState:
        """Remove one version that is not the active one, and publish a change (the active version as it
        is, a new sequence number) so that every head bank drops whatever it holds of the removed one."""

    @abc.abstractmethod
    def last_version(self, tenant: str) -> int:
        """The highest version number the tenant was ever given (0 for none), deleted versions included."""

    @abc.abstractmethod
    def delete(self, tenant: str) -> tuple[Deletion, Change]:
        """Remove everything of the tenant; returns what went and the change it published."""


class Examples(abc.ABC):
    """A tenant's labelled examples: the set its newest training (or AdaptHead without training) stored."""

    @abc.abstractmethod
    def examples(self, tenant: str) -> list[Example]:
        """The tenant's stored examples; empty for an unknown tenant."""

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
        return self.commit_examples(tenant, NewExamples(examples, expect_seq, request))

    @abc.abstractmethod
    def commit_examples(self, tenant: str, new: NewExamples) -> TenantState:
        """`put_examples`, as each store implements it."""


class EmbeddingCache(abc.ABC):
    """Cached embeddings of a tenant's examples, per embedding key (see `BackboneManifest.embedding_key`)."""

    @abc.abstractmethod
    def cached_embeddings(self, tenant: str, fingerprint: str) -> dict[bytes, np.ndarray]: ...

    @abc.abstractmethod
    def fingerprints(self, tenant: str) -> list[str]:
        """The embedding keys the tenant has cached embeddings for."""

    @abc.abstractmethod
    def save_embeddings(self, tenant: str, fingerprint: str, entries: dict[bytes, np.ndarray]) -> None: ...


class Keys(abc.ABC):
    """API keys (only their HMACs: see headswap.server.keys)."""

    @abc.abstractmethod
    def put_key(self, key: ApiKey) -> None: ...

    @abc.abstractmethod
    def get_key(self, key_id: str) -> ApiKey | None: ...

    @abc.abstractmethod
    def list_keys(self) -> list[ApiKey]: ...

    @abc.abstractmethod
    def revoke_key(self, key_id: str, at: float) -> ApiKey:
        """Mark the key revoked (NotFound for an unknown id) and publish a change naming it."""


class RequestRecords(abc.ABC):
    """AdaptHead idempotency keys, recorded by `commit_version` and `put_examples` (store/requests.py)."""

    @abc.abstractmethod
    def request_record(self, tenant: str, request_id: str) -> dict[str, Any] | None:
        """What the AdaptHead call with this idempotency key stored and answered (`RequestRecord.to_json`), or
        None when the tenant has no such record (never sent, forgotten past `REQUESTS_KEPT`, or deleted)."""


class HeadStore(Versions, Examples, EmbeddingCache, Keys, RequestRecords):
    """What the services need from a store: every concern above, on one backend. Implementations make each
    method atomic, publish every change of an active pointer on `feed`, keep at most `max_versions` versions
    per tenant (plus the active one and its predecessor), and raise DataLoss for a tenant whose stored data
    cannot be read, recording it in `damaged` (tenant -> what is wrong: `quarantine`) so that one tenant's
    damage never reaches another."""

    def __init__(self, max_versions: int = 50) -> None:
        self.feed = ChangeFeed()
        self.max_versions = max_versions
        self.damaged: dict[str, str] = {}

    def changes(self) -> AsyncIterator[Change]:
        """Every change from now on, in order."""
        return self.feed.subscribe()

    def quarantine(self, tenant: str, what: str) -> DataLoss:
        """Record the tenant as damaged (`what` is wrong); returns the DataLoss to raise."""
        self.damaged[tenant] = what
        return damaged(tenant, what)

    def checked_manifest(self, tenant: str, version: int, data: Any) -> HeadManifest:
        """A stored manifest, read: DataLoss (quarantine) when it does not say what was committed."""
        try:
            return HeadManifest.from_json(data, f"version {version}'s head.json")
        except ManifestError as exc:
            raise self.quarantine(tenant, str(exc)) from None

    def close(self) -> None:
        """Release connections and files."""


class RestoringStore(HeadStore):
    """A store that `headswap store copy` can copy a tenant into (store/copy.py)."""

    @abc.abstractmethod
    def restore(self, tenant: str, copied: TenantCopy) -> dict[int, str]:
        """Store `copied` whole, in one transaction, unless the tenant is there; returns the weights' sha256
        of the versions that were there (empty: restored)."""


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
